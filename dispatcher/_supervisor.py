"""``outbox dispatch --processes N``: N dispatcher processes behind one command and one port.

One dispatcher is one event loop, so it keeps one core busy at most. The supervisor
is a plain synchronous process (no event loop, no database connection of its own
beyond the readiness probe) that:

- starts each child by running the same command again (``python -m outbox dispatch
  ... --supervised-fd FD``) instead of forking: no event loop, connection pool or
  thread is ever copied into a child, which builds its own like a replica started by
  hand;
- hands each child one end of a socket pair (:class:`SupervisorLink` is the child's
  end): the child writes ``ready`` once it dispatches, and stops gracefully when the
  socket reaches end-of-file, which happens when the supervisor is gone, even killed
  by SIGKILL: no orphan goes on delivering unsupervised;
- restarts a child that dies unexpectedly, after a delay that doubles from
  :data:`FIRST_RESTART_DELAY_SECONDS` to :data:`MAX_RESTART_DELAY_SECONDS` (a child
  that crashes at start-up does not spin a core) and starts again from the first
  once a child has run :data:`STABLE_AFTER_SECONDS`; the messages a dead child
  leased come back when their lease expires, as with any dead replica;
- on SIGTERM or SIGINT sends SIGTERM to every child and waits for their graceful
  stop: the shutdown grace for sends under way, plus :data:`STOP_MARGIN_SECONDS` to
  write their outcomes and give leases back. A child still running then is killed
  (its leases expire, delivery stays at least once) and the exit status is 1;
- serves the one ``--metrics-port``: every child's counters summed by
  prometheus-client's multiprocess mode (a private ``PROMETHEUS_MULTIPROC_DIR``,
  removed at exit), its own ``outbox_dispatcher_restarts_total``, and ``/livez`` and
  ``/readyz`` for all of them. Children never open the port.

Children start in a session of their own, so a Ctrl-C at a terminal reaches the
supervisor alone and each child gets exactly one SIGTERM from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from outbox._settings import Settings

log = logging.getLogger("outbox.supervisor")

READY = b"ready\n"
"""What a child writes on its link once it dispatches."""
FIRST_RESTART_DELAY_SECONDS = 0.5
MAX_RESTART_DELAY_SECONDS = 30.0
STABLE_AFTER_SECONDS = 60.0
"""A child that ran this long before it died is restarted after the first delay again."""
STOP_MARGIN_SECONDS = 5.0
"""After the shutdown grace: time for the last acknowledgements and lease releases."""
LOOP_STALL_SECONDS = 10.0
"""``/livez`` fails when the supervision loop (which turns at least every second) has
not turned for this long: nobody would restart a child that dies."""
EXIT_CONFIGURATION = 2
"""A child's exit status for bad configuration (the CLI's): restarting cannot help."""
EXIT_FAILED = 1


@dataclass(frozen=True, kw_only=True)
class SupervisorOptions:
    """What the supervisor needs from the command line."""

    processes: int
    child_args: tuple[str, ...]
    """``outbox`` arguments of every child (``dispatch ...``), before ``--supervised-fd``."""
    shutdown_grace_seconds: float
    until_idle: bool = False
    """Children that exit 0 have finished (idle); the supervisor ends when all have."""
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"  # noqa: S104
    dispatcher_id: str | None = None
    """``OUTBOX_DISPATCHER_ID``: child ``n`` is named ``<id>/<n>``; unset, each child
    takes the default ``host:pid:random``, distinct already."""

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ValueError("processes must be at least 1")


class _Child:
    """One slot of the N: the process in it now, and how it fared so far."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.link: socket.socket | None = None
        self.ready = False
        self.started_at = 0.0
        self.starts = 0
        self.failures = 0
        """Unexpected ends in a row (a run of STABLE_AFTER_SECONDS resets it)."""
        self.restart_at: float | None = None
        self.finished = False
        """Exited 0 under ``until_idle``: done for good."""

    @property
    def running(self) -> bool:
        return self.process is not None

    def state(self) -> str:
        if self.finished:
            return "finished"
        if self.process is None:
            return "restarting"
        return "ready" if self.ready else "starting"


