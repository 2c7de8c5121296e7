"""One benchmark worker process: ``python -m bench._worker SYSTEM ARGS...``.

It imports everything and connects, prints ``ready``, waits for a line on stdin,
then drains and exits, so that the coordinator times the draining alone.

- ``outbox ARGS...``: the real ``outbox dispatch ARGS...`` command line
  (``outbox.cli.main``), with its imports done before ``go``;
- ``outbox-supervised N ARGS...``: ``outbox dispatch --processes N ARGS...`` (one
  supervisor and its N children). The children start after this process does, so
  it says ``ready`` only once all N sleep in ``outbox.sleeper`` (the coordinator
  keeps the queue's channel paused until "go": they find nothing to claim and wait
  for a NOTIFY), and its CPU at "go" counts the children alive then (``/proc``), so
  that their start-up is left out as the other workers' is. No ``--metrics-port``,
  as for the one-process row: both measure the dispatcher without metrics;
- ``pgqueuer URL BATCH DRIVER``: a pgqueuer ``QueueManager`` with a no-op
  entrypoint in drain mode, on ``asyncpg`` (its fastest driver) or ``psycopg``;
- ``procrastinate URL CONCURRENCY``: a procrastinate worker with a no-op task
  that stops once the queue is empty (``wait=False``).
"""

from __future__ import annotations

import asyncio
import sys

_cpu_at_go = 0.0


def _cpu() -> float:
    """CPU seconds of this process and of its children that have ended (a worker that
    supervises processes of its own is counted whole once it has reaped them).
    """
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _ready() -> None:
    global _cpu_at_go
    _cpu_at_go = _cpu()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()


def _outbox(argv: list[str]) -> int:
    import outbox.cli
    import outbox.dispatcher._dispatcher
    import outbox.dispatcher.channels
    import outbox.dispatcher.cli
    from outbox._settings import Settings

    outbox.dispatcher.channels.build_channels(Settings.from_env())  # imports the plugins
    outbox.cli.build_parser()  # imports every subcommand's module
    _ready()
    return outbox.cli.main(["dispatch", *argv])


def _children_cpu() -> float:
    """CPU seconds of this process's live children, from ``/proc`` (Linux)."""
    import os
    from pathlib import Path

    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # gone meanwhile: counted once reaped
                continue
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _outbox_supervised(processes: int, argv: list[str]) -> int:
    import os
    import threading
    import time

    import psycopg

    import outbox.cli
    import outbox.dispatcher._supervisor
    import outbox.dispatcher.cli

    outbox.cli.build_parser()

    def gate() -> None:
        global _cpu_at_go
        deadline = time.monotonic() + 120
        with psycopg.connect(os.environ["OUTBOX_DATABASE_URL"], autocommit=True) as conn:
            while True:
                row = conn.execute("SELECT count(*) FROM outbox.sleeper").fetchone()
                if row is not None and row[0] >= processes:
                    break
                if time.monotonic() > deadline:
                    sys.stderr.write("the supervisor's children did not go to sleep\n")
                    return
                time.sleep(0.05)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.readline()
        _cpu_at_go = _cpu() + _children_cpu()

    threading.Thread(target=gate, daemon=True).start()
    return outbox.cli.main(["dispatch", "--processes", str(processes), *argv])


async def _pgqueuer(url: str, batch_size: int, driver: str) -> int:
    from pgqueuer import Queries, QueueManager
    from pgqueuer.domain.types import QueueExecutionMode

    if driver == "asyncpg":
        import asyncpg

        conn = await asyncpg.connect(url)
        queries = Queries.from_asyncpg_connection(conn)
    else:
        import psycopg

        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        queries = Queries.from_psycopg_connection(conn)
    manager = QueueManager(queries)

    @manager.entrypoint("noop")
    async def noop(job: object) -> None:
        return None

    _ready()
    await manager.run(batch_size=batch_size, mode=QueueExecutionMode.drain)
    await conn.close()
    return 0


def procrastinate_app(url: str):  # type: ignore[no-untyped-def]
    """A procrastinate app with the no-op task ``noop``."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop", queue="bench")
    async def noop() -> None:
        return None

    return app


async def _procrastinate(url: str, concurrency: int) -> int:
    app = procrastinate_app(url)
    async with app.open_async():
        await app.check_connection_async()
        _ready()
        await app.run_worker_async(
            queues=["bench"], wait=False, concurrency=concurrency, install_signal_handlers=False
        )
    return 0


def main(argv: list[str]) -> int:
    system, rest = argv[0], argv[1:]
    if system == "outbox":
        return _outbox(rest)
    if system == "outbox-supervised":
        return _outbox_supervised(int(rest[0]), rest[1:])
    if system == "pgqueuer":
        return asyncio.run(_pgqueuer(rest[0], int(rest[1]), rest[2]))
    if system == "procrastinate":
        return asyncio.run(_procrastinate(rest[0], int(rest[1])))
    print(f"unknown system {system!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    import resource

    code = main(sys.argv[1:])
    # the coordinator reads these: peak resident memory (kB) and the CPU seconds
    # spent after "go" (imports and connecting excluded)
    # (a supervisor's: its largest child's, the dispatcher)
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    sys.stdout.write(f"maxrss {peak}\ncpu {_cpu() - _cpu_at_go}\n")
    sys.stdout.flush()
    raise SystemExit(code)
