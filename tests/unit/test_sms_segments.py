"""SMS segment counting: GSM-7 septets or UCS-2 code units, single and concatenated."""

from __future__ import annotations

import pytest

from outbox.dispatcher.sms_text import SmsSegments, count_segments, encoding_of


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", SmsSegments(encoding="GSM-7", units=0, segments=0)),
        ("a" * 160, SmsSegments(encoding="GSM-7", units=160, segments=1)),
        ("a" * 161, SmsSegments(encoding="GSM-7", units=161, segments=2)),
        ("a" * 306, SmsSegments(encoding="GSM-7", units=306, segments=2)),
        ("a" * 307, SmsSegments(encoding="GSM-7", units=307, segments=3)),
        ("é" * 160, SmsSegments(encoding="GSM-7", units=160, segments=1)),
        ("ж" * 70, SmsSegments(encoding="UCS-2", units=70, segments=1)),
        ("ж" * 71, SmsSegments(encoding="UCS-2", units=71, segments=2)),
        ("ж" * 134, SmsSegments(encoding="UCS-2", units=134, segments=2)),
        ("ж" * 135, SmsSegments(encoding="UCS-2", units=135, segments=3)),
    ],
)
def test_boundaries_of_single_and_concatenated_messages(text: str, expected: SmsSegments) -> None:
    assert count_segments(text) == expected


def test_every_extension_character_takes_two_septets() -> None:
    for char in "^{}\\[~]|€\f":
        assert count_segments(char) == SmsSegments(encoding="GSM-7", units=2, segments=1), char
    # 80 euro signs fill one message exactly; one more septet needs a second
    assert count_segments("€" * 80).segments == 1
    assert count_segments("€" * 80 + "a").segments == 2


def test_an_escape_pair_is_never_cut_at_a_segment_boundary() -> None:
    # 152 septets, then "[" (2) would end on septet 154 of a 153-septet segment
    text = "a" * 152 + "[" + "a" * 10
    assert count_segments(text) == SmsSegments(encoding="GSM-7", units=164, segments=2)
    text = "a" * 152 + "[" + "a" * 152
    # plain division would say ceil(306 / 153) = 2; the pair moves to segment two
    assert count_segments(text) == SmsSegments(encoding="GSM-7", units=306, segments=3)


def test_one_character_outside_gsm_switches_the_whole_text_to_ucs2() -> None:
    assert encoding_of("Stop loss on EURUSD") == "GSM-7"
    assert encoding_of("Stop loss on EURUSD \u2019") == "UCS-2"  # a curly apostrophe
    assert count_segments("a" * 69 + "ж") == SmsSegments(encoding="UCS-2", units=70, segments=1)
    assert count_segments("a" * 70 + "ж").segments == 2


def test_an_emoji_counts_two_code_units_and_is_never_split() -> None:
    assert count_segments("🚨") == SmsSegments(encoding="UCS-2", units=2, segments=1)
    assert count_segments("🚨" * 35).segments == 1
    assert count_segments("🚨" * 35 + "a").segments == 2
    # 66 units then an emoji: it does not fit in the 67 left, so it opens segment two
    text = "a" * 66 + "🚨" + "a" * 66
    assert count_segments(text) == SmsSegments(encoding="UCS-2", units=134, segments=3)


def test_a_bmp_symbol_outside_gsm_is_one_code_unit() -> None:
    assert count_segments("⚠") == SmsSegments(encoding="UCS-2", units=1, segments=1)
    assert count_segments("✅") == SmsSegments(encoding="UCS-2", units=1, segments=1)