class Supervisor:
    """Runs ``options.processes`` dispatcher children until told to stop."""

    def __init__(self, settings: Settings, options: SupervisorOptions) -> None:
        self.settings = settings
        self.options = options
        self._children = [_Child(n) for n in range(1, options.processes + 1)]
        self._lock = threading.Lock()  # the HTTP thread reads the children's states
        self._selector = selectors.DefaultSelector()
        self._signalled: int | None = None
        self._failed: int | None = None
        self._turned_at = time.monotonic()
        self._metrics_dir: str | None = None
        self._restarts: Any = None  # a prometheus Counter when metrics are served
        self._database: Any = None  # DatabaseHealth when metrics are served

    # ------------------------------------------------------------------ running

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (or, ``until_idle``, until every child
        finished); the exit status: 0, or 1 when a child had to be killed or failed,
        or 2 when a child refused its configuration.
        """
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        self._selector.register(wake_read, selectors.EVENT_READ, None)
        previous_wakeup = signal.set_wakeup_fd(wake_write)
        previous = {
            signum: signal.signal(signum, handler)
            for signum, handler in (
                (signal.SIGTERM, self._on_stop_signal),
                (signal.SIGINT, self._on_stop_signal),
                # only so that a child's end wakes the loop through the wakeup fd
                (signal.SIGCHLD, _ignore),
            )
        }
        try:
            if self.options.metrics_port is not None:
                self._serve_metrics(self.options.metrics_port)
            for child in self._children:
                self._start(child)
            log.info(
                "supervising %d dispatcher processes pids=%s",
                len(self._children),
                ",".join(str(c.process.pid) for c in self._children if c.process is not None),
            )
            self._supervise()
            status = self._stop_children()
            return self._failed if self._failed is not None else status
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._selector.close()
            os.close(wake_read)
            os.close(wake_write)
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._signalled is None:
            self._signalled = signum

    def _supervise(self) -> None:
        while self._signalled is None and self._failed is None:
            self._turned_at = time.monotonic()
            self._reap()
            if self._children and all(c.finished for c in self._children):
                log.info("every dispatcher process is idle and has exited")
                return
            self._restart_due()
            self._wait(self._next_timeout())
        if self._signalled is not None:
            log.info(
                "%s: stopping %d dispatcher processes",
                signal.Signals(self._signalled).name,
                sum(1 for c in self._children if c.running),
            )

    def _next_timeout(self) -> float:
        timeout = 1.0
        now = time.monotonic()
        for child in self._children:
            if child.restart_at is not None:
                timeout = min(timeout, max(0.0, child.restart_at - now))
        return timeout

    def _wait(self, timeout: float) -> None:
        """Until a signal, a child's message or ``timeout``; handle the messages."""
        for key, _ in self._selector.select(timeout):
            if key.data is None:  # the wakeup fd: its bytes carry no information
                with contextlib.suppress(BlockingIOError):
                    os.read(key.fd, 512)
            else:
                self._read_link(key.data)

    def _read_link(self, child: _Child) -> None:
        if child.link is None:
            return
        try:
            data = child.link.recv(512)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the child closed it: it is exiting; _reap sees how
            self._close_link(child)
            return
        if READY in data:
            with self._lock:
                child.ready = True
            log.info("dispatcher process %d is ready pid=%s", child.index, _pid(child))

    # ------------------------------------------------------------------ children

    def _start(self, child: _Child) -> None:
        parent_end, child_end = socket.socketpair()
        argv = [
            sys.executable,
            "-m",
            "outbox",
            *self.options.child_args,
            "--supervised-fd",
            str(child_end.fileno()),
        ]
        try:
            process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                argv,
                env=self._child_environment(child),
                stdin=subprocess.DEVNULL,
                pass_fds=(child_end.fileno(),),
                start_new_session=True,
            )
        except OSError as error:
            parent_end.close()
            child_end.close()
            log.error("cannot start dispatcher process %d: %s", child.index, error)
            self._schedule_restart(child, ran_seconds=0.0)
            return
        child_end.close()
        parent_end.setblocking(False)
        self._selector.register(parent_end, selectors.EVENT_READ, child)
        with self._lock:
            child.process = process
            child.link = parent_end
            child.ready = False
            child.restart_at = None
        child.started_at = time.monotonic()
        child.starts += 1
        if child.starts > 1 and self._restarts is not None:
            self._restarts.inc()

    def _child_environment(self, child: _Child) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.pop("prometheus_multiproc_dir", None)
        if self._metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        if self.options.dispatcher_id:
            env["OUTBOX_DISPATCHER_ID"] = f"{self.options.dispatcher_id}/{child.index}"
        return env

    def _reap(self) -> None:
        for child in self._children:
            if child.process is None:
                continue
            code = child.process.poll()
            if code is not None:
                self._ended(child, code)

    def _ended(self, child: _Child, code: int) -> None:
        pid = _pid(child)
        ran = time.monotonic() - child.started_at
        self._forget(child)
        if self.options.until_idle and code == 0:
            child.finished = True
            log.info("dispatcher process %d is idle and exited pid=%s", child.index, pid)
            return
        if code == EXIT_CONFIGURATION or (self.options.until_idle and code == EXIT_FAILED):
            log.error(
                "dispatcher process %d pid=%s failed (%s): stopping the others",
                child.index,
                pid,
                _describe_exit(code),
            )
            self._failed = code
            return
        delay = self._schedule_restart(child, ran_seconds=ran)
        log.error(
            "dispatcher process %d pid=%s ended unexpectedly (%s) after %.1fs;"
            " restarting it in %.1fs",
            child.index,
            pid,
            _describe_exit(code),
            ran,
            delay,
        )

    def _schedule_restart(self, child: _Child, *, ran_seconds: float) -> float:
        child.failures = 1 if ran_seconds >= STABLE_AFTER_SECONDS else child.failures + 1
        delay = min(
            MAX_RESTART_DELAY_SECONDS,
            FIRST_RESTART_DELAY_SECONDS * (1 << min(child.failures - 1, 16)),
        )
        with self._lock:
            child.restart_at = time.monotonic() + delay
        return delay

    def _restart_due(self) -> None:
        now = time.monotonic()
        for child in self._children:
            if child.restart_at is not None and child.restart_at <= now:
                self._start(child)
                if child.process is not None:
                    log.info(
                        "dispatcher process %d restarted pid=%d", child.index, child.process.pid
                    )

    def _forget(self, child: _Child) -> None:
        """The child's process has ended: drop its link and its live metric files."""
        pid = child.process.pid if child.process is not None else None
        self._close_link(child)
        with self._lock:
            child.process = None
            child.ready = False
        if pid is not None and self._metrics_dir is not None:
            from prometheus_client.multiprocess import mark_process_dead

            # removes its live-gauge files only; its counters keep counting in the sum
            mark_process_dead(pid, self._metrics_dir)  # type: ignore[no-untyped-call]

    def _close_link(self, child: _Child) -> None:
        if child.link is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(child.link)
            child.link.close()
            child.link = None

    # ------------------------------------------------------------------ stopping

    def _stop_children(self) -> int:
        """SIGTERM to every child, wait for their graceful stop; 1 if one had to be
        killed or exited with an error.
        """
        status = 0
        for child in self._children:
            child.restart_at = None
            if child.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        allowed = self.options.shutdown_grace_seconds + STOP_MARGIN_SECONDS
        deadline = time.monotonic() + allowed
        while any(c.running for c in self._children):
            self._turned_at = time.monotonic()
            for child in self._children:
                if child.process is None:
                    continue
                code = child.process.poll()
                if code is None:
                    continue
                # -SIGTERM: it died of the signal itself, before its handler was set
                # up, which comes before its first connection: it held nothing
                if code not in (0, -signal.SIGTERM):
                    log.error(
                        "dispatcher process %d pid=%s stopped with %s",
                        child.index,
                        _pid(child),
                        _describe_exit(code),
                    )
                    status = EXIT_FAILED
                self._forget(child)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wait(min(0.2, remaining))
        for child in self._children:
            if child.process is not None:
                log.error(
                    "dispatcher process %d pid=%s did not stop within %.0fs: killed;"
                    " its leases expire and other replicas take its messages over",
                    child.index,
                    _pid(child),
                    allowed,
                )
                child.process.kill()
                child.process.wait()
                self._forget(child)
                status = EXIT_FAILED
        log.info("supervisor stopped status=%d", status)
        return status

    # ------------------------------------------------------------------ observing

    def _serve_metrics(self, port: int) -> None:
        from prometheus_client import CollectorRegistry, Counter
        from prometheus_client.multiprocess import MultiProcessCollector

        from outbox.dispatcher.metrics import DatabaseHealth, serve_metrics

        # private to this run (mode 0700), so no stale file of an earlier run is summed
        self._metrics_dir = tempfile.mkdtemp(prefix="outbox-metrics-")
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]
        # in this process's memory, not in the directory: counted once
        self._restarts = Counter(
            "outbox_dispatcher_restarts_total",
            "Dispatcher processes the supervisor restarted after they ended unexpectedly",
            registry=registry,
        )
        self._database = DatabaseHealth(self.settings.database_url)
        serve_metrics(
            port, self.settings, addr=self.options.metrics_addr, registry=registry, health=self
        )

    def live(self) -> str | None:
        """Fine while the supervision loop turns: every child is then alive or being
        restarted.
        """
        stalled = time.monotonic() - self._turned_at
        if stalled > LOOP_STALL_SECONDS:
            return f"the supervisor has not looked at its processes for {stalled:.0f}s"
        return None

    def ready(self) -> str | None:
        """The database answers and is migrated (its problem first: it is the cause
        when every child waits), and every child dispatches.
        """
        problem: str | None = self._database.ready() if self._database is not None else None
        if problem is not None:
            return problem
        with self._lock:
            states = [(c.index, c.state()) for c in self._children]
        waiting = [f"{n} {state}" for n, state in states if state in {"starting", "restarting"}]
        if waiting:
            return f"dispatcher processes not ready (of {len(states)}): " + ", ".join(waiting)
        return None


