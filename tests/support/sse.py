"""Read a Server-Sent Events stream as a browser's EventSource would.

    async with httpx.AsyncClient() as http, http.stream("GET", url, headers=...) as r:
        async with SseReader(r) as reader:
            event = await reader.next_event(timeout=2)     # the next event with data
            comment = await reader.next_comment(timeout=2)  # "connected", "heartbeat"

One task reads the response and parses it into queues, so a wait that times out
never interrupts the read itself (cancelling httpx's line iterator would end it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

import httpx

_END = object()


@dataclass(frozen=True)
class SseEvent:
    """One dispatched event: the fields the browser hands to a listener."""

    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class SseReader:
    """Parses the stream into events and comments; ``retry`` is the last ``retry:``."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.retry: int | None = None
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._comments: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SseReader:
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await self._task

    async def next_event(self, timeout: float) -> SseEvent:
        """The next event; TimeoutError when none comes in time, EOFError at the end."""
        return await self._next(self._events, timeout)  # type: ignore[no-any-return]

    async def next_comment(self, timeout: float) -> str:
        """The next comment line's text (``: heartbeat`` gives ``heartbeat``)."""
        return await self._next(self._comments, timeout)  # type: ignore[no-any-return]

    async def _next(self, queue: asyncio.Queue[Any], timeout: float) -> Any:
        item = await asyncio.wait_for(queue.get(), timeout)
        if item is _END:
            queue.put_nowait(_END)  # every later call ends too
            raise EOFError("the stream ended")
        return item

    async def _read(self) -> None:
        event_id: str | None = None
        event_type = "message"
        data: list[str] = []
        try:
            async for line in self.response.aiter_lines():
                if line.startswith(":"):
                    self._comments.put_nowait(line[1:].strip())
                    continue
                if line == "":
                    if data:
                        self._events.put_nowait(SseEvent(event_id, event_type, "\n".join(data)))
                    event_id, event_type, data = None, "message", []
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                elif name == "id":
                    event_id = value
                elif name == "event":
                    event_type = value
                elif name == "retry" and value.isdigit():
                    self.retry = int(value)
        finally:
            self._events.put_nowait(_END)
            self._comments.put_nowait(_END)
