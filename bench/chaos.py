"""``python -m bench chaos``: crash everything while messages flow; lose nothing.

The run starts its own throwaway PostgreSQL (never the machine's shared server),
migrates it, and adds a ledger table. Then, at the same time:

- 8 producer connections enqueue through ``outbox.enqueue_async``, a few messages
  per transaction; each transaction also writes its message ids into the ledger
  and then commits, or (30% of them) rolls back. A share of the messages (20%) are
  alerts: ``escalate_after`` a few seconds and a chain of two or three channels
  (email, Telegram, push in a random order); some (15%) have a ``send_at`` a few
  seconds ahead;
- the producer side also reacts to what it committed, on its own connections:
  it cancels some messages (15%) 0-2 s after their commit
  (``outbox.cancel_async``: True mostly for the scheduled ones, since an unscheduled
  message is claimed within milliseconds), acknowledges some alerts (half of them) at random
  moments, trying again while the answer is False (``outbox.acknowledge_async``),
  and leaves the other alerts unacknowledged so that they escalate to their
  chain's end; a share of these transactions rolls back too (``--rollback``);
- 3 ``outbox dispatch`` subprocesses deliver to a loopback recording sink (the
  file recorder channels of ``tests/support``, one per channel: one JSON line per
  send);
- a chaos loop SIGKILLs a random dispatcher every few seconds and starts a new one,
  terminates dispatcher backends with ``pg_terminate_backend``, and once, half-way
  through, crashes PostgreSQL (``pg_ctl stop -m immediate``) and starts it again.

Then the chaos stops and the dispatchers drain the queue. The ledger says what was
committed, outbox.attempt what was cancelled, acknowledged and escalated, the sink
what was delivered:

- lost: committed, not cancelled, and not delivered on its first channel; or an
  alert nobody acknowledged that did not reach every channel of its chain in order
  (an acknowledged one: the channels it reached are the start of its chain);
- phantom: delivered but never committed (a rolled-back transaction's message, a
  delivery without a known token), or cancelled (a cancel that returned True and
  committed), or delivered on a channel outside its chain;
- duplicates: deliveries beyond the first of a message on a channel;
- stuck: committed and still in the outbox after the drain (pending, sending,
  dead, or an alert whose escalation is still due), except an unacknowledged alert
  waiting at its chain's end (``awaiting_ack``, ``next_attempt_at = 'infinity'``);
- escalated after acknowledgement: an escalation hop claimed after the
  acknowledgement of its alert committed: its ``escalated`` attempt logged after the
  ``acknowledged`` one, or later than the database's ``clock_timestamp()`` read
  right after the acknowledgement's commit, or a delivery on that hop after that
  moment without such a claim before it;
- early escalations: a hop delivered less than ``escalate_after`` after the first
  delivery on the channel before it.

It exits 1 unless lost = phantom = stuck = escalated after acknowledgement = early
escalations = 0, no acknowledged commit is missing from the ledger, no confirmed
cancel or acknowledgement is missing from the database (and the database has none
the producer side saw refused or rolled back), and every duplicated message was in
flight (leased, sent, not yet acknowledged) at a SIGKILL or at the PostgreSQL
crash, so duplicates <= messages in flight at the kills.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bench._common import SEED_ADDRESSES
from outbox import acknowledge_async, cancel_async, enqueue_async
from tests.support.pg_cluster import ThrowawayCluster

ROOT = Path(__file__).resolve().parents[1]
OUTBOX = str(Path(sys.executable).with_name("outbox"))
USERS = 1000
CHANNELS = ("email", "telegram", "push")
ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.085",
    "current_price": "1.086",
    "condition": "above",
}
DISPATCHER_APPS = ("outbox-dispatcher", "outbox-listener")
# The run keys every message on a token that only the producer's transaction writes
# (into the message's vars, rendered into what each channel shows first: an email's
# subject, the Telegram text, a push title; and into the ledger), never on the
# message id: after a crash PostgreSQL may hand out again identity values that a
# rolled-back transaction had used (a rollback does not flush the sequence's WAL),
# and a reissued id made a committed message look like a rolled-back one. Letters
# and digits only: Telegram's MarkdownV2 escapes '-' and '_'.
TOKEN = re.compile(r"chaos[0-9a-f]{32}")
TOKEN_SQL = "substring(vars->>'instrument' from 'chaos[0-9a-f]{32}')"
# A hop delivered this much sooner than escalate_after after the one before it is
# early (the sink's time.time() in two processes against the claim's now()).
EARLY_TOLERANCE = 0.05


@dataclass(frozen=True, kw_only=True)
class ChaosConfig:
    """What one chaos run does."""

    messages: int = 50_000
    seconds: float = 120.0
    producers: int = 8
    dispatchers: int = 3
    rollback: float = 0.3
    alerts: float = 0.2
    """Share of the messages enqueued as alerts (escalate_after, a chain of 2-3)."""
    escalate_after: tuple[float, float] = (2.0, 4.0)
    """Each alert's escalate_after, uniform in this range (seconds)."""
    acknowledge: float = 0.5
    """Share of the committed alerts the producer side tries to acknowledge."""
    cancel: float = 0.15
    """Share of the committed messages the producer side tries to cancel."""
    scheduled: float = 0.15
    """Share of the messages enqueued with a send_at 0.5-3 s ahead (what a cancel
    still finds pending: an unscheduled message is claimed within milliseconds)."""
    reaction_connections: int = 4
    """Connections the cancels and acknowledgements share."""
    kill_every: tuple[float, float] = (2.0, 5.0)
    terminate_every: tuple[float, float] = (3.0, 8.0)
    restart_postgres: bool = True
    lease_seconds: float = 10.0
    concurrency: int = 16
    send_delay: float = 0.01
    min_age: float = 3.0
    drain_timeout: float = 180.0
    seed: int | None = None
    workdir: Path | None = None
    verbose: bool = True


