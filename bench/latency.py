"""``python -m bench latency``: from the producer's commit to the start of the send.

Idle dispatchers (``outbox dispatch``, real processes, asleep on LISTEN) and a
producer that enqueues ``--messages`` alerts one per transaction at random
intervals. For each message: the moment ``commit()`` returned in the producer, and
the moment the sink channel's ``send`` began in a dispatcher (both ``time.time()``
on this machine). Then the same again while a background producer keeps a steady
``--load`` messages per second flowing (transactional alerts like the probes, so
they queue behind them on equal terms).

Targets: idle p50 <= 2 ms and p99 <= 5 ms; under load p99 <= 50 ms; no sample above
the fallback poll interval (``OUTBOX_POLL_INTERVAL``, 1 s) in either phase.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from bench._common import (
    OUTBOX,
    ROOT,
    Target,
    add_common_arguments,
    dispatcher_env,
    fresh_database,
    percentile,
    print_header,
    report,
    seed_recipients,
    summarize,
    table,
    write_json,
)

USERS = 1000
POLL_INTERVAL = 1.0
ENQUEUE = "SELECT outbox.enqueue('push', 'price_alert', %s, %s)"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument("--messages", type=int, default=500, help="probes per phase and round")
    parser.add_argument(
        "--gap-ms", default="5,40", help="random pause between probes, min,max ms (%(default)s)"
    )
    parser.add_argument(
        "--load", type=int, default=1000, help="background messages per second in the loaded phase"
    )
    parser.add_argument("--dispatchers", type=int, default=2, help="(%(default)s)")
    parser.add_argument(
        "--dispatch-args",
        default="",
        help="extra flags for outbox dispatch, e.g. '--urgent-reserve 0' (the old claim loop)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.rounds, args.load = 40, 1, 300
    return args


def alert(i: int) -> Jsonb:
    return Jsonb(
        {
            "instrument": "EURUSD",
            "condition": "above",
            "trigger_price": f"{1 + i / 1e6:.6f}",
            "current_price": "1.08600",
        }
    )


class Background(threading.Thread):
    """Enqueues ``rate`` messages per second, in small transactions every 10 ms."""

    def __init__(self, url: str, rate: int) -> None:
        super().__init__(daemon=True)
        self.url, self.rate = url, rate
        self.stopping = threading.Event()
        self.sent = 0

    def run(self) -> None:
        tick = 0.01
        with psycopg.connect(self.url, autocommit=True) as conn:
            started = time.monotonic()
            while not self.stopping.is_set():
                due = int((time.monotonic() - started) * self.rate)
                for _ in range(min(due - self.sent, 100)):
                    self.sent += 1
                    conn.execute(ENQUEUE, [f"u{1 + self.sent % USERS}", alert(self.sent)])
                time.sleep(tick)


def read_sink(path: Path) -> dict[int, float]:
    sent: dict[int, float] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sent.setdefault(int(parts[0]), float(parts[1]))
    return sent


def probe(url: str, sink: Path, count: int, gap: tuple[float, float]) -> list[float]:
    """Enqueue ``count`` probes one per transaction; return their latencies (ms)."""
    committed: dict[int, float] = {}
    rng = random.Random(7)
    with psycopg.connect(url) as conn:
        for i in range(count):
            time.sleep(rng.uniform(*gap))
            row = conn.execute(ENQUEUE, [f"u{1 + i % USERS}", alert(i)]).fetchone()
            conn.commit()
            committed[int(row[0])] = time.time()  # type: ignore[index]
    deadline = time.monotonic() + 30
    while True:
        sent = read_sink(sink)
        if all(i in sent for i in committed) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    missing = [i for i in committed if i not in sent]
    if missing:
        raise RuntimeError(f"{len(missing)} probes were not sent within 30 s")
    return [(sent[i] - at) * 1000 for i, at in committed.items()]


def wait_asleep(url: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM outbox.sleeper").fetchone()
            if row is not None and row[0] >= count:
                return
            time.sleep(0.05)
    raise RuntimeError("the dispatchers did not fall asleep")


def run(args: argparse.Namespace) -> dict[str, list[list[float]]]:
    low, high = (float(x) / 1000 for x in args.gap_ms.split(","))
    samples: dict[str, list[list[float]]] = {"idle": [], "load": []}
    with fresh_database(args.database_url, "latency") as url, tempfile.TemporaryDirectory() as tmp:
        seed_recipients(url, USERS)
        sink = Path(tmp) / "sink.txt"
        sink.touch()
        env = dispatcher_env(
            url, OUTBOX_BENCH_SINK_FILE=str(sink), OUTBOX_POLL_INTERVAL=str(POLL_INTERVAL)
        )
        dispatchers = [
            subprocess.Popen(
                [OUTBOX, "dispatch", *args.dispatch_args.split()],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(args.dispatchers)
        ]
        try:
            for round_ in range(1, args.rounds + 1):
                wait_asleep(url, args.dispatchers)
                idle = probe(url, sink, args.messages, (low, high))
                samples["idle"].append(idle)
                background = Background(url, args.load)
                background.start()
                time.sleep(1.0)  # reach the steady state
                try:
                    loaded = probe(url, sink, args.messages, (low, high))
                finally:
                    background.stopping.set()
                    background.join(10)
                samples["load"].append(loaded)
                for phase, values in (("idle", idle), ("load", loaded)):
                    print(
                        f"  round {round_}: {phase}: p50 {percentile(values, 0.5):.2f} ms,"
                        f" p99 {percentile(values, 0.99):.2f} ms, max {max(values):.2f} ms",
                        flush=True,
                    )
        finally:
            for process in dispatchers:
                process.terminate()
            for process in dispatchers:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    return samples


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    facts = print_header(
        "latency",
        args,
        f"{args.messages} probes per phase, "
        f"{args.dispatchers} idle dispatchers, background {args.load}/s, "
        f"rounds {args.rounds}",
    )
    samples = run(args)
    rows = []
    figures: dict[str, dict[str, float]] = {}
    for phase, rounds in samples.items():
        p50 = summarize([percentile(r, 0.50) for r in rounds])
        p99 = summarize([percentile(r, 0.99) for r in rounds])
        worst = max(max(r) for r in rounds)
        figures[phase] = {"p50": p50.median, "p99": p99.median, "max": worst}
        rows.append(
            [
                phase,
                p50.cell("{:.2f}"),
                p99.cell("{:.2f}"),
                f"{worst:.2f}",
                sum(len(r) for r in rounds),
            ]
        )
    print(
        table(
            [
                "phase",
                "p50 ms median (min..max)",
                "p99 ms median (min..max)",
                "max ms (all rounds)",
                "samples",
            ],
            rows,
            "Commit to send start",
        )
    )
    targets = [
        Target("idle p50", figures["idle"]["p50"], 2.0, at_least=False, unit=" ms"),
        Target("idle p99", figures["idle"]["p99"], 5.0, at_least=False, unit=" ms"),
        Target("under load p99", figures["load"]["p99"], 50.0, at_least=False, unit=" ms"),
        Target(
            "max, both phases",
            max(figures["idle"]["max"], figures["load"]["max"]),
            POLL_INTERVAL * 1000,
            at_least=False,
            unit=" ms",
        ),
    ]
    write_json(args.json, {"machine": facts, "args": vars(args), "samples_ms": samples})
    return report(targets, check=args.check, quick=args.quick)
