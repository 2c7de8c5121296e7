"""A loopback TCP proxy that can turn the connections through it into black holes.

It runs an asyncio server in a background thread, so synchronous tests and
subprocesses can use it alike. :meth:`TcpProxy.blackhole` makes every connection
open at that moment *half-open*: bytes from either side are read and thrown away,
nothing is answered and nothing is closed, as when a firewall or NAT between the
dispatcher and PostgreSQL forgets the connection or the database host vanishes.
Connections opened afterwards pass normally (a healthy path), unless
``blackhole(new_connections=True)``.

A userspace proxy cannot drop TCP segments: the kernel still acknowledges what the
client sends, so TCP keepalives and ``tcp_user_timeout`` do not fire here. What the
proxy proves is that the client notices silence on its own (client-side deadlines,
listener health checks) within a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    blackholed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``target_host:target_port``.

    A ``target_host`` that starts with ``/`` is a Unix socket directory, as in a
    libpq URL (the embedded server listens only there): the proxy then connects to
    ``target_host/.s.PGSQL.target_port``.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0
        self._pairs: set[_Pair] = set()
        self._blackhole_new = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="tcp-proxy"
        )
        self._server: asyncio.Server | None = None

    # ------------------------------------------------------------------ control

    def url(self, database_url: str) -> str:
        """``database_url`` with its host and port replaced by this proxy's (TCP)."""
        parts = urlsplit(database_url)
        netloc = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
        return urlunsplit((parts.scheme, f"{netloc}:{self.port}", parts.path, parts.query, ""))

    def start(self) -> TcpProxy:
        """Listen on a free loopback port (see :attr:`port`)."""
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Close every connection and the listening socket; stop the thread."""
        self._call(self._close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def blackhole(self, *, new_connections: bool = False) -> int:
        """Silence every open connection; return how many were silenced."""
        self._blackhole_new = new_connections

        async def silence() -> int:
            live = [pair for pair in self._pairs if not pair.blackholed]
            for pair in live:
                pair.blackholed = True
            return len(live)

        return self._call(silence())

    def heal(self) -> None:
        """New connections pass again (silenced ones stay silent, as in real life)."""
        self._blackhole_new = False

    @property
    def open_connections(self) -> int:
        """Connections currently open through the proxy (silenced ones included)."""
        return self._call(self._count())

    @property
    def live_connections(self) -> int:
        """Open connections that still carry traffic."""
        return self._call(self._count(live_only=True))

    async def _count(self, *, live_only: bool = False) -> int:
        return sum(1 for p in self._pairs if not (live_only and p.blackholed))

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    # ------------------------------------------------------------------ forwarding

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        pair = _Pair(client=writer, blackholed=self._blackhole_new)
        self._pairs.add(pair)
        try:
            if pair.blackholed:  # never reaches the server; swallow whatever comes
                pair.tasks = [asyncio.create_task(self._pump(reader, None, pair))]
            else:
                try:
                    up_reader, up_writer = await self._connect_upstream()
                except OSError:
                    return
                pair.upstream = up_writer
                pair.tasks = [
                    asyncio.create_task(self._pump(reader, up_writer, pair)),
                    asyncio.create_task(self._pump(up_reader, writer, pair)),
                ]
            await asyncio.wait(pair.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self._close_pair(pair)

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.target
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None, pair: _Pair
    ) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if pair.blackholed or writer is None:
                    continue  # dropped on the floor; the sender never hears back
                writer.write(data)
                await writer.drain()
        if pair.blackholed:
            # A black hole does not pass a close on either: keep the other side open.
            await asyncio.Event().wait()

    async def _close_pair(self, pair: _Pair) -> None:
        if pair not in self._pairs:
            return
        self._pairs.discard(pair)
        for task in pair.tasks:
            task.cancel()
        await asyncio.gather(*pair.tasks, return_exceptions=True)
        for writer in (pair.client, pair.upstream):
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
        for pair in list(self._pairs):
            await self._close_pair(pair)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        for _ in range(3):  # let the accept handlers finish their finally blocks
            await asyncio.sleep(0)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