@dataclass(kw_only=True)
class ChaosReport:
    """The figures of one run."""

    committed: int = 0
    alerts: int = 0
    chains: dict[int, int] = field(default_factory=dict)
    delivered: int = 0
    sends: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    lost_first: int = 0
    lost_chain: int = 0
    out_of_order: int = 0
    phantom: int = 0
    phantom_rolled_back: int = 0
    phantom_cancelled: int = 0
    phantom_off_chain: int = 0
    duplicates: int = 0
    stuck: int = 0
    dead: int = 0
    waiting_at_chain_end: int = 0
    in_flight_at_kills: int = 0
    duplicates_outside_kills: int = 0
    lost_commits: int = 0
    contradicted: int = 0
    escalations: int = 0
    escalated_after_ack: int = 0
    early_escalations: int = 0
    cancel_answers: dict[str, int] = field(default_factory=dict)
    cancelled: int = 0
    ack_alerts: int = 0
    ack_answers: dict[str, int] = field(default_factory=dict)
    acknowledged: int = 0
    acked_after_hops: dict[int, int] = field(default_factory=dict)
    acked_in_flight: int = 0
    transactions_committed: int = 0
    transactions_rolled_back: int = 0
    transactions_failed: int = 0
    commits_unknown: int = 0
    sigkills: int = 0
    terminations: int = 0
    backends_terminated: int = 0
    postgres_restarts: int = 0
    postgres_down_seconds: float = 0.0
    unexpected_exits: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    produce_seconds: float = 0.0
    drain_seconds: float = 0.0
    total_seconds: float = 0.0
    workdir: str = ""

    @property
    def ok(self) -> bool:
        """Whether the run kept every promise."""
        return (
            self.committed > 0
            and self.lost == 0
            and self.phantom == 0
            and self.stuck == 0
            and self.escalated_after_ack == 0
            and self.early_escalations == 0
            and self.lost_commits == 0
            and self.contradicted == 0
            and self.duplicates <= self.in_flight_at_kills
            and self.duplicates_outside_kills == 0
            and not self.unexpected_exits
        )

    def table(self) -> str:
        """The figures as aligned text."""
        chains = ", ".join(f"{n} of {length}" for length, n in sorted(self.chains.items()))
        sends = ", ".join(f"{channel} {n}" for channel, n in sorted(self.sends.items()))
        hops = ", ".join(f"{n} after {h}" for h, n in sorted(self.acked_after_hops.items()))
        rows = [
            (
                "committed",
                self.committed,
                f"transactions: {self.transactions_committed} committed, "
                f"{self.transactions_rolled_back} rolled back, {self.transactions_failed} failed"
                f" ({self.commits_unknown} with an unknown commit outcome); "
                f"{self.alerts} alerts (chains: {chains or 'none'})",
            ),
            ("delivered", self.delivered, f"distinct messages the sink received; sends: {sends}"),
            (
                "lost",
                self.lost,
                f"not on its first channel {self.lost_first}; unacknowledged alert short of "
                f"its chain's end {self.lost_chain}; hops out of order {self.out_of_order}",
            ),
            (
                "phantom",
                self.phantom,
                f"rolled back or unknown {self.phantom_rolled_back}; cancelled "
                f"{self.phantom_cancelled}; off its chain {self.phantom_off_chain}",
            ),
            (
                "duplicates",
                self.duplicates,
                f"in flight at kills: {self.in_flight_at_kills}; "
                f"duplicates outside that set: {self.duplicates_outside_kills}",
            ),
            (
                "stuck",
                self.stuck,
                f"still in the outbox after the drain ({self.dead} dead); "
                f"{self.waiting_at_chain_end} alerts wait at their chain's end, as they may",
            ),
            (
                "esc. after ack",
                self.escalated_after_ack,
                f"escalation hops claimed after their acknowledgement committed "
                f"(of {self.escalations} escalations)",
            ),
            (
                "early esc.",
                self.early_escalations,
                "hops delivered sooner than escalate_after after the one before",
            ),
            (
                "lost commits",
                self.lost_commits,
                "acknowledged commits missing from the ledger; "
                f"cancels or acknowledgements the database contradicts: {self.contradicted}",
            ),
        ]
        lines = [f"{name:<15}{value:>8}   {note}" for name, value, note in rows]
        lines.append(
            "cancel: "
            + _answers(self.cancel_answers)
            + f"; cancelled per outbox.attempt: {self.cancelled}"
        )
        lines.append(
            f"acknowledge: {self.ack_alerts} alerts tried, calls "
            + _answers(self.ack_answers)
            + f"; acknowledged per outbox.attempt: {self.acknowledged} "
            f"({hops or 'none'} hop(s) delivered; {self.acked_in_flight} while a hop was "
            "in flight)"
        )
        lines.append(
            f"chaos: {self.sigkills} SIGKILLs, {self.terminations} pg_terminate_backend rounds "
            f"({self.backends_terminated} backends), {self.postgres_restarts} PostgreSQL crash "
            f"restart (down {self.postgres_down_seconds:.1f} s)"
        )
        lines.append(
            f"time: produce {self.produce_seconds:.1f} s, drain {self.drain_seconds:.1f} s, "
            f"total {self.total_seconds:.1f} s"
        )
        if self.unexpected_exits:
            lines.append("unexpected dispatcher exits: " + "; ".join(self.unexpected_exits))
        lines.extend(f"  e.g. {example}" for example in self.examples)
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def _answers(answers: dict[str, int]) -> str:
    order = ("true", "false", "rolled back", "failed", "unknown")
    return ", ".join(f"{answers[a]} {a}" for a in order if answers.get(a)) or "none"


