"""A plain-text progress bar for long commands (campaigns, redrives, the demo).

It writes to standard error, so standard output stays what scripts parse. On a
terminal the line is redrawn in place after a carriage return, at most ten times a
second; on anything else (a log file, CI, a pipe) it prints a whole line every
``interval`` seconds and once more at the end, so logs get a handful of lines::

    with ProgressBar("campaign", total=len(users), unit="messages") as bar:
        enqueue_campaign(conn, users, ..., progress=bar.update)

    campaign  [##############----------------]  4,000/8,500   47%  2,310/s  1.7s

No dependency beyond the standard library.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self, TextIO

TTY_REDRAW = 0.1
"""Seconds between redraws on a terminal."""
LOG_INTERVAL = 2.0
"""Seconds between lines when the stream is not a terminal."""


def _count(value: int) -> str:
    return f"{value:,}"


class ProgressBar:
    """Progress of ``done`` out of ``total`` (the total may grow, or be unknown).

    ``update(done)`` records the latest count and redraws when due; ``close()``
    draws the final state and ends the line. Writing errors (a closed pipe) are
    ignored: a progress bar never fails the work it reports on.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "",
        stream: TextIO | None = None,
        width: int = 30,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.note = ""
        self._stream = stream if stream is not None else sys.stderr
        self._width = width
        self._clock = clock
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._interval = (
            interval if interval is not None else (TTY_REDRAW if self._tty else LOG_INTERVAL)
        )
        self._started = clock()
        self._last_draw: float | None = None
        self._last_drawn: tuple[int, int | None, str] | None = None
        self._last_len = 0
        self._closed = False

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was created."""
        return self._clock() - self._started

    def update(self, done: int, *, total: int | None = None, note: str | None = None) -> None:
        """Record progress (``done`` so far) and redraw if the last draw is old enough."""
        self.done = done
        if total is not None:
            self.total = total
        if note is not None:
            self.note = note
        now = self._clock()
        if self._last_draw is None or now - self._last_draw >= self._interval:
            self._draw(final=False)
            self._last_draw = now

    def close(self, note: str | None = None) -> None:
        """Draw the final state and end the line (idempotent)."""
        if self._closed:
            return
        if note is not None:
            self.note = note
        self._closed = True
        if not self._tty and self._last_drawn == (self.done, self.total, self.note):
            return  # that line is already in the log
        self._draw(final=True)

    def render(self) -> str:
        """The current line, without carriage return or newline."""
        parts = [self.label]
        total = self.total
        if total is not None and total > 0:
            fraction = min(max(self.done / total, 0.0), 1.0)
            filled = round(fraction * self._width)
            parts.append("[" + "#" * filled + "-" * (self._width - filled) + "]")
            parts.append(f"{_count(self.done)}/{_count(total)}")
            parts.append(f"{fraction:4.0%}")
        else:
            parts.append(_count(self.done) + (f" {self.unit}" if self.unit else ""))
        elapsed = self.elapsed
        if elapsed > 0 and self.done > 0:
            parts.append(f"{_count(round(self.done / elapsed))}/s")
        parts.append(f"{elapsed:.1f}s")
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)

    def _draw(self, *, final: bool) -> None:
        self._last_drawn = (self.done, self.total, self.note)
        line = self.render()
        try:
            if self._tty:
                padding = " " * max(self._last_len - len(line), 0)
                self._stream.write("\r" + line + padding + ("\n" if final else ""))
                self._last_len = len(line)
            else:
                self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # closed pipe or stream
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(note="interrupted" if exc_type is not None else None)
