"""outbox.vocabulary and the SQL schema name the same channels and lanes."""

from __future__ import annotations

import re

from outbox._queries import read_sql_file
from outbox.vocabulary import CHANNEL_NAME, CHANNELS, LANES, PRIORITY_RANGES

SCHEMA = read_sql_file("schema.sql")
QUOTED_LIST = re.compile(r"(?:IN \(|ARRAY\[)((?:'[a-z_]+'(?:, )?)+)[)\]]")
SEEDED = re.compile(r"INSERT INTO outbox\.channel \(name, builtin\)\s+VALUES ([^;]+);")


def _lists() -> list[tuple[str, ...]]:
    return [
        tuple(item.strip("'") for item in match.group(1).split(", "))
        for match in QUOTED_LIST.finditer(SCHEMA)
    ]


def test_no_constraint_or_function_of_the_schema_lists_the_channels() -> None:
    """Channels are data (outbox.channel): a list of their names in SQL would refuse
    a plugin's channel."""
    assert [names for names in _lists() if "email" in names or "telegram" in names] == []


def test_the_built_in_channels_are_the_rows_the_schema_seeds() -> None:
    match = SEEDED.search(SCHEMA)
    assert match is not None, "schema.sql seeds no channels"
    seeded = re.findall(r"\('([a-z_]+)', true\)", match.group(1))
    # every built-in is seeded, sms included (its channel module is built in)
    assert set(seeded) == set(CHANNELS)
    assert all(CHANNEL_NAME.match(name) for name in seeded)


def test_every_lane_list_of_the_schema_is_the_vocabulary() -> None:
    lane_lists = [names for names in _lists() if "campaign" in names]
    assert len(lane_lists) >= 2  # enqueue, enqueue_many
    assert all(names == LANES for names in lane_lists)


def test_every_lane_has_a_priority_range_and_alerts_come_first() -> None:
    assert set(PRIORITY_RANGES) == set(LANES)
    assert max(PRIORITY_RANGES["transactional"]) < min(PRIORITY_RANGES["campaign"])
