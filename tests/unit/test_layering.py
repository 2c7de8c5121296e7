"""Layer rules: the producer modules of ``outbox`` import neither ``outbox.dispatcher``
nor ``outbox.api``; the dispatcher does not import the API."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# folders that install under outbox but are not producer code
NOT_PRODUCER = {"dispatcher", "api", "demo", "testing"}


def _producer_modules() -> list[Path]:
    """Every module of the producer: outbox/*.py (the linked subpackages excluded)."""
    return sorted(p for p in (ROOT / "outbox").glob("*.py"))


def _imported_names(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module == "outbox":
                names += [f"outbox.{alias.name}" for alias in node.names]
    return names


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


def test_the_producer_contract_names_every_producer_module() -> None:
    """import-linter cannot say "outbox but not its subpackages", so the contract lists
    the producer modules one by one; a module added later must join the list."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (contract,) = [
        c
        for c in config["tool"]["importlinter"]["contracts"]
        if "outbox.dispatcher" in c["forbidden_modules"] and "outbox.cli" in c["source_modules"]
    ]
    modules = {f"outbox.{p.stem}" for p in _producer_modules() if p.name != "__init__.py"}
    assert set(contract["source_modules"]) == modules


def test_no_producer_module_imports_the_dispatcher_or_the_api() -> None:
    offenders = [
        f"{path.name}: {name}"
        for path in _producer_modules()
        for name in _imported_names(path)
        if name.split(".")[0] in ("dispatcher", "api")
        or (name.startswith("outbox.") and name.split(".")[1] in NOT_PRODUCER)
    ]
    assert offenders == []


def test_nothing_imports_the_old_top_level_names() -> None:
    """``dispatcher`` and ``api`` are no import roots any more: a host service may
    have packages of those names."""
    folders = ["outbox", "dispatcher", "api", "demo", "testing", "tests", "bench", "examples"]
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for folder in folders
        if (ROOT / folder).is_dir() and not (ROOT / folder).is_symlink()
        for path in (ROOT / folder).rglob("*.py")
        for name in _imported_names(path)
        if name.split(".")[0] in ("dispatcher", "api", "demo", "testing")
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
        "from outbox import api\n"
        "api.create_app\n"
        "print('litestar' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["none", "True"]
