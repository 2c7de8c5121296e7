"""The names every part of outbox shares: channels and lanes.

One place in Python, so that adding a channel or a lane is one edit here plus the
code that handles it. The SQL schema checks the same names (``outbox.enqueue``,
the recipient and channel-state constraints: a new name there needs a migration);
``tests/unit/test_vocabulary.py`` holds the two in step.
"""

from __future__ import annotations

from typing import Literal

ChannelName = Literal["email", "telegram", "push", "inapp"]
CHANNELS: tuple[ChannelName, ...] = ("email", "telegram", "push", "inapp")
"""Delivery channels, in the default fallback order's spelling (not its order)."""

LaneName = Literal["transactional", "campaign"]
LANES: tuple[LaneName, ...] = ("transactional", "campaign")
"""``transactional`` (alerts, priority 0-99) goes before ``campaign`` (100-199)."""

PRIORITY_RANGES: dict[str, range] = {"transactional": range(0, 100), "campaign": range(100, 200)}
"""The priorities a lane's messages may have; lower is more urgent."""

__all__ = ["CHANNELS", "LANES", "PRIORITY_RANGES", "ChannelName", "LaneName"]
