"""``python -m bench streams``: many open inbox streams on one API process.

One real ``outbox api`` process and ``--streams`` open ``GET /api/v1/inbox/stream``
connections (1,000 by default), one per user, read by this process over plain
asyncio sockets (a minimal HTTP/1.1 client, so that what is timed is the API, not a
client library). Each round commits one inbox item for every user in one
transaction (the dispatcher's statement shape: the item and its NOTIFY), as a burst
of alerts would, and records for each item the time from the commit to its event on
its user's stream. Then ``--singles`` lone items, one at a time, to random users
while every stream stays open (the latency of one alert among many idle streams).

The API's resident memory (``VmRSS``) is read before the streams open, with them
open, and at the end.

Targets: every item reaches its stream (none lost); burst p99 <= 1 s from commit to
event; single-item p99 <= 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import jwt
import psycopg

from bench._common import (
    OUTBOX,
    ROOT,
    Target,
    add_common_arguments,
    fresh_database,
    percentile,
    print_header,
    report,
    summarize,
    table,
    write_json,
)

SECRET = "bench-streams-jwt-secret-0123456789abcdef"
HOST = "127.0.0.1"
BURST = """
WITH item AS (
    INSERT INTO outbox.inbox_item (user_id, message_id, template, title, body, url)
    SELECT 'u' || g, %(first)s + g, 'price_alert', 'EURUSD above 1.1', 'round ' || %(round)s,
           'https://platform.example.com/positions'
      FROM generate_series(1, %(users)s) g
    RETURNING id, user_id
)
SELECT id, pg_notify('outbox_inbox', id || ' ' || user_id) FROM item
"""
"""One item per user, and a NOTIFY each: what the dispatcher's acknowledgements write."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench streams",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument("--streams", type=int, default=1000, help="open streams (%(default)s)")
    parser.add_argument("--singles", type=int, default=50, help="lone items (%(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.rounds, args.singles = 20, 1, 5
    return args


# ----------------------------------------------------------------------- the API


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (Linux ``/proc``; NaN elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _raise_file_limit() -> None:
    """Every stream is a socket: lift the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextmanager
def api_process(url: str, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": url,
        "OUTBOX_API_JWT_SECRET": SECRET,
        "OUTBOX_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [OUTBOX, "api", "--host", HOST, "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=out,
            preexec_fn=_raise_file_limit,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://{HOST}:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start (see {log})")
            time.sleep(0.2)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ----------------------------------------------------------------------- the streams


def token(user: str) -> str:
    claims = {"sub": user, "role": "user", "exp": int(time.time()) + 3600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


class Streams:
    """``count`` open streams of users u1..uN; records when each item id arrives."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.arrivals: dict[int, float] = {}
        self.arrived = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._opened = 0
        self._all_open = asyncio.Event()

    async def open(self, concurrency: int = 50) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(n: int) -> None:
            async with gate:
                reader = await self._connect(f"u{n}")
            await self._read(reader)

        self._tasks = [asyncio.create_task(one(n)) for n in range(1, self.count + 1)]
        waiting = asyncio.create_task(self._all_open.wait())
        done, _ = await asyncio.wait(
            [waiting, *self._tasks], return_when=asyncio.FIRST_COMPLETED, timeout=120
        )
        if waiting not in done:
            for task in done:
                task.result()  # a stream failed: say why
            raise RuntimeError(f"only {self._opened} of {self.count} streams opened")

    async def _connect(self, user: str) -> asyncio.StreamReader:
        reader, writer = await asyncio.open_connection(HOST, self.port)
        self._writers.append(writer)
        writer.write(
            (
                f"GET /api/v1/inbox/stream HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                f"Authorization: Bearer {token(user)}\r\nAccept: text/event-stream\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"stream of {user}: {status!r}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # headers: uvicorn streams with chunked transfer encoding
        return reader

    async def _read(self, reader: asyncio.StreamReader) -> None:
        buffer = b""
        opened = False
        while True:
            size_line = await reader.readline()
            if not size_line:
                return
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                return
            buffer += await reader.readexactly(size)
            await reader.readexactly(2)
            now = time.perf_counter()
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if event.startswith(b"retry:") and not opened:
                    opened = True  # ": connected": this stream is registered
                    self._opened += 1
                    if self._opened == self.count:
                        self._all_open.set()
                elif event.startswith(b"id: "):
                    item_id = int(event[4 : event.index(b"\n")])
                    self.arrivals[item_id] = now
                    self.arrived.set()

    async def wait_for(self, ids: list[int], timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while any(i not in self.arrivals for i in ids) and time.perf_counter() < deadline:
            self.arrived.clear()
            try:
                await asyncio.wait_for(
                    self.arrived.wait(), max(0.01, deadline - time.perf_counter())
                )
            except TimeoutError:
                break

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def burst(url: str, streams: Streams, round_: int, users: int) -> tuple[list[float], int]:
    """One item per user in one commit: (latencies of the items that arrived, lost)."""
    with psycopg.connect(url, autocommit=True) as conn:
        ids = [
            int(row[0])
            for row in conn.execute(
                BURST, {"first": round_ * 1_000_000, "round": round_, "users": users}
            ).fetchall()
        ]
        committed = time.perf_counter()
    await streams.wait_for(ids, timeout=30)
    latencies = [streams.arrivals[i] - committed for i in ids if i in streams.arrivals]
    return latencies, len(ids) - len(latencies)


async def singles(url: str, streams: Streams, count: int, users: int) -> tuple[list[float], int]:
    """Lone items to random users, one commit each, one after another."""
    latencies: list[float] = []
    lost = 0
    rng = random.Random(16)
    with psycopg.connect(url, autocommit=True) as conn:
        for n in range(count):
            user = f"u{rng.randint(1, users)}"
            row = conn.execute(
                "WITH item AS (INSERT INTO outbox.inbox_item (user_id, message_id, template,"
                " title, body) VALUES (%s, %s, 'price_alert', 'single', 'b')"
                " RETURNING id, user_id)"
                " SELECT id, pg_notify('outbox_inbox', id || ' ' || user_id) FROM item",
                [user, 900_000_000 + n],
            ).fetchone()
            committed = time.perf_counter()
            assert row is not None
            await streams.wait_for([int(row[0])], timeout=5)
            arrival = streams.arrivals.get(int(row[0]))
            if arrival is None:
                lost += 1
            else:
                latencies.append(arrival - committed)
            await asyncio.sleep(rng.uniform(0.005, 0.03))
    return latencies, lost


async def measure(url: str, port: int, args: argparse.Namespace, pid: int) -> dict[str, object]:
    idle_mb = rss_mb(pid)
    streams = Streams(port, args.streams)
    opened_at = time.perf_counter()
    await streams.open()
    open_seconds = time.perf_counter() - opened_at
    await asyncio.sleep(1.0)  # let the API settle before measuring memory
    open_mb = rss_mb(pid)
    bursts: list[list[float]] = []
    lost = 0
    try:
        for round_ in range(1, args.rounds + 1):
            latencies, missing = await burst(url, streams, round_, args.streams)
            bursts.append(latencies)
            lost += missing
            p99 = percentile(latencies, 0.99)
            print(
                f"  round {round_}: {len(latencies):,} items, p50"
                f" {percentile(latencies, 0.5) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms,"
                f" max {max(latencies, default=float('nan')) * 1000:.0f} ms, lost {missing}",
                flush=True,
            )
        lone, lone_lost = await singles(url, streams, args.singles, args.streams)
        lost += lone_lost
    finally:
        end_mb = rss_mb(pid)
        await streams.close()
    return {
        "idle_mb": idle_mb,
        "open_mb": open_mb,
        "end_mb": end_mb,
        "open_seconds": open_seconds,
        "bursts": bursts,
        "singles": lone,
        "lost": lost,
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    _raise_file_limit()
    facts = print_header(
        "streams",
        args,
        f"{args.streams:,} open streams (one per user) on one outbox api process,"
        f" rounds {args.rounds} of one item per user in one commit, {args.singles} lone items",
    )
    port = _free_port()
    with fresh_database(args.database_url, "streams") as url:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-streams-api-{port}.log"
        with api_process(url, port, log) as process:
            figures = asyncio.run(measure(url, port, args, process.pid))

    p99s = [percentile(b, 0.99) for b in figures["bursts"]]  # type: ignore[attr-defined]
    p50s = [percentile(b, 0.5) for b in figures["bursts"]]  # type: ignore[attr-defined]
    maxes = [max(b, default=float("nan")) for b in figures["bursts"]]  # type: ignore[attr-defined]
    lone: list[float] = figures["singles"]  # type: ignore[assignment]
    burst_p99 = summarize(p99s)
    print(
        table(
            ["figure", "median (min..max) over rounds"],
            [
                ["burst p50 ms", summarize([x * 1000 for x in p50s]).cell("{:.0f}")],
                ["burst p99 ms", summarize([x * 1000 for x in p99s]).cell("{:.0f}")],
                ["burst max ms", summarize([x * 1000 for x in maxes]).cell("{:.0f}")],
                [
                    "single p50 / p99 ms",
                    f"{percentile(lone, 0.5) * 1000:.1f} / {percentile(lone, 0.99) * 1000:.1f}",
                ],
                ["items lost", str(figures["lost"])],
                ["streams opened in s", f"{figures['open_seconds']:.1f}"],
            ],
            "Inbox stream latency, commit to event",
        )
    )
    idle, opened, end = figures["idle_mb"], figures["open_mb"], figures["end_mb"]
    per_stream_kb = (opened - idle) * 1024 / args.streams  # type: ignore[operator]
    print(
        table(
            ["API RSS MB, no stream", f"{args.streams:,} streams open", "at the end", "KB/stream"],
            [[f"{idle:.1f}", f"{opened:.1f}", f"{end:.1f}", f"{per_stream_kb:.1f}"]],
            "API memory",
        )
    )
    write_json(args.json, {"machine": facts, "args": vars(args), **figures})
    return report(
        [
            Target("items lost", float(figures["lost"]), 0.0, at_least=False),  # type: ignore[arg-type]
            Target(
                "burst p99, worst round", burst_p99.high * 1000, 1000.0, at_least=False, unit=" ms"
            ),
            Target(
                "single-item p99", percentile(lone, 0.99) * 1000, 1000.0, at_least=False, unit=" ms"
            ),
        ],
        check=args.check,
        quick=args.quick,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