def _ignore(signum: int, frame: FrameType | None) -> None:
    return


def _pid(child: _Child) -> str:
    return str(child.process.pid) if child.process is not None else "?"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def run_supervisor(settings: Settings, options: SupervisorOptions) -> int:
    """Supervise ``options.processes`` children in the foreground; the exit status."""
    return Supervisor(settings, options).run()


def child_arguments(
    *,
    verbose: bool,
    concurrency: int,
    batch_size: int,
    shutdown_grace: str,
    until_idle: bool,
    idle_horizon: str,
    urgent_reserve: int = 25,
) -> tuple[str, ...]:
    """The ``outbox`` arguments that make a child the dispatcher the user asked for."""
    args: list[str] = ["-v"] if verbose else []
    args += [
        "dispatch",
        "--concurrency",
        str(concurrency),
        "--batch-size",
        str(batch_size),
        "--urgent-reserve",
        str(urgent_reserve),
        "--shutdown-grace",
        shutdown_grace,
        "--idle-horizon",
        idle_horizon,
    ]
    if until_idle:
        args.append("--until-idle")
    return tuple(args)


class SupervisorLink:
    """A child's end of the socket pair its supervisor passed it (``--supervised-fd``)."""

    def __init__(self, fd: int) -> None:
        self._socket = socket.socket(fileno=fd)
        self._socket.setblocking(False)

    def watch(self, loop: asyncio.AbstractEventLoop, on_lost: Callable[[], None]) -> None:
        """Call ``on_lost`` once the supervisor is gone (end-of-file on the link)."""
        fd = self._socket.fileno()

        def readable() -> None:
            try:
                data = self._socket.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                log.warning("the supervisor is gone: stopping")
                on_lost()

        loop.add_reader(fd, readable)

    def report_ready(self) -> None:
        """Tell the supervisor this child dispatches now."""
        with contextlib.suppress(OSError):
            self._socket.send(READY)

    def close(self) -> None:
        self._socket.close()


def parse_processes(text: str, cpu_count: Callable[[], int] | None = None) -> int:
    """``--processes``: a whole number >= 1, or ``auto`` for the CPUs this process may
    run on. Raises ValueError with a message for the user.
    """
    if text.strip().lower() == "auto":
        return (cpu_count or usable_cpus)()
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a number of processes or 'auto', not {text!r}") from None
    if value < 1:
        raise ValueError(f"at least 1 process (or 'auto'), not {value}")
    return value


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; a container's cpuset)."""
    process_cpu_count: Callable[[], int | None] | None = getattr(os, "process_cpu_count", None)
    if process_cpu_count is not None:
        return process_cpu_count() or 1
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1
