"""A missing system program skips its tests on a developer's machine, fails them in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.binaries import REQUIRE_ALL, find_binary, require_binary

ROOT = Path(__file__).resolve().parents[2]
ABSENT = "outbox-no-such-program-7f3a"

PROBE = f"""
from tests.support.binaries import require_binary

def test_needs_it():
    require_binary({ABSENT!r}, "a probe: apt-get install nothing")
"""


def run_probe(tmp_path: Path, require_all: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_ALL}
    if require_all is not None:
        env[REQUIRE_ALL] = require_all
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            str(tmp_path / "test_probe.py"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )


def test_a_missing_program_skips_with_its_reason(tmp_path: Path) -> None:
    result = run_probe(tmp_path, None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert f"{ABSENT} is not installed (a probe: apt-get install nothing)" in result.stdout


def test_a_missing_program_fails_when_ci_requires_everything(tmp_path: Path) -> None:
    result = run_probe(tmp_path, "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed" in result.stdout
    assert f"{REQUIRE_ALL}=1 forbids skipping it" in result.stdout


def test_a_present_program_is_found_with_its_path() -> None:
    path = require_binary("sh", "a shell")
    assert Path(path).name == "sh" and find_binary("sh") == path


def test_sbin_programs_are_found_off_path(monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/usr/sbin/nologin").exists():
        pytest.fail("expected /usr/sbin/nologin on a Debian machine")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_binary("nologin") is not None
