"""``python -m bench chaos``: crash everything while messages flow; lose nothing.

The run starts its own throwaway PostgreSQL (never the machine's shared server),
migrates it, and adds a ledger table. Then, at the same time:

- 8 producer connections enqueue through ``outbox.enqueue_async``, a few messages
  per transaction; each transaction also writes its message ids into the ledger
  and then commits, or (30% of them) rolls back;
- 3 ``outbox dispatch`` subprocesses deliver to a loopback recording sink (the
  file recorder channel of ``tests/support``: one JSON line per send);
- a chaos loop SIGKILLs a random dispatcher every few seconds and starts a new one,
  terminates dispatcher backends with ``pg_terminate_backend``, and once, half-way
  through, crashes PostgreSQL (``pg_ctl stop -m immediate``) and starts it again.

Then the chaos stops and the dispatchers drain the queue. The ledger says what was
committed; the sink says what was delivered:

- lost: committed, never delivered, no longer in the outbox;
- phantom: delivered but never committed (a rolled-back transaction's message);
- duplicates: deliveries beyond the first of a message;
- stuck: committed and still in the outbox (pending, sending or dead) after the drain.

It exits 1 unless lost = phantom = stuck = 0, no acknowledged commit is missing
from the ledger, and every duplicated message was in flight (leased, sent, not yet
acknowledged) at a SIGKILL or at the PostgreSQL crash, so duplicates <= messages in
flight at the kills.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from outbox import enqueue_async
from tests.support.pg_cluster import ThrowawayCluster

ROOT = Path(__file__).resolve().parents[1]
OUTBOX = str(Path(sys.executable).with_name("outbox"))
USERS = 1000
ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.085",
    "current_price": "1.086",
    "condition": "above",
}
DISPATCHER_APPS = ("outbox-dispatcher", "outbox-listener")
# The run keys every message on a token that only the producer's transaction writes
# (into the message's vars, rendered into the mail's subject, and into the ledger),
# never on the message id: after a crash PostgreSQL may hand out again identity values
# that a rolled-back transaction had used (a rollback does not flush the sequence's
# WAL), and a reissued id made a committed message look like a rolled-back one.
TOKEN = re.compile(r"chaos-[0-9a-f]{32}")
TOKEN_SQL = "substring(vars->>'instrument' from 'chaos-[0-9a-f]{32}')"


@dataclass(frozen=True, kw_only=True)
class ChaosConfig:
    """What one chaos run does."""

    messages: int = 50_000
    seconds: float = 120.0
    producers: int = 8
    dispatchers: int = 3
    rollback: float = 0.3
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
    delivered: int = 0
    lost: int = 0
    phantom: int = 0
    duplicates: int = 0
    stuck: int = 0
    dead: int = 0
    in_flight_at_kills: int = 0
    duplicates_outside_kills: int = 0
    lost_commits: int = 0
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
            and self.lost_commits == 0
            and self.duplicates <= self.in_flight_at_kills
            and self.duplicates_outside_kills == 0
            and not self.unexpected_exits
        )

    def table(self) -> str:
        """The figures as aligned text."""
        rows = [
            (
                "committed",
                self.committed,
                f"transactions: {self.transactions_committed} committed, "
                f"{self.transactions_rolled_back} rolled back, {self.transactions_failed} failed"
                f" ({self.commits_unknown} with an unknown commit outcome)",
            ),
            ("delivered", self.delivered, "distinct messages the sink received"),
            ("lost", self.lost, "committed, never delivered, gone from the outbox"),
            ("phantom", self.phantom, "delivered but rolled back"),
            (
                "duplicates",
                self.duplicates,
                f"in flight at kills: {self.in_flight_at_kills}; "
                f"duplicates outside that set: {self.duplicates_outside_kills}",
            ),
            ("stuck", self.stuck, f"still in the outbox after the drain ({self.dead} dead)"),
            ("lost commits", self.lost_commits, "acknowledged commits missing from the ledger"),
        ]
        lines = [f"{name:<13}{value:>9}   {note}" for name, value, note in rows]
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
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


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
            "OUTBOX_CHANNEL_PLUGINS": "email=tests.support.channels:file_email",
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
            try:
                code = process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait(10)
            if code != 0:
                self.unexpected.append(f"{name} exited with {code} at SIGTERM")
            self.slots[slot] = None


class _Producers:
    """Producer transactions and what each of them saw."""

    def __init__(self, config: ChaosConfig, url: str, rng: random.Random) -> None:
        self.config = config
        self.url = url
        self.rng = rng
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

    async def _transaction(self, conn: psycopg.AsyncConnection[Any], number: int, size: int) -> int:
        ids: list[str] = []  # the messages' tokens
        message_ids: list[int] = []
        try:
            for _ in range(size):
                token = f"chaos-{uuid.uuid4().hex}"
                ids.append(token)
                message_ids.append(
                    await enqueue_async(
                        conn,
                        user_id=f"u{self.rng.randint(1, USERS)}",
                        channel="email",
                        template="price_alert",
                        vars={**ALERT, "instrument": f"EURUSD {token}"},
                    )
                )
            await conn.execute(
                "INSERT INTO chaos_ledger (token, message_id, producer)"
                " SELECT unnest(%s::text[]), unnest(%s::bigint[]), %s",
                [ids, message_ids, number],
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
            producers = _Producers(self.config, url, self.rng)
            produce = asyncio.create_task(producers.run())
            await self._chaos(url, dispatchers, produce)
            await produce
            self.report.produce_seconds = time.monotonic() - started
            self.say(f"producers done: {len(producers.acked)} acknowledged commits; draining")
            drain_started = time.monotonic()
            await self._drain(url, dispatchers)
            self.report.drain_seconds = time.monotonic() - drain_started
            dispatchers.stop()
            self._tally(url, producers, record)
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

    def _prepare(self, url: str) -> None:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(
                "CREATE TABLE chaos_ledger (token text PRIMARY KEY, message_id bigint NOT NULL,"
                " producer integer NOT NULL, committed_at timestamptz NOT NULL DEFAULT now())"
            )
            admin.execute(
                "INSERT INTO outbox.recipient (user_id, email)"
                " SELECT 'u' || g, 'u' || g || '@example.com' FROM generate_series(1, %s) g",
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
            left = await self._query_ids(
                url, "SELECT count(*) FROM outbox.message WHERE status <> 'dead'", []
            )
            remaining = next(iter(left))
            if remaining == 0:
                return
            if remaining != last:
                self.say(f"draining: {remaining} left")
                last = remaining
            await asyncio.sleep(0.5)
        self.say("drain timed out")

    def _tally(self, url: str, producers: _Producers, record: Path) -> None:
        with psycopg.connect(url, autocommit=True) as admin:
            ledger = {r[0] for r in admin.execute("SELECT token FROM chaos_ledger")}
            remaining = dict(
                admin.execute(f"SELECT {TOKEN_SQL}, status FROM outbox.message").fetchall()
            )
        lines = record.read_text().splitlines()
        entries = [json.loads(line) for line in lines if line.endswith("}")]
        tokens = [_token(entry) for entry in entries]
        sends = Counter(tokens)
        first_sent: dict[str, float] = {}
        for token, entry in zip(tokens, entries, strict=True):
            first_sent.setdefault(token, entry["received_at"])
        self.at_risk |= {
            mid
            for mid, at in first_sent.items()
            if any(start <= at <= end for start, end in self.crash_windows)
        }
        delivered = set(sends)
        duplicated = {mid for mid, n in sends.items() if n > 1}
        report = self.report
        report.committed = len(ledger)
        report.delivered = len(delivered)
        report.phantom = len(delivered - ledger)
        report.stuck = len(ledger & set(remaining))
        report.dead = sum(1 for mid, status in remaining.items() if status == "dead")
        report.lost = len(ledger - delivered - set(remaining))
        report.duplicates = sum(sends.values()) - len(delivered)
        report.in_flight_at_kills = len(self.at_risk)
        report.duplicates_outside_kills = len(duplicated - self.at_risk)
        report.lost_commits = len(producers.acked - ledger)
        report.transactions_committed = producers.committed_tx
        report.transactions_rolled_back = producers.rolled_back_tx
        report.transactions_failed = producers.failed_tx
        report.commits_unknown = len(producers.unknown)
        # a rolled-back message in the ledger would mean the database broke atomicity
        report.phantom += len(producers.rolled_back & ledger)


def _token(entry: dict[str, Any]) -> str:
    """The message's token, from the subject the recorder saw."""
    found = TOKEN.search(entry.get("subject") or "")
    if found is None:
        raise RuntimeError(f"a delivery without a chaos token: {entry}")
    return found.group(0)


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
        help="share of producer transactions rolled back (0.3)",
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
        f"({config.rollback:.0%} rollbacks), {config.dispatchers} dispatchers, "
        f"{config.seconds:g} s of chaos",
        flush=True,
    )
    report = run_chaos(config)
    print(report.table())
    if args.json:
        figures = {k: v for k, v in vars(report).items()}
        figures["ok"] = report.ok
        print(json.dumps(figures, indent=2))
    return 0 if report.ok else 1
