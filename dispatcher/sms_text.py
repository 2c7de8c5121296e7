r"""How many SMS segments a text takes: GSM-7 when every character has a septet, else UCS-2.

A single SMS carries 140 bytes: 160 GSM-7 septets or 70 UCS-2 code units. A longer
text is sent as a concatenated SMS whose every part gives 6 bytes to the
concatenation header, leaving 153 septets or 67 code units per segment. Carriers
bill (and Twilio counts) per segment, so a long alert costs several messages.

GSM-7 (3GPP TS 23.038): the characters of the basic table take one septet; those
of the extension table (``^ { } \ [ ~ ] |``, ``€`` and form feed) take two (an
escape and the character). One character outside both tables (an emoji, a Cyrillic
letter, a curly quote) switches the whole message to UCS-2, where every UTF-16 code
unit counts: an emoji outside the Basic Multilingual Plane takes two.

The count is the one a careful encoder makes: an escape pair or a surrogate pair is
never cut in two at a segment boundary, so a segment may end one unit short. That
is how phones and Twilio split too, and it can only add a segment compared with a
plain division, never save one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SmsEncoding = Literal["GSM-7", "UCS-2"]

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
"""The GSM 03.38 default alphabet (without the escape code itself)."""

GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")
"""Characters of the extension table: an escape septet plus their own."""

SINGLE_SEGMENT_UNITS: dict[SmsEncoding, int] = {"GSM-7": 160, "UCS-2": 70}
"""Septets (GSM-7) or UTF-16 code units (UCS-2) of a message sent as one SMS."""

CONCATENATED_SEGMENT_UNITS: dict[SmsEncoding, int] = {"GSM-7": 153, "UCS-2": 67}
"""The same per segment of a concatenated SMS (the rest is its header)."""


@dataclass(frozen=True, kw_only=True)
class SmsSegments:
    """What a text costs as SMS."""

    encoding: SmsEncoding
    units: int
    """Septets for GSM-7, UTF-16 code units for UCS-2."""
    segments: int


def encoding_of(text: str) -> SmsEncoding:
    """GSM-7 when every character of ``text`` is in the GSM tables, else UCS-2."""
    if all(char in GSM7_BASIC or char in GSM7_EXTENSION for char in text):
        return "GSM-7"
    return "UCS-2"


def _cost(char: str, encoding: SmsEncoding) -> int:
    if encoding == "GSM-7":
        return 2 if char in GSM7_EXTENSION else 1
    return 2 if ord(char) > 0xFFFF else 1


def count_segments(text: str) -> SmsSegments:
    """Encoding, length in units and number of segments of ``text`` (0 for no text)."""
    encoding = encoding_of(text)
    costs = [_cost(char, encoding) for char in text]
    units = sum(costs)
    if units == 0:
        return SmsSegments(encoding=encoding, units=0, segments=0)
    if units <= SINGLE_SEGMENT_UNITS[encoding]:
        return SmsSegments(encoding=encoding, units=units, segments=1)
    room = CONCATENATED_SEGMENT_UNITS[encoding]
    segments, used = 1, 0
    for cost in costs:
        if used + cost > room:  # a pair that does not fit starts the next segment
            segments, used = segments + 1, 0
        used += cost
    return SmsSegments(encoding=encoding, units=units, segments=segments)