class _Dispatchers:
    """The dispatcher subprocesses, one per slot; a killed one is replaced."""

    def __init__(self, config: ChaosConfig, url: str, workdir: Path, record: Path) -> None:
        self.config = config
        self.url = url
        self.workdir = workdir
        self.record = record
        self.slots: list[tuple[str, subprocess.Popen[bytes]] | None] = [None] * config.dispatchers
        self.generation = 0
        self.started = [0.0] * config.dispatchers
        self.unexpected: list[str] = []

    def spawn(self, slot: int) -> str:
        self.generation += 1
        name = f"chaos-d{slot}-g{self.generation}"
        env = {
            **os.environ,
            "OUTBOX_DATABASE_URL": self.url,
            "OUTBOX_DISPATCHER_ID": name,
            "OUTBOX_CHANNEL_PLUGINS": ",".join(
                f"{channel}=tests.support.channels:file_{channel}" for channel in CHANNELS
            ),
            "OUTBOX_TEST_RECORD_FILE": str(self.record),
            "OUTBOX_RATE_LIMITS": "off",
            "OUTBOX_LEASE_SECONDS": str(self.config.lease_seconds),
            "OUTBOX_TEST_SEND_DELAY": str(self.config.send_delay),
            "PYTHONPATH": str(ROOT),
        }
        with open(self.workdir / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                [OUTBOX, "dispatch", "--concurrency", str(self.config.concurrency)],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=log,
            )
        self.slots[slot] = (name, process)
        self.started[slot] = time.monotonic()
        return name

    def victims(self, min_age: float) -> list[int]:
        """Slots whose dispatcher has run at least ``min_age`` seconds (so it is busy)."""
        now = time.monotonic()
        return [
            slot
            for slot, entry in enumerate(self.slots)
            if entry is not None and now - self.started[slot] >= min_age
        ]

    def kill(self, slot: int) -> str:
        entry = self.slots[slot]
        assert entry is not None
        name, process = entry
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        self.slots[slot] = None
        return name

    def check(self) -> None:
        """Replace (and remember) any dispatcher that exited on its own."""
        for slot, entry in enumerate(self.slots):
            if entry is not None and entry[1].poll() is not None:
                self.unexpected.append(f"{entry[0]} exited with {entry[1].returncode}")
                self.spawn(slot)

    def stop(self) -> None:
        for entry in self.slots:
            if entry is not None and entry[1].poll() is None:
                entry[1].send_signal(signal.SIGTERM)
        for slot, entry in enumerate(self.slots):
            if entry is None:
                continue
            name, process = entry
            stacks = ""
            try:
                code = process.wait(30)
            except subprocess.TimeoutExpired:
                # where is it stuck? the dispatcher prints every thread's stack on
                # SIGUSR1 (faulthandler), into its log; the report carries the tail
                process.send_signal(signal.SIGUSR1)
                time.sleep(2)
                process.kill()
                code = process.wait(10)
                log = (self.workdir / f"{name}.log").read_text(errors="replace")
                stacks = "\n    its log's end (stacks at SIGUSR1):\n" + "\n".join(
                    "      " + line for line in log.splitlines()[-60:]
                )
            if code != 0:
                self.unexpected.append(f"{name} exited with {code} at SIGTERM{stacks}")
            self.slots[slot] = None


@dataclass(frozen=True)
class _Planned:
    """One committed message, as its producer wrote it."""

    token: str
    message_id: int
    chain: tuple[str, ...]
    escalate_after: float | None
    ahead: float = 0.0
    """Seconds from the enqueue to its send_at (0: none)."""


@dataclass
class _AckLog:
    """What the producer side saw of one alert's acknowledgement."""

    answers: list[str] = field(default_factory=list)
    answer: str = ""
    """"true" (committed), "unknown" (the commit's outcome was lost), else ""."""
    at: datetime | None = None
    """Upper bound of the commit: clock_timestamp() right after it (the wall clock
    when the database could not be asked, or when the outcome was lost)."""


Call = Callable[[psycopg.AsyncConnection[Any], int], Awaitable[bool]]


