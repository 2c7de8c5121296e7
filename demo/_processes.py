"""The subprocesses of a demo run: ``outbox dispatch`` replicas and ``outbox api``.

They run as in production: separate processes, configured only through ``OUTBOX_*``
variables. The user's own ``OUTBOX_*`` variables are left out, so a demo never
sends through real providers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The demo's settings only: the user's own OUTBOX_* variables are left out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(extra)
    return env


def outbox_command(*args: str) -> list[str]:
    """``outbox ARGS`` with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "outbox.cli", *args]


@dataclass
class Processes:
    """The subprocesses one demo run started, by name."""

    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: Mapping[str, str], log: Path) -> None:
        """Start ``args`` with exactly ``env``, output to ``log``."""
        with log.open("wb") as output:
            process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                args,
                env=dict(env),
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.processes.append((name, process))

    def dead(self) -> list[str]:
        """The names of those that exited."""
        return [name for name, process in self.processes if process.poll() is not None]

    def stop(self, timeout: float = 20.0) -> list[int | None]:
        """SIGTERM all, wait (then SIGKILL); return the exit codes (None: killed)."""
        for _, process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for _, process in self.processes:
            try:
                codes.append(process.wait(timeout))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
                codes.append(None)
        self.processes.clear()
        return codes
