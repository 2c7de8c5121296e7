"""Layer rules: outbox (producer side) imports neither dispatcher nor api."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_linter_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken" in result.stdout


def test_no_module_of_outbox_imports_dispatcher_or_api() -> None:
    offenders = []
    for path in (ROOT / "outbox").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [
                f"{path.name}: {name}"
                for name in names
                if name.split(".")[0] in ("dispatcher", "api")
            ]
    assert offenders == []


def test_the_command_line_does_not_import_the_web_framework() -> None:
    """Every ``outbox`` command builds the whole parser, ``outbox api`` included;
    only ``outbox api`` itself may pay for importing Litestar (about 0.5 s)."""
    probe = (
        "import sys\n"
        "from outbox.cli import build_parser\n"
        "build_parser()\n"
        "heavy = sorted(m for m in ('litestar', 'uvicorn') if m in sys.modules)\n"
        "print(','.join(heavy) or 'none')\n"
        "import api\n"
        "api.create_app\n"
        "print('litestar' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["none", "True"]
