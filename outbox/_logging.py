"""Logging for every outbox process: one set-up, text or JSON, never blocking.

``OUTBOX_LOG_LEVEL`` (``INFO``) and ``OUTBOX_LOG_FORMAT`` (``text`` or ``json``: one
JSON object a line with ``ts``, ``level``, ``logger``, ``msg``, the record's extra
fields, and ``exc`` for an exception) configure the dispatcher, the API, the CLI
and the demo alike.

Records go through a bounded queue to one writer thread. A process whose output
nobody reads (a full pipe, a stalled log shipper) blocks that thread only: the
event loop keeps claiming, sending and renewing leases, and records that find the
queue full are dropped and counted (the count is logged when the writer catches
up). A synchronous handler once froze three dispatchers with 1,070 messages leased
until their leases ran out.

Libraries that log a line per request (httpx, httpcore, uvicorn's access log) and
Alembic's plugin notices are held at WARNING unless the level is DEBUG: a
successful delivery writes no line at INFO.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from outbox._errors import ConfigurationError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
QUEUE_SIZE = 10_000
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
NOISY_LOGGERS = (
    "httpx",
    "httpcore",
    "uvicorn.access",
    "alembic.runtime.plugins",
    "asyncio",
    "aiosmtplib",
    "hpack",
)

# What every LogRecord has: anything else on a record is an event field (extra=...).
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, msg, the event's fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Enqueue without ever waiting: a full queue drops the record and counts it."""

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self.dropped = 0
        self._lock = threading.Lock()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """A picklable copy: the message merged with its args, the traceback as text
        (kept apart from the message, so JSON gets it under ``exc``).
        """
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = _PLAIN.formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def take_dropped(self) -> int:
        with self._lock:
            dropped, self.dropped = self.dropped, 0
        return dropped


class _Writer(logging.StreamHandler[TextIO]):
    """The writer thread's handler; reports records the queue had to drop."""

    def __init__(self, stream: TextIO, source: DroppingQueueHandler) -> None:
        super().__init__(stream)
        self._source = source

    def emit(self, record: logging.LogRecord) -> None:
        dropped = self._source.take_dropped()
        if dropped:
            note = logging.LogRecord(
                "outbox.logging",
                logging.WARNING,
                __file__,
                0,
                "%d log record(s) dropped: the log output was not read fast enough",
                (dropped,),
                None,
            )
            super().emit(note)
        super().emit(record)


_listener: logging.handlers.QueueListener | None = None
_PLAIN = logging.Formatter()


def parse_level(env: Mapping[str, str]) -> int:
    raw = (env.get("OUTBOX_LOG_LEVEL") or "INFO").strip().upper()
    if raw not in LEVELS:
        given = env.get("OUTBOX_LOG_LEVEL")
        raise ConfigurationError(
            f"OUTBOX_LOG_LEVEL must be one of {', '.join(LEVELS)}, not {given!r}"
        )
    return int(getattr(logging, raw))


def parse_format(env: Mapping[str, str]) -> str:
    raw = (env.get("OUTBOX_LOG_FORMAT") or "text").strip().lower()
    if raw not in FORMATS:
        raise ConfigurationError(
            f"OUTBOX_LOG_FORMAT must be text or json, not {env.get('OUTBOX_LOG_FORMAT')!r}"
        )
    return raw


def configure_logging(
    environ: Mapping[str, str] | None = None,
    *,
    verbose: bool = False,
    stream: TextIO | None = None,
) -> None:
    """Set up the root logger from ``OUTBOX_LOG_LEVEL`` and ``OUTBOX_LOG_FORMAT``.

    ``verbose`` (the CLI's ``-v``) means DEBUG. Calling it again replaces the
    previous set-up. Raises ConfigurationError for an unknown level or format.
    """
    global _listener
    env = os.environ if environ is None else environ
    level = logging.DEBUG if verbose else parse_level(env)
    formatter: logging.Formatter = (
        JsonFormatter() if parse_format(env) == "json" else logging.Formatter(TEXT_FORMAT)
    )
    stop_logging()
    records: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_SIZE)
    handler = DroppingQueueHandler(records)
    writer = _Writer(stream or sys.stderr, handler)
    writer.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        # ours from an earlier set-up, and logging.basicConfig's default; a host's
        # own handlers (pytest's capture, an APM agent) stay
        if isinstance(old, DroppingQueueHandler) or (
            type(old) is logging.StreamHandler and old.stream in (sys.stderr, sys.stdout)
        ):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.DEBUG if level <= logging.DEBUG else logging.WARNING
        )
    _listener = logging.handlers.QueueListener(records, writer, respect_handler_level=False)
    _listener.start()


def stop_logging(timeout: float = 2.0) -> None:
    """Flush what is queued and stop the writer (at exit, or before a new set-up).

    Waits at most ``timeout`` seconds: a writer stuck on a full pipe must not keep a
    stopping process alive (the thread is a daemon; what it still holds is lost).
    """
    global _listener
    listener, _listener = _listener, None
    if listener is None:
        return
    with contextlib.suppress(queue.Full):
        listener.enqueue_sentinel()
    thread = listener._thread  # QueueListener.stop() would join without a timeout
    if thread is not None:
        thread.join(timeout)
        listener._thread = None


atexit.register(stop_logging)