class _Reactions:
    """Cancels and acknowledgements of committed messages, at random moments."""

    def __init__(self, config: ChaosConfig, url: str, rng: random.Random) -> None:
        self.config = config
        self.url = url
        self.rng = rng
        self.pool: asyncio.Queue[psycopg.AsyncConnection[Any] | None] = asyncio.Queue()
        for _ in range(config.reaction_connections):
            self.pool.put_nowait(None)
        self.tasks: set[asyncio.Task[None]] = set()
        self.cancels: dict[str, str] = {}  # token -> its cancel's last answer
        self.cancel_answers: Counter[str] = Counter()
        self.acks: dict[str, _AckLog] = {}
        self.ack_answers: Counter[str] = Counter()

    def schedule(self, planned: _Planned) -> None:
        """Decide what happens to a message that just committed."""
        if self.rng.random() < self.config.cancel:
            self._spawn(self._cancel(planned, self.rng.uniform(0.0, 2.0)))
        if planned.escalate_after is not None and self.rng.random() < self.config.acknowledge:
            # from before its first send to after its chain's end
            window = planned.ahead + planned.escalate_after * len(planned.chain) + 2.0
            self._spawn(self._acknowledge(planned, self.rng.uniform(0.0, window), window))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def wait(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks))
        while not self.pool.empty():
            conn = self.pool.get_nowait()
            if conn is not None:
                await conn.close()

    async def _cancel(self, planned: _Planned, delay: float) -> None:
        await asyncio.sleep(delay)
        for _ in range(10):
            answer, _at = await self._call(cancel_async, planned.message_id)
            self.cancel_answers[answer] += 1
            self.cancels[planned.token] = answer
            if answer != "failed":
                return
            await asyncio.sleep(0.3)

    async def _acknowledge(self, planned: _Planned, delay: float, window: float) -> None:
        """Acknowledge at ``delay`` after the commit; while the answer is not True
        (not sent yet, rolled back, failed), try again until ``window`` is over."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + window
        await asyncio.sleep(delay)
        log = self.acks.setdefault(planned.token, _AckLog())
        while True:
            answer, at = await self._call(acknowledge_async, planned.message_id)
            self.ack_answers[answer] += 1
            log.answers.append(answer)
            if answer in ("true", "unknown"):
                log.answer, log.at = answer, at
                return
            if loop.time() >= deadline:
                return
            await asyncio.sleep(self.rng.uniform(0.3, 1.0))

    async def _call(self, call: Call, message_id: int) -> tuple[str, datetime | None]:
        """One transaction of ``call``: "true" and the time just after its commit,
        "false", "rolled back" (on purpose), "failed" (never reached COMMIT) or
        "unknown" (COMMIT sent, its answer lost) and the wall clock then."""
        conn = await self.pool.get()
        try:
            if conn is None or conn.closed:
                try:
                    conn = await psycopg.AsyncConnection.connect(self.url, connect_timeout=5)
                except psycopg.OperationalError:
                    await asyncio.sleep(0.2)
                    return "failed", None
            try:
                answer = await call(conn, message_id)
            except psycopg.OperationalError:
                await conn.close()
                return "failed", None
            if self.rng.random() < self.config.rollback:
                try:
                    await conn.rollback()
                except psycopg.OperationalError:
                    await conn.close()
                return "rolled back", None
            try:
                await conn.commit()
            except psycopg.OperationalError:
                await conn.close()
                return ("unknown", datetime.now(UTC)) if answer else ("false", None)
            if not answer:
                return "false", None
            try:
                row = await (await conn.execute("SELECT clock_timestamp()")).fetchone()
                await conn.rollback()
            except psycopg.OperationalError:
                await conn.close()
                return "true", datetime.now(UTC)
            assert row is not None
            return "true", row[0]
        finally:
            self.pool.put_nowait(conn if conn is not None and not conn.closed else None)


class _Producers:
    """Producer transactions and what each of them saw."""

    def __init__(
        self, config: ChaosConfig, url: str, rng: random.Random, reactions: _Reactions
    ) -> None:
        self.config = config
        self.url = url
        self.rng = rng
        self.reactions = reactions
        self.acked: set[str] = set()
        self.rolled_back: set[str] = set()
        self.unknown: set[str] = set()
        self.committed_tx = 0
        self.rolled_back_tx = 0
        self.failed_tx = 0

    async def run(self) -> None:
        quota = self.config.messages
        shares = [quota // self.config.producers] * self.config.producers
        for i in range(quota % self.config.producers):
            shares[i] += 1
        await asyncio.gather(*(self._producer(i, share) for i, share in enumerate(shares)))

    async def _producer(self, number: int, share: int) -> None:
        rate = share / self.config.seconds if self.config.seconds > 0 else float("inf")
        started = time.monotonic()
        committed = 0
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            while committed < share:
                ahead = committed / rate - (time.monotonic() - started) if rate else 0
                if ahead > 0:
                    await asyncio.sleep(min(ahead, 0.5))
                if conn is None or conn.closed:
                    conn = await self._connect()
                    if conn is None:
                        continue
                committed += await self._transaction(
                    conn, number, min(self.rng.randint(1, 4), share - committed)
                )
        finally:
            if conn is not None:
                await conn.close()

    async def _connect(self) -> psycopg.AsyncConnection[Any] | None:
        try:
            return await psycopg.AsyncConnection.connect(self.url, connect_timeout=5)
        except psycopg.OperationalError:
            await asyncio.sleep(0.2)
            return None

    def _plan(self) -> tuple[tuple[str, ...], float | None, float]:
        """A message's chain, its escalate_after if it is an alert, and how far
        ahead its send_at lies (0: none)."""
        ahead = self.rng.uniform(0.5, 3.0) if self.rng.random() < self.config.scheduled else 0.0
        if self.rng.random() >= self.config.alerts:
            return ("email",), None, ahead
        first = self.rng.choice(CHANNELS)
        rest = [channel for channel in CHANNELS if channel != first]
        self.rng.shuffle(rest)
        chain = (first, *rest[: self.rng.randint(1, 2)])
        return chain, round(self.rng.uniform(*self.config.escalate_after), 2), ahead

    async def _transaction(self, conn: psycopg.AsyncConnection[Any], number: int, size: int) -> int:
        ids: list[str] = []  # the messages' tokens
        planned: list[_Planned] = []
        try:
            for _ in range(size):
                token = f"chaos{uuid.uuid4().hex}"
                ids.append(token)
                chain, escalate_after, ahead = self._plan()
                message_id = await enqueue_async(
                    conn,
                    user_id=f"u{self.rng.randint(1, USERS)}",
                    channel=chain[0],
                    template="price_alert",
                    vars={**ALERT, "instrument": f"EURUSD {token}"},
                    fallback=list(chain[1:]) if escalate_after is not None else None,
                    escalate_after=escalate_after,
                    send_at=datetime.now(UTC) + timedelta(seconds=ahead) if ahead else None,
                )
                planned.append(_Planned(token, message_id, chain, escalate_after, ahead))
            await conn.execute(
                "INSERT INTO chaos_ledger (token, message_id, producer, chain, escalate_after)"
                " SELECT unnest(%s::text[]), unnest(%s::bigint[]), %s, unnest(%s::text[]),"
                "        unnest(%s::float8[])",
                [
                    ids,
                    [p.message_id for p in planned],
                    number,
                    [",".join(p.chain) for p in planned],
                    [p.escalate_after for p in planned],
                ],
            )
        except psycopg.OperationalError:
            self.failed_tx += 1
            self.rolled_back.update(ids)  # never reached COMMIT: cannot have committed
            await conn.close()
            return 0
        if self.rng.random() < self.config.rollback:
            try:
                await conn.rollback()
            except psycopg.OperationalError:
                await conn.close()
            self.rolled_back.update(ids)
            self.rolled_back_tx += 1
            return 0
        try:
            await conn.commit()
        except psycopg.OperationalError:
            self.failed_tx += 1
            self.unknown.update(ids)  # the ledger knows whether COMMIT happened
            await conn.close()
            return 0
        self.acked.update(ids)
        self.committed_tx += 1
        for message in planned:
            self.reactions.schedule(message)
        return size


class ChaosRun:
    """One run: ``report = await ChaosRun(config).run()``."""

    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.report = ChaosReport()
        self.at_risk: set[str] = set()
        # (from, to) wall-clock windows around PostgreSQL crashes; see _crash_postgres
        self.crash_windows: list[tuple[float, float]] = []
        self.cluster: ThrowawayCluster | None = None
        self._example_kinds: Counter[str] = Counter()

    def say(self, text: str) -> None:
        if self.config.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    async def run(self) -> ChaosReport:
        started = time.monotonic()
        self.cluster = ThrowawayCluster(prefix="outbox-chaos-")
        workdir = self.config.workdir or self.cluster.root / "run"
        workdir.mkdir(parents=True, exist_ok=True)
        self.report.workdir = str(workdir)
        record = workdir / "deliveries.jsonl"
        record.touch()
        dispatchers: _Dispatchers | None = None
        try:
            self.cluster.start()
            url = self.cluster.create_database("outbox")
            self._prepare(url)
            self.say(f"PostgreSQL on port {self.cluster.port}; work folder {workdir}")
            dispatchers = _Dispatchers(self.config, url, workdir, record)
            for slot in range(self.config.dispatchers):
                dispatchers.spawn(slot)
            reactions = _Reactions(self.config, url, self.rng)
            producers = _Producers(self.config, url, self.rng, reactions)
            produce = asyncio.create_task(self._produce(producers, reactions))
            await self._chaos(url, dispatchers, produce)
            await produce
            self.report.produce_seconds = time.monotonic() - started
            self.say(
                f"producers done: {len(producers.acked)} acknowledged commits, "
                f"cancel answers {dict(reactions.cancel_answers)}, "
                f"acknowledge answers {dict(reactions.ack_answers)}; draining"
            )
            drain_started = time.monotonic()
            await self._drain(url, dispatchers)
            self.report.drain_seconds = time.monotonic() - drain_started
            dispatchers.stop()
            self._tally(url, producers, reactions, record)
        finally:
            if dispatchers is not None:
                dispatchers.stop()
                self.report.unexpected_exits = dispatchers.unexpected
            if self.config.workdir is None and self.report.ok:
                self.cluster.destroy()
            else:
                with contextlib.suppress(RuntimeError):
                    self.cluster.stop("fast")
                self.say(f"kept {self.cluster.root} for inspection")
        self.report.total_seconds = time.monotonic() - started
        return self.report

    async def _produce(self, producers: _Producers, reactions: _Reactions) -> None:
        """The producers' transactions, then the last of their cancels and
        acknowledgements (the chaos goes on until both are done)."""
        await producers.run()
        await reactions.wait()

    def _prepare(self, url: str) -> None:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(
                "CREATE TABLE chaos_ledger (token text PRIMARY KEY, message_id bigint NOT NULL,"
                " producer integer NOT NULL, committed_at timestamptz NOT NULL DEFAULT now(),"
                " chain text NOT NULL, escalate_after float8)"
            )
            # every user is reachable on every channel, so an alert's chain is exactly
            # its channel and its fallback list
            admin.execute(SEED_ADDRESSES, {"users": USERS, "chat_offset": 0})
            admin.execute(
                "INSERT INTO outbox.push_subscription (user_id, endpoint, p256dh, auth)"
                " SELECT 'u' || g, 'https://push.example.com/s/' || g, 'p256dh', 'auth'"
                "   FROM generate_series(1, %s) g",
                [USERS],
            )

    # ------------------------------------------------------------------ chaos

    async def _chaos(
        self, url: str, dispatchers: _Dispatchers, produce: asyncio.Task[None]
    ) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        next_kill = start + self.rng.uniform(*self.config.kill_every)
        next_terminate = start + self.rng.uniform(*self.config.terminate_every)
        restart_at = start + self.config.seconds / 2 if self.config.restart_postgres else None
        while not produce.done() or loop.time() - start < self.config.seconds:
            now = loop.time()
            dispatchers.check()
            if restart_at is not None and now >= restart_at:
                await self._crash_postgres(url)
                restart_at = None
            elif now >= next_kill:
                await self._sigkill(url, dispatchers)
                next_kill = loop.time() + self.rng.uniform(*self.config.kill_every)
            elif now >= next_terminate:
                await self._terminate(url)
                next_terminate = loop.time() + self.rng.uniform(*self.config.terminate_every)
            await asyncio.sleep(0.1)
            if produce.done() and produce.exception() is not None:
                return

    async def _query_ids(self, url: str, sql: str, params: list[Any]) -> set[Any]:
        for _ in range(100):
            try:
                async with await psycopg.AsyncConnection.connect(
                    url, autocommit=True, connect_timeout=5
                ) as admin:
                    rows = await (await admin.execute(sql, params)).fetchall()
                    return {row[0] for row in rows}
            except psycopg.OperationalError:
                await asyncio.sleep(0.1)
        raise RuntimeError("the chaos run cannot reach its own database")

    async def _sigkill(self, url: str, dispatchers: _Dispatchers) -> None:
        candidates = dispatchers.victims(self.config.min_age)
        if not candidates:
            return
        slot = self.rng.choice(candidates)
        name = dispatchers.kill(slot)
        held = await self._query_ids(
            url,
            f"SELECT {TOKEN_SQL} FROM outbox.message WHERE status = 'sending' AND leased_by = %s",
            [name],
        )
        self.at_risk |= held
        self.report.sigkills += 1
        self.say(f"SIGKILL {name}: {len(held)} messages in flight")
        dispatchers.spawn(slot)

    async def _terminate(self, url: str) -> None:
        count = self.rng.randint(1, 3)
        killed = await self._query_ids(
            url,
            "SELECT pid FROM (SELECT pid FROM pg_stat_activity"
            "                  WHERE datname = current_database() AND application_name = ANY(%s)"
            "                  ORDER BY random() LIMIT %s) AS victim"
            " WHERE pg_terminate_backend(pid)",
            [list(DISPATCHER_APPS), count],
        )
        self.report.terminations += 1
        self.report.backends_terminated += len(killed)
        self.say(f"pg_terminate_backend: {len(killed)} dispatcher backends")

    async def _crash_postgres(self, url: str) -> None:
        assert self.cluster is not None
        sending = f"SELECT {TOKEN_SQL} FROM outbox.message WHERE status = 'sending'"
        window_start = time.time()
        self.at_risk |= await self._query_ids(url, sending, [])
        down = time.monotonic()
        await asyncio.to_thread(self.cluster.stop, "immediate")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(self.cluster.start)
        self.report.postgres_down_seconds = time.monotonic() - down
        self.report.postgres_restarts += 1
        self.at_risk |= await self._query_ids(url, sending, [])
        # Claims commit without waiting for the WAL flush (by design: a lost claim only
        # returns messages to pending). A claim committed after the snapshot above, or
        # one whose message was sent while the server was down, can be lost by the
        # crash and its message sent again: a message first sent in this window was
        # in flight at the crash too.
        self.crash_windows.append((window_start, time.time() + 1.0))
        self.say(
            f"PostgreSQL crashed and restarted (down {self.report.postgres_down_seconds:.1f} s)"
        )

    # ------------------------------------------------------------------ drain and tally

    async def _drain(self, url: str, dispatchers: _Dispatchers) -> None:
        deadline = time.monotonic() + self.config.drain_timeout
        last = -1
        while time.monotonic() < deadline:
            dispatchers.check()
            # dead letters stay (stuck, see _tally); so do alerts waiting without a
            # deadline at their chain's end
            left = await self._query_ids(
                url,
                "SELECT count(*) FROM outbox.message WHERE status IN ('pending', 'sending')"
                " OR (status = 'awaiting_ack' AND next_attempt_at <> 'infinity')",
                [],
            )
            remaining = next(iter(left))
            if remaining == 0:
                return
            if remaining != last:
                self.say(f"draining: {remaining} left")
                last = remaining
            await asyncio.sleep(0.5)
        self.say("drain timed out")

    def _tally(self, url: str, producers: _Producers, reactions: _Reactions, record: Path) -> None:
        with psycopg.connect(url, autocommit=True) as admin:
            ledger: dict[str, tuple[int, tuple[str, ...], float | None]] = {
                token: (message_id, tuple(chain.split(",")), escalate_after)
                for token, message_id, chain, escalate_after in admin.execute(
                    "SELECT token, message_id, chain, escalate_after FROM chaos_ledger"
                )
            }
            remaining: dict[str, tuple[str, bool]] = {
                token: (status, waits_forever)
                for token, status, waits_forever in admin.execute(
                    f"SELECT {TOKEN_SQL}, status, next_attempt_at = 'infinity' FROM outbox.message"
                )
            }
            logged = admin.execute(
                "SELECT id, message_id, outcome, channel, created_at FROM outbox.attempt"
                " WHERE outcome IN ('cancelled', 'acknowledged', 'escalated') ORDER BY id"
            ).fetchall()
        report = self.report
        by_id = {message_id: token for token, (message_id, _, _) in ledger.items()}
        lines = record.read_text().splitlines()
        entries = [json.loads(line) for line in lines if line.endswith("}")]
        # deliveries: (token, channel) -> their times
        sends: dict[tuple[str, str], list[float]] = {}
        untokened = 0
        for entry in entries:
            token = _token(entry)
            if token is None:
                untokened += 1
                continue
            sends.setdefault((token, entry["channel"]), []).append(entry["received_at"])
        first = {key: min(times) for key, times in sends.items()}
        delivered = {token for token, _ in sends}
        report.sends = dict(Counter(entry["channel"] for entry in entries))
        # a message first sent on a channel inside a crash window was in flight at it
        self.at_risk |= {
            token
            for (token, _), sent_at in first.items()
            if any(start <= sent_at <= end for start, end in self.crash_windows)
        }

        # what outbox.attempt says: cancelled, acknowledged (the log row's id), escalated
        db_cancelled: set[str] = set()
        db_acked: dict[str, int] = {}
        escalated: dict[str, list[tuple[int, str, datetime]]] = {}
        for attempt_id, message_id, outcome, channel, created_at in logged:
            token = by_id.get(message_id)
            if token is None:
                continue  # not a committed message: its deliveries count as phantom
            if outcome == "cancelled":
                db_cancelled.add(token)
            elif outcome == "acknowledged":
                if token in db_acked:
                    report.contradicted += 1  # acknowledged twice
                    self._example(f"{token} acknowledged twice")
                db_acked.setdefault(token, attempt_id)
            else:
                escalated.setdefault(token, []).append((attempt_id, channel, created_at))
        report.escalations = sum(len(hops) for hops in escalated.values())

        # the producer side against the database
        confirmed_cancels = {t for t, answer in reactions.cancels.items() if answer == "true"}
        maybe_cancels = {t for t, answer in reactions.cancels.items() if answer == "unknown"}
        cancelled = db_cancelled | confirmed_cancels
        for token in confirmed_cancels - db_cancelled:
            report.contradicted += 1
            self._example(f"{token}: cancel returned True and committed; no 'cancelled' row")
        for token in db_cancelled - confirmed_cancels - maybe_cancels:
            report.contradicted += 1
            self._example(
                f"{token}: 'cancelled' row, but the cancel said {reactions.cancels.get(token)}"
            )
        ack_times = {t: log.at for t, log in reactions.acks.items() if log.answer}
        for token, log in reactions.acks.items():
            if log.answer == "true" and token not in db_acked:
                report.contradicted += 1
                self._example(f"{token}: acknowledge returned True and committed; no row")
        for token in set(db_acked) - set(ack_times):
            report.contradicted += 1
            self._example(
                f"{token}: 'acknowledged' row, but the calls said {reactions.acks.get(token)}"
            )

        # stuck: still in the outbox, except an unacknowledged alert at its chain's end
        report.committed = len(ledger)
        stuck: set[str] = set()
        for token, (status, waits_forever) in remaining.items():
            if token not in ledger:
                continue
            at_chain_end = (
                status == "awaiting_ack"
                and waits_forever
                and ledger[token][2] is not None
                and token not in db_acked
            )
            if at_chain_end:
                report.waiting_at_chain_end += 1
            else:
                stuck.add(token)
                report.dead += status == "dead"
                self._example(f"{token} stuck: {status}")
        report.stuck = len(stuck)

        # phantom: delivered though rolled back, unknown, cancelled, or off its chain
        unknown = delivered - set(ledger)
        report.phantom_rolled_back = (
            untokened + len(unknown) + len(producers.rolled_back & set(ledger))
        )
        for token in sorted(unknown)[:3]:
            self._example(f"{token} delivered, never committed")
        phantom_cancelled = delivered & cancelled
        report.phantom_cancelled = len(phantom_cancelled)
        for token in sorted(phantom_cancelled)[:3]:
            self._example(
                f"{token} delivered, cancelled ({reactions.cancels.get(token)}, "
                f"in flight at a kill: {token in self.at_risk})"
            )
        off_chain = {(t, c) for t, c in sends if t in ledger and c not in ledger[t][1]}
        report.phantom_off_chain = len(off_chain)
        report.phantom = (
            report.phantom_rolled_back + report.phantom_cancelled + report.phantom_off_chain
        )

        # lost: not where it had to go, in the order it had to go there
        lost: set[str] = set()
        for token, (_, chain, escalate_after) in ledger.items():
            if escalate_after is not None:
                report.alerts += 1
                report.chains[len(chain)] = report.chains.get(len(chain), 0) + 1
            if token in cancelled or token in stuck:
                continue
            reached = [(token, channel) in first for channel in chain]
            if not reached[0]:
                lost.add(token)
                report.lost_first += 1
                self._example(f"{token} never delivered on {chain[0]}")
                continue
            if escalate_after is None:
                continue
            hops = reached.index(False) if False in reached else len(chain)
            if any(reached[hops:]):
                lost.add(token)
                report.lost_chain += 1  # a hop skipped
                self._example(f"{token}: chain {chain}, reached {reached}")
            elif token not in db_acked and hops < len(chain):
                lost.add(token)
                report.lost_chain += 1
                self._example(f"{token}: unacknowledged, chain {chain}, reached {reached}")
            times = [first[(token, channel)] for channel in chain[:hops]]
            for before, after in itertools.pairwise(times):
                if after <= before:
                    lost.add(token)
                    report.out_of_order += 1
                    self._example(f"{token}: chain {chain} delivered at {times}")
                elif after - before < escalate_after - EARLY_TOLERANCE:
                    report.early_escalations += 1
                    self._example(
                        f"{token}: escalated {after - before:.2f} s after the hop before"
                        f" (escalate_after {escalate_after})"
                    )
        report.lost = len(lost)

        # escalated after acknowledgement
        report.acknowledged = len(db_acked)
        for token, ack_id in db_acked.items():
            if token not in ledger:
                continue
            chain = ledger[token][1]
            at = ack_times.get(token)
            claims = escalated.get(token, [])
            before_ack = {channel for hop_id, channel, _ in claims if hop_id < ack_id}
            late: set[str] = set()
            for hop_id, channel, claimed_at in claims:
                if hop_id > ack_id or (at is not None and claimed_at > at):
                    late.add(channel)
            if at is not None:
                moment = at.timestamp()
                for channel in chain[1:]:
                    times = sends.get((token, channel), [])
                    if channel not in before_ack and any(t > moment for t in times):
                        late.add(channel)  # a hop sent after the ack, with no claim before it
                hops_before = sum(1 for c in chain if first.get((token, c), moment + 1) <= moment)
                report.acked_after_hops[hops_before] = (
                    report.acked_after_hops.get(hops_before, 0) + 1
                )
                if any(first.get((token, c), 0.0) > moment for c in chain):
                    report.acked_in_flight += 1
            report.escalated_after_ack += len(late)
            for channel in sorted(late):
                self._example(f"{token}: escalated to {channel} after its acknowledgement")

        # duplicates: a channel's deliveries beyond its first
        duplicated = {token for (token, _), times in sends.items() if len(times) > 1}
        report.delivered = len(delivered)
        report.duplicates = sum(len(times) - 1 for times in sends.values())
        report.in_flight_at_kills = len(self.at_risk)
        report.duplicates_outside_kills = len(duplicated - self.at_risk)
        report.lost_commits = len(producers.acked - set(ledger))
        report.transactions_committed = producers.committed_tx
        report.transactions_rolled_back = producers.rolled_back_tx
        report.transactions_failed = producers.failed_tx
        report.commits_unknown = len(producers.unknown)
        report.cancel_answers = dict(reactions.cancel_answers)
        report.cancelled = len(db_cancelled)
        report.ack_alerts = len(reactions.acks)
        report.ack_answers = dict(reactions.ack_answers)

    def _example(self, text: str) -> None:
        """Keep a few failures of each kind, to say what went wrong."""
        kind = TOKEN.sub("", text)[:24]
        self._example_kinds[kind] += 1
        if self._example_kinds[kind] <= 3 and len(self.report.examples) < 15:
            self.report.examples.append(text)


def _token(entry: dict[str, Any]) -> str | None:
    """The message's token, from what the recorder saw (None: an unknown delivery)."""
    found = TOKEN.search(entry.get("text") or entry.get("subject") or "")
    return None if found is None else found.group(0)


