"""The names every part of outbox shares: channels and lanes.

Channels are data: the database's ``outbox.channel`` lists them, the built-in ones
below and whatever plugins registered (``outbox.register_channel``); enqueue checks a
name against that table, never against this list. :data:`CHANNELS` names the
built-ins (the rows ``outbox_0010`` seeds, ``tests/unit/test_vocabulary.py`` holds
the two in step); nothing may reject a channel for not being in it.
"""

from __future__ import annotations

import re
from typing import Literal

ChannelName = Literal["email", "telegram", "push", "inapp", "sms"]
CHANNELS: tuple[ChannelName, ...] = ("email", "telegram", "push", "inapp", "sms")
"""The built-in delivery channels, the rows ``outbox_0010`` seeds (plugins may
register more)."""

CHANNEL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
"""What a channel name may be (``outbox.channel``'s check): it names a template
folder, a metric label and a key of ``OUTBOX_RATE_LIMITS``."""

LaneName = Literal["transactional", "campaign"]
LANES: tuple[LaneName, ...] = ("transactional", "campaign")
"""``transactional`` (alerts, priority 0-99) goes before ``campaign`` (100-199)."""

PRIORITY_RANGES: dict[str, range] = {"transactional": range(0, 100), "campaign": range(100, 200)}
"""The priorities a lane's messages may have; lower is more urgent."""

UNMUTABLE_PREFIX = "position_failure_"
"""Topics (template names) that must keep at least one channel: a failed stop-loss,
take-profit or entry reaches the trader whatever their preferences say."""

__all__ = [
    "CHANNELS",
    "CHANNEL_NAME",
    "LANES",
    "PRIORITY_RANGES",
    "UNMUTABLE_PREFIX",
    "ChannelName",
    "LaneName",
]
