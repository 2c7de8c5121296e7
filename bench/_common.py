"""What every benchmark shares: the database, rounds and medians, tables, targets.

A benchmark run creates its own database on the server given by ``--database-url``
(or ``OUTBOX_BENCH_DATABASE_URL``, else the local default), migrates it with
``outbox._migrate`` and drops it at the end. Every figure is measured in at least
three rounds; tables show the median and the spread (lowest and highest, and
``(max - min) / median``). Ratios are computed between figures of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from outbox._migrate import upgrade

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ROOT = Path(__file__).resolve().parents[1]
OUTBOX = str(Path(sys.executable).with_name("outbox"))

ALERT_TEMPLATES = {
    # template: SQL building its vars from the integer g (distinct per message)
    "price_alert": (
        "jsonb_build_object('instrument', 'EURUSD', 'condition', 'above',"
        " 'trigger_price', (1 + g / 1e6)::text, 'current_price', (1 + g / 1e6 + 0.0002)::text)"
    ),
    "position_failure_sl": (
        "jsonb_build_object('instrument', 'XAUUSD', 'side', 'buy', 'entry_price', '2315.40',"
        " 'current_price', (2300 - g %% 100)::text, 'loss_amount', (g %% 1000)::text,"
        " 'broker_ticket', 'T' || g, 'currency', 'USD')"
    ),
}


# ----------------------------------------------------------------------- arguments


def add_common_arguments(parser: argparse.ArgumentParser, *, rounds: int = 3) -> None:
    """``--database-url``, ``--rounds``, ``--quick``, ``--check``, ``--json``."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("OUTBOX_BENCH_DATABASE_URL") or DEFAULT_URL,
        help="a PostgreSQL server to create the benchmark database on "
        "(OUTBOX_BENCH_DATABASE_URL; default %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=rounds,
        help="rounds per figure (median and spread; default %(default)s)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts for a smoke run (figures mean nothing)"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")


# ----------------------------------------------------------------------- databases


def with_database(url: str, dbname: str) -> str:
    """``url`` pointing at database ``dbname`` instead."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{dbname}", parts.query, parts.fragment))


@contextlib.contextmanager
def fresh_database(server_url: str, label: str, *, migrate: bool = True) -> Iterator[str]:
    """Create ``bench_<label>_<random>``, migrate it (outbox head), drop it afterwards."""
    name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
    try:
        if migrate:
            upgrade(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def vacuum(url: str, *tables: str) -> None:
    """VACUUM ANALYZE the tables and CHECKPOINT, so a round starts from a clean state."""
    with psycopg.connect(url, autocommit=True) as conn:
        for table in tables:
            conn.execute(f"VACUUM ANALYZE {table}")
        with contextlib.suppress(psycopg.Error):  # needs superuser (or pg_checkpoint)
            conn.execute("CHECKPOINT")


SEED_ADDRESSES = """
SELECT outbox.set_address('u' || g, a.channel,
                          CASE a.channel WHEN 'email' THEN 'u' || g || '@example.com'
                                         ELSE CAST(g + %(chat_offset)s AS text) END)
  FROM generate_series(1, %(users)s) g, unnest(ARRAY['email', 'telegram']) a(channel)
"""
"""Users u1..uN with an email and a Telegram chat (n + chat_offset): addresses are rows
of outbox.recipient_address (outbox_0010), written through outbox.set_address."""


def seed_recipients(url: str, users: int) -> None:
    """``users`` recipients ``u1..uN`` with an address on every channel."""
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('outbox.recipient_address')").fetchone() == (None,):
            # a revision before outbox_0010 (bench producer's side-by-side runs)
            conn.execute(
                "INSERT INTO outbox.recipient (user_id, email, telegram_chat_id)"
                " SELECT 'u' || g, 'u' || g || '@example.com', g FROM generate_series(1, %s) g"
                " ON CONFLICT DO NOTHING",
                [users],
            )
        else:
            conn.execute(SEED_ADDRESSES, {"users": users, "chat_offset": 0})
        conn.execute(
            "INSERT INTO outbox.push_subscription (user_id, endpoint, p256dh, auth)"
            " SELECT 'u' || g, 'https://push.example.com/s/' || g, 'p256dh', 'auth'"
            "   FROM generate_series(1, %s) g ON CONFLICT DO NOTHING",
            [users],
        )


def seed_messages(
    url: str,
    count: int,
    *,
    channel: str = "push",
    template: str = "price_alert",
    users: int = 1000,
    status: str = "pending",
    shared_vars: bool = False,
    chunk: int = 50_000,
) -> None:
    """Write ``count`` messages (distinct vars unless ``shared_vars``) into ``outbox.message``."""
    vars_sql = ALERT_TEMPLATES[template]
    if shared_vars:  # one alert fanned out to every recipient
        vars_sql = f"(SELECT {vars_sql} FROM (SELECT 1 AS g) AS one)"
    dead = status == "dead"
    with psycopg.connect(url, autocommit=True) as conn:
        start = int(conn.execute("SELECT coalesce(max(id), 0) FROM outbox.message").fetchone()[0])  # type: ignore[index]
        for first in range(1, count + 1, chunk):
            last = min(count, first + chunk - 1)
            conn.execute(
                "INSERT INTO outbox.message (lane, priority, channel, user_id, template, vars,"
                " status, dead_at, attempts)"
                f" SELECT 'transactional', 0, %s, 'u' || (1 + g %% %s), %s, {vars_sql},"
                "        %s, CASE WHEN %s THEN now() END, CASE WHEN %s THEN 5 ELSE 0 END"
                "   FROM generate_series(%s::bigint, %s::bigint) g",
                [channel, users, template, status, dead, dead, start + first, start + last],
            )


def scalar(url: str, sql: str, params: Sequence[Any] = ()) -> Any:
    """The first column of the first row."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql, params).fetchone()  # type: ignore[arg-type]
        return None if row is None else row[0]


