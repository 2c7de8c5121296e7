"""X-Twilio-Signature: the API's verifier and the stand-in's signer against Twilio's
published example, and the URL spellings Twilio's own validators accept."""

from __future__ import annotations

from outbox.api._sms_status_callback import signed_url_variants, twilio_signature
from outbox.testing.twilio import twilio_signature as stand_in_signature

# Twilio's documented example (webhooks security): auth token 12345
URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+12349013030",
    "Digits": "1234",
    "From": "+12349013030",
    "To": "+18005551212",
}
EXPECTED = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def test_both_implementations_give_twilios_published_signature() -> None:
    assert twilio_signature(URL, list(PARAMS.items()), "12345") == EXPECTED
    assert stand_in_signature(URL, PARAMS, "12345") == EXPECTED
    # the order the fields arrive in does not matter, the token does
    assert twilio_signature(URL, list(reversed(PARAMS.items())), "12345") == EXPECTED
    assert twilio_signature(URL, list(PARAMS.items()), "12346") != EXPECTED


def test_the_default_port_may_be_present_or_not_and_nothing_else_varies() -> None:
    assert signed_url_variants("https://outbox.example/api/v1/webhooks/sms") == (
        "https://outbox.example/api/v1/webhooks/sms",
        "https://outbox.example:443/api/v1/webhooks/sms",
    )
    assert signed_url_variants("https://outbox.example:443/p/api/v1/webhooks/sms?x=1") == (
        "https://outbox.example:443/p/api/v1/webhooks/sms?x=1",
        "https://outbox.example/p/api/v1/webhooks/sms?x=1",
    )
    assert signed_url_variants("http://[::1]/hook") == ("http://[::1]/hook", "http://[::1]:80/hook")
    # another port is another URL: only itself
    assert signed_url_variants("https://outbox.example:8443/hook") == (
        "https://outbox.example:8443/hook",
    )
