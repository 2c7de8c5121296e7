"""No package reaches into another package's private modules.

The packages are the core (``outbox/*.py``: the producer API and what every process
shares) and its four subpackages ``outbox.dispatcher``, ``outbox.api``,
``outbox.demo`` and ``outbox.testing``. A module named ``_something`` is private to
its package; another package may use it only through that package's public modules
(``outbox.dispatcher.delivery``, ``outbox.dispatcher.channels.base``,
``outbox.vocabulary`` ...). The one exception is :data:`KERNEL`: core modules every
process needs (settings, errors, the SQL file, connections), shipped in the same
distribution and versioned with it. Tests and benchmarks are not checked: they test
internals on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("dispatcher", "api", "demo", "testing")
KERNEL = {
    "outbox._ack_tokens": "the API verifies the acknowledgement links the dispatcher signs",
    "outbox._settings": "every process reads the same OUTBOX_* settings",
    "outbox._errors": "one exception hierarchy for callers to catch",
    "outbox._queries": "one SQL file holds every statement",
    "outbox._db": "one way to connect (timeouts, reconnects, half-open connections)",
    "outbox._templates": "the catalog the producer validates against and the renderer uses",
    "outbox._schema_check": "every process refuses an unmigrated database the same way",
    "outbox._logging": "one log format for every process",
    "outbox._embedded": "the demo and the test kit start the same embedded server",
    "outbox._migrate": "the demo migrates as outbox migrate does",
    "outbox._progress": "the demo's campaign progress is the CLI's",
    "outbox._table": "the demo prints tables as the CLI does",
}


def _package_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in SUBPACKAGES:
        return f"outbox.{parts[1]}"
    return "outbox"


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT)
    if relative.parts[0] in SUBPACKAGES:
        relative = Path("outbox", *relative.parts)
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> list[Path]:
    files = sorted((ROOT / "outbox").glob("*.py"))
    for package in SUBPACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def _imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "outbox"]


def _private_target(name: str) -> str | None:
    """The private module ``name`` is or lies in, or None when it is public."""
    parts = name.split(".")
    for index, part in enumerate(parts[1:], start=1):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[: index + 1])
    return None


def _violations() -> list[str]:
    found = []
    for path in _sources():
        importer = _package_of(_module_name(path))
        for line, name in _imports(path):
            private = _private_target(name)
            if private is None or _package_of(private) == importer:
                continue
            if private in KERNEL:
                continue
            found.append(f"{path.relative_to(ROOT)}:{line} imports {private}")
    return sorted(set(found))


def test_no_package_imports_another_packages_private_module() -> None:
    assert _violations() == []


def test_every_kernel_module_exists() -> None:
    for module in KERNEL:
        assert (ROOT / "outbox" / f"{module.split('.')[1]}.py").is_file(), module


@pytest.mark.parametrize(
    ("importer", "name", "bad"),
    [
        ("outbox.api._testsend", "outbox.dispatcher._routing.RecipientRecord", True),
        ("outbox.api._testsend", "outbox.dispatcher.delivery.RecipientRecord", False),
        ("outbox.dispatcher._store", "outbox.dispatcher._claimed.Lease", False),
        ("outbox.demo.cli", "outbox._settings.Settings", False),
        ("outbox.testing.kit", "outbox.api._auth", True),
        ("outbox.cli", "outbox.dispatcher.channels._webpush", True),
    ],
)
def test_the_rule_itself(importer: str, name: str, bad: bool) -> None:
    private = _private_target(name)
    crosses = (
        private is not None
        and _package_of(private) != _package_of(importer)
        and private not in KERNEL
    )
    assert crosses is bad


def test_the_scan_sees_every_package() -> None:
    packages = {_package_of(_module_name(path)) for path in _sources()}
    assert packages == {"outbox", *(f"outbox.{name}" for name in SUBPACKAGES)}
    names = {name for _, name in _imports(ROOT / "api" / "_testsend.py")}
    assert "outbox.dispatcher.delivery" in names and "outbox._queries" in names
