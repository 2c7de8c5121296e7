"""Acknowledgement tokens: only a genuine, unexpired token for that message verifies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox._ack_tokens import TOKEN_CHARS, sign, verify
from outbox._errors import InvalidAckToken, OutboxError

KEY = hashlib.sha256(b"a key for the tests").digest()
OTHER_KEY = hashlib.sha256(b"another deployment's key").digest()
NOW = 1_790_000_000.0
DAY = 86_400.0
MESSAGE = "invalid or expired acknowledgement link"


def refused(token: object, *, key: bytes = KEY, now: float = NOW) -> str:
    """Verify a token that must be refused; return the error's message."""
    with pytest.raises(InvalidAckToken) as error:
        verify(token, key=key, now=now)  # type: ignore[arg-type]
    return str(error.value)


def decode(token: str) -> bytes:
    body = token.removeprefix("v1.")
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def encode(raw: bytes) -> str:
    return "v1." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_a_token_verifies_as_its_message_until_it_expires() -> None:
    token = sign(42, key=KEY, ttl_seconds=7 * DAY, now=NOW)

    assert verify(token, key=KEY, now=NOW) == 42
    assert verify(token, key=KEY, now=NOW + 7 * DAY - 1) == 42


def test_a_token_is_short_url_safe_and_versioned() -> None:
    token = sign(2**63 - 1, key=KEY, ttl_seconds=90 * DAY, now=NOW)

    assert len(token) == TOKEN_CHARS == 46
    assert re.fullmatch(r"v1\.[A-Za-z0-9_-]+", token)


def test_an_expired_token_is_refused() -> None:
    token = sign(42, key=KEY, ttl_seconds=60, now=NOW)

    assert refused(token, now=NOW + 60) == MESSAGE
    assert refused(token, now=NOW + 365 * DAY) == MESSAGE


def test_a_token_signed_with_another_key_is_refused() -> None:
    token = sign(42, key=OTHER_KEY, ttl_seconds=DAY, now=NOW)

    assert refused(token) == MESSAGE


def test_a_token_whose_id_was_changed_is_refused() -> None:
    raw = decode(sign(42, key=KEY, ttl_seconds=DAY, now=NOW))
    _, expires_at = struct.unpack(">QQ", raw[:16])

    forged = encode(struct.pack(">QQ", 43, expires_at) + raw[16:])

    assert refused(forged) == MESSAGE


def test_a_token_whose_expiry_was_pushed_back_is_refused() -> None:
    token = sign(42, key=KEY, ttl_seconds=60, now=NOW)
    raw = decode(token)
    message_id, expires_at = struct.unpack(">QQ", raw[:16])

    prolonged = encode(struct.pack(">QQ", message_id, expires_at + 365 * 86_400) + raw[16:])

    assert refused(prolonged, now=NOW + 120) == MESSAGE
    assert refused(prolonged) == MESSAGE  # even before the real expiry


def test_a_token_for_one_message_never_verifies_as_another() -> None:
    for_a = sign(1001, key=KEY, ttl_seconds=DAY, now=NOW)
    for_b = sign(1002, key=KEY, ttl_seconds=DAY, now=NOW)

    assert verify(for_a, key=KEY, now=NOW) == 1001
    assert verify(for_b, key=KEY, now=NOW) == 1002
    # B's payload under A's tag, and the other way round
    spliced = [
        encode(decode(for_b)[:16] + decode(for_a)[16:]),
        encode(decode(for_a)[:16] + decode(for_b)[16:]),
    ]
    assert [refused(token) for token in spliced] == [MESSAGE, MESSAGE]


def test_the_mac_covers_the_version_prefix() -> None:
    """A tag computed over the bare payload (no version) is not a v1 tag."""
    payload = struct.pack(">QQ", 42, int(NOW + DAY))
    bare = hmac.new(KEY, payload, hashlib.sha256).digest()[:16]

    assert refused(encode(payload + bare)) == MESSAGE


@pytest.mark.parametrize(
    "token",
    [
        "",
        "v1.",
        "v1",
        "garbage",
        "v2." + "A" * 43,
        "v1." + "A" * 43,  # well-formed, all zeros: no valid tag
        "v1." + "!" * 43,
        "v1." + "é" * 43,
        "v1." + "٣" * 43,  # digits of another script
        " " + "v1." + "A" * 42,
        "../../etc/passwd",
    ],
)
def test_garbage_is_refused_with_the_same_message(token: str) -> None:
    assert refused(token) == MESSAGE