# ----------------------------------------------------------------------- processes


def dispatcher_env(url: str, **extra: str) -> dict[str, str]:
    """Environment of a benchmark dispatcher: instant sink channels, no rate limits."""
    return {
        **os.environ,
        "OUTBOX_DATABASE_URL": url,
        "OUTBOX_CHANNEL_PLUGINS": "email=bench._sink:email,telegram=bench._sink:telegram,"
        "push=bench._sink:push",
        "OUTBOX_RATE_LIMITS": "off",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **extra,
    }


class Workers:
    """Worker processes started by ``python -m bench._worker``; they wait for "go".

    Each prints ``ready`` once its imports and connections are done, then waits
    for a line on stdin, so that what is timed is the draining, not Python's
    start-up. ``go()`` releases them all; ``wait()`` returns when all have exited.
    """

    def __init__(
        self, argv_list: Sequence[Sequence[str]], env: dict[str, str], log_dir: Path | None = None
    ) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.peak_rss_mb: list[float] = []
        self.cpu_seconds: list[float] = []  # of each process, imports included
        self._logs: list[Any] = []
        for index, argv in enumerate(argv_list):
            log = open(log_dir / f"worker-{index}.log", "wb") if log_dir else subprocess.DEVNULL  # noqa: SIM115
            if log_dir:
                self._logs.append(log)
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench._worker", *argv],
                    env=env,
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                )
            )

    def ready(self, timeout: float = 60.0) -> None:
        for process in self.processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            if line.strip() != b"ready":
                self.kill()
                raise RuntimeError(f"a worker did not start: {line!r} (see its log)")

    def go(self) -> float:
        started = time.perf_counter()
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(b"go\n")
            process.stdin.flush()
        return started

    def wait(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError(f"workers did not finish within {timeout:.0f} s") from None
        finished = time.perf_counter()
        for process in self.processes:
            assert process.stdout is not None
            for line in process.stdout.read().decode(errors="replace").splitlines():
                if line.startswith("maxrss "):
                    self.peak_rss_mb.append(int(line.split()[1]) / 1024)
                elif line.startswith("cpu "):
                    self.cpu_seconds.append(float(line.split()[1]))
        self.close()
        bad = [p.returncode for p in self.processes if p.returncode != 0]
        if bad:
            raise RuntimeError(f"a worker failed with exit code {bad[0]}")
        return finished

    def stop(self, timeout: float = 30.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.close()

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        self.close()

    def close(self) -> None:
        for process in self.processes:
            for stream in (process.stdin, process.stdout):
                if stream is not None and not stream.closed:
                    with contextlib.suppress(OSError):
                        stream.close()
        for log in self._logs:
            log.close()
        self._logs.clear()


# ----------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Summary:
    """Median and spread of one figure over the rounds."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def spread(self) -> float:
        """``(max - min) / median``: 0.10 means the rounds lie within 10 %."""
        return (self.high - self.low) / self.median if self.median else 0.0

    def cell(self, fmt: str = "{:,.0f}") -> str:
        return f"{fmt.format(self.median)} ({fmt.format(self.low)}..{fmt.format(self.high)})"


def summarize(values: Sequence[float]) -> Summary:
    return Summary(tuple(float(v) for v in values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> str:
    """A plain-text table, right-aligned numbers, as Markdown (pipes) so it pastes."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [f"\n{title}" if title else ""]
    lines.append(
        "| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True)) + " |"
    )
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """One target: ``measured`` against ``limit`` (at least, or at most)."""

    name: str
    measured: float
    limit: float
    at_least: bool = True
    unit: str = ""

    @property
    def met(self) -> bool:
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit


def report(targets: Sequence[Target], *, check: bool, quick: bool = False) -> int:
    """Print the targets; with ``check``, return 1 if any is missed."""
    rows = [
        [
            t.name,
            f"{t.measured:,.2f}{t.unit}",
            f"{'>=' if t.at_least else '<='} {t.limit:,.2f}{t.unit}",
            "met" if t.met else "MISSED",
        ]
        for t in targets
    ]
    print(table(["target", "measured (median)", "target", "result"], rows, "Targets"))
    if quick:
        print("\n(--quick: counts too small for the figures to mean anything)")
    missed = [t for t in targets if not t.met]
    return 1 if check and missed and not quick else 0


def machine(url: str) -> dict[str, object]:
    """Facts about where the figures came from."""
    facts: dict[str, object] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                facts["memory_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    with psycopg.connect(url, autocommit=True) as conn:
        facts["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        for setting in ("fsync", "synchronous_commit", "shared_buffers", "max_connections"):
            facts[setting] = conn.execute(f"SHOW {setting}").fetchone()[0]  # type: ignore[index]
    return facts


def print_header(name: str, args: argparse.Namespace, extra: str = "") -> dict[str, object]:
    facts = machine(args.database_url)
    print(f"bench {name}: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    if extra:
        print(extra)
    return facts


def write_json(path: str | None, payload: dict[str, object]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