def run_chaos(config: ChaosConfig) -> ChaosReport:
    """Run one chaos run to the end and return its figures."""
    return asyncio.run(ChaosRun(config).run())


def _pair(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    return float(low), float(high or low)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--messages", type=int, default=50_000, help="committed messages to produce (50000)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=120.0,
        help="production is spread over this long, and chaos lasts at least this long (120)",
    )
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--dispatchers", type=int, default=3)
    parser.add_argument(
        "--rollback",
        type=float,
        default=0.3,
        help="share of producer transactions rolled back, cancels and acknowledgements too (0.3)",
    )
    parser.add_argument(
        "--alerts",
        type=float,
        default=0.2,
        help="share of messages enqueued as alerts with a chain of 2-3 channels (0.2)",
    )
    parser.add_argument(
        "--escalate-after",
        type=_pair,
        default=(2.0, 4.0),
        metavar="MIN:MAX",
        help="each alert's escalate_after, seconds, uniform in MIN..MAX (2:4)",
    )
    parser.add_argument(
        "--acknowledge",
        type=float,
        default=0.5,
        help="share of committed alerts acknowledged at a random moment (0.5)",
    )
    parser.add_argument(
        "--cancel",
        type=float,
        default=0.15,
        help="share of committed messages cancelled 0-2 s after their commit (0.15)",
    )
    parser.add_argument(
        "--scheduled",
        type=float,
        default=0.15,
        help="share of messages enqueued with send_at 0.5-3 s ahead (0.15)",
    )
    parser.add_argument(
        "--kill-every",
        type=_pair,
        default=(2.0, 5.0),
        metavar="MIN:MAX",
        help="seconds between SIGKILLs, uniform in MIN..MAX (2:5)",
    )
    parser.add_argument(
        "--terminate-every",
        type=_pair,
        default=(3.0, 8.0),
        metavar="MIN:MAX",
        help="seconds between pg_terminate_backend rounds (3:8)",
    )
    parser.add_argument("--no-postgres-restart", action="store_true")
    parser.add_argument("--lease-seconds", type=float, default=10.0)
    parser.add_argument(
        "--concurrency", type=int, default=16, help="sends in flight per dispatcher (16)"
    )
    parser.add_argument(
        "--send-delay", type=float, default=0.01, help="seconds each send takes at the sink (0.01)"
    )
    parser.add_argument(
        "--min-age",
        type=float,
        default=3.0,
        help="only SIGKILL dispatchers that have run this long (3)",
    )
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        metavar="DIR",
        help="write logs and the delivery record here and keep the cluster",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    config = ChaosConfig(
        messages=args.messages,
        seconds=args.seconds,
        producers=args.producers,
        dispatchers=args.dispatchers,
        rollback=args.rollback,
        alerts=args.alerts,
        escalate_after=args.escalate_after,
        acknowledge=args.acknowledge,
        cancel=args.cancel,
        scheduled=args.scheduled,
        kill_every=args.kill_every,
        terminate_every=args.terminate_every,
        restart_postgres=not args.no_postgres_restart,
        lease_seconds=args.lease_seconds,
        concurrency=args.concurrency,
        send_delay=args.send_delay,
        min_age=args.min_age,
        drain_timeout=args.drain_timeout,
        seed=args.seed,
        workdir=args.keep,
    )
    print(
        f"chaos: {config.messages} messages, {config.producers} producers "
        f"({config.rollback:.0%} rollbacks; {config.alerts:.0%} alerts, escalate_after "
        f"{config.escalate_after[0]:g}-{config.escalate_after[1]:g} s, "
        f"{config.acknowledge:.0%} of them acknowledged; {config.cancel:.0%} cancelled), "
        f"{config.dispatchers} dispatchers, {config.seconds:g} s of chaos",
        flush=True,
    )
    report = run_chaos(config)
    print(report.table())
    if args.json:
        figures = {k: v for k, v in vars(report).items()}
        figures["ok"] = report.ok
        print(json.dumps(figures, indent=2))
    return 0 if report.ok else 1