@pytest.mark.parametrize("length", [TOKEN_CHARS + 1, 4096, 1_000_000])
def test_an_oversized_token_is_refused(length: int) -> None:
    genuine = sign(42, key=KEY, ttl_seconds=DAY, now=NOW)

    assert refused(genuine + "A" * (length - TOKEN_CHARS)) == MESSAGE


def test_a_truncated_token_is_refused() -> None:
    genuine = sign(42, key=KEY, ttl_seconds=DAY, now=NOW)

    assert refused(genuine[:-1]) == MESSAGE


def test_the_standard_base64_alphabet_is_not_another_spelling_of_a_token() -> None:
    token = next(
        t
        for i in range(1, 10_000)
        if "-" in (t := sign(i, key=KEY, ttl_seconds=DAY, now=NOW)) or "_" in t
    )
    respelled = token.replace("-", "+").replace("_", "/")

    assert refused(respelled) == MESSAGE


def test_every_single_character_change_is_refused() -> None:
    """Including the last character, whose spare bits decode to the same bytes."""
    token = sign(42, key=KEY, ttl_seconds=DAY, now=NOW)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    changed = [
        token[:i] + c + token[i + 1 :]
        for i in range(len(token))
        for c in (alphabet if i == len(token) - 1 else "Aa0_")
        if c != token[i]
    ]

    assert {refused(t) for t in changed} == {MESSAGE}


def test_a_token_that_is_not_a_string_is_refused() -> None:
    token = sign(42, key=KEY, ttl_seconds=DAY, now=NOW)

    assert refused(token.encode()) == MESSAGE
    assert refused(None) == MESSAGE


def test_the_error_is_an_outbox_error_and_says_nothing_about_the_token() -> None:
    token = sign(42, key=KEY, ttl_seconds=60, now=NOW)
    with pytest.raises(OutboxError) as error:
        verify(token, key=KEY, now=NOW + 61)

    assert str(error.value) == MESSAGE and "42" not in str(error.value)


@pytest.mark.parametrize("message_id", [0, -1, 2**63, True])
def test_signing_refuses_what_is_not_a_message_id(message_id: int) -> None:
    with pytest.raises(ValueError, match="message_id"):
        sign(message_id, key=KEY, ttl_seconds=DAY, now=NOW)


@pytest.mark.parametrize("ttl", [0, -1, float("inf"), float("nan")])
def test_signing_refuses_a_ttl_that_is_not_a_positive_number(ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl_seconds"):
        sign(42, key=KEY, ttl_seconds=ttl, now=NOW)


def test_an_empty_key_is_a_programming_error_not_a_bad_token() -> None:
    with pytest.raises(ValueError, match="key"):
        sign(42, key=b"", ttl_seconds=DAY, now=NOW)
    with pytest.raises(ValueError, match="key"):
        verify(sign(42, key=KEY, ttl_seconds=DAY, now=NOW), key=b"", now=NOW)


def test_the_clock_defaults_to_now() -> None:
    token = sign(42, key=KEY, ttl_seconds=DAY)

    assert verify(token, key=KEY) == 42
    assert refused(sign(42, key=KEY, ttl_seconds=DAY, now=NOW - 2 * DAY), now=NOW) == MESSAGE


@given(
    message_id=st.integers(min_value=1, max_value=2**63 - 1),
    ttl=st.floats(min_value=1, max_value=90 * DAY),
    other=st.integers(min_value=1, max_value=2**63 - 1),
)
def test_any_message_round_trips_and_no_other_key_accepts_it(
    message_id: int, ttl: float, other: int
) -> None:
    token = sign(message_id, key=KEY, ttl_seconds=ttl, now=NOW)

    assert verify(token, key=KEY, now=NOW) == message_id
    assert len(token) == TOKEN_CHARS
    with pytest.raises(InvalidAckToken):
        verify(token, key=OTHER_KEY, now=NOW)
    if other != message_id:
        assert token != sign(other, key=KEY, ttl_seconds=ttl, now=NOW)
