"""The adopter's documents stay true: the sample .env names only real settings, and
every install hint names the distribution that exists (pg-outbox)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["outbox", "dispatcher", "api"]


def _read_in_code() -> set[str]:
    names: set[str] = set()
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r"OUTBOX_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
    return names


def test_the_sample_env_names_only_settings_the_code_reads_and_the_readme_documents() -> None:
    sample = (ROOT / "examples" / ".env.sample").read_text(encoding="utf-8")
    named = set(re.findall(r"^#?\s*(OUTBOX_[A-Z0-9_]+)=", sample, flags=re.MULTILINE))
    assert {"OUTBOX_DATABASE_URL", "OUTBOX_VAPID_PRIVATE_KEY", "OUTBOX_TELEGRAM_BOT_TOKEN"} <= named
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert named - _read_in_code() == set()
    assert {n for n in named if f"`{n}`" not in readme} == set()


def test_install_hints_name_the_pg_outbox_distribution() -> None:
    stale = []
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    for folder in ["outbox", "dispatcher", "api", "demo", "testing"]:
        files += list((ROOT / folder).rglob("*.py"))
    for path in files:
        text = path.read_text(encoding="utf-8")
        stale += [
            f"{path.relative_to(ROOT)}: {m}" for m in re.findall(r"install[^\n]*'outbox\[", text)
        ]
    assert stale == []
