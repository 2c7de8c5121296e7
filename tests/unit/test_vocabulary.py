"""outbox.vocabulary and the SQL schema name the same channels and lanes."""

from __future__ import annotations

import re

from outbox._queries import read_sql_file
from outbox.vocabulary import CHANNELS, LANES, PRIORITY_RANGES

SCHEMA = read_sql_file("schema.sql")
QUOTED_LIST = re.compile(r"(?:IN \(|ARRAY\[)((?:'[a-z_]+'(?:, )?)+)[)\]]")


def _lists() -> list[tuple[str, ...]]:
    return [
        tuple(item.strip("'") for item in match.group(1).split(", "))
        for match in QUOTED_LIST.finditer(SCHEMA)
    ]


def test_every_channel_list_of_the_schema_is_the_vocabulary() -> None:
    channel_lists = [names for names in _lists() if "email" in names]
    assert len(channel_lists) >= 5  # recipients, channel_state, enqueue, enqueue_many
    assert all(names == CHANNELS for names in channel_lists)


def test_every_lane_list_of_the_schema_is_the_vocabulary() -> None:
    lane_lists = [names for names in _lists() if "campaign" in names]
    assert len(lane_lists) >= 2  # enqueue, enqueue_many
    assert all(names == LANES for names in lane_lists)


def test_every_lane_has_a_priority_range_and_alerts_come_first() -> None:
    assert set(PRIORITY_RANGES) == set(LANES)
    assert max(PRIORITY_RANGES["transactional"]) < min(PRIORITY_RANGES["campaign"])
