"""A PgBouncer of our own (Debian package ``pgbouncer``) in front of a PostgreSQL.

Started on a free loopback port with trust authentication, ``pool_mode`` as asked
(transaction by default), every database name forwarded to the target server;
stopped and deleted at the end. As root it runs as the ``postgres`` system user
(PgBouncer refuses to run as root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.support.binaries import find_binary
from tests.support.pg_cluster import free_port

INSTALL_HINT = (
    "pgbouncer is not installed: install it with `apt-get install -y pgbouncer` "
    "(Debian/Ubuntu) so that the PgBouncer tests can run"
)


def find_pgbouncer() -> str | None:
    """Path of the ``pgbouncer`` binary, or None."""
    return find_binary("pgbouncer")


class PgBouncer:
    """``with PgBouncer(host, port, users=["postgres"]) as bouncer: bouncer.url("db")``."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        users: list[str],
        pool_mode: str = "transaction",
        pool_size: int = 10,
    ) -> None:
        binary = find_pgbouncer()
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.binary = binary
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="outbox-pgbouncer-"))
        self.logfile = self.root / "pgbouncer.log"
        host = f"host={target_host} port={target_port}"
        (self.root / "users.txt").write_text("".join(f'"{user}" ""\n' for user in users))
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = {host}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'users.txt'}\n"
            f"pool_mode = {pool_mode}\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 500\n"
            f"logfile = {self.logfile}\n"
            f"pidfile = {self.root / 'pgbouncer.pid'}\n"
            "admin_users = postgres\n"
            "stats_users = postgres\n"
            "ignore_startup_parameters = extra_float_digits\n"
        )
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        """Start in the foreground of a child process; wait until it accepts clients."""
        command = [self.binary, str(self.root / "pgbouncer.ini")]
        if self._user is not None:
            command[1:1] = ["-u", self._user]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.root
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with psycopg.connect(
                    self.url("postgres"), connect_timeout=2, prepare_threshold=None
                ) as conn:
                    conn.execute("SELECT 1")
                return self
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start:\n{self.log_tail()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop PgBouncer and delete its folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # shut down at once
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str, user: str = "postgres") -> str:
        """A libpq URL for ``dbname`` through PgBouncer."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def show(self, what: str) -> list[dict[str, object]]:
        """``SHOW <what>`` on the admin console (simple query protocol)."""
        with psycopg.connect(
            self.url("pgbouncer"), autocommit=True, cursor_factory=psycopg.ClientCursor
        ) as admin:
            cursor = admin.execute(f"SHOW {what}", prepare=False)
            names = [column.name for column in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def log_tail(self, lines: int = 30) -> str:
        """The end of PgBouncer's log."""
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
