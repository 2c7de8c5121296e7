"""pg-outbox as a host service installs it: the bare wheel in a fresh virtual
environment is the producer and nothing more, and a service with its own ``api``
package runs the producer API and ``outbox dispatch`` side by side."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import outbox
from outbox.testing.smtp import SmtpServer

ROOT = Path(__file__).resolve().parents[2]
OUTBOX = str(Path(sys.executable).with_name("outbox"))

# A host service's own packages named like outbox's old top-level ones.
HOST_API = '"""The trading service\'s own HTTP layer."""\nSERVICE = "trading"\n'
HOST_SERVICE = """
import sys

import api  # the service's own package, not outbox's
import psycopg

import outbox

assert api.SERVICE == "trading", api.__file__
with psycopg.connect(sys.argv[1]) as conn:
    outbox.upsert_recipient(conn, "u42", email="u42@trader.test")
    conn.execute("CREATE TABLE IF NOT EXISTS positions (id int, state text)")
    conn.execute("INSERT INTO positions VALUES (7, 'close_failed')")
    message_id = outbox.enqueue(
        conn, user_id="u42", channel="email", template="price_alert",
        vars={"instrument": "EURUSD", "condition": "above", "trigger_price": "1.0840",
              "current_price": "1.0842"},
    )
print(message_id)
"""


def _host_service(folder: Path) -> Path:
    (folder / "api").mkdir(parents=True)
    (folder / "api" / "__init__.py").write_text(HOST_API)
    (folder / "dispatcher.py").write_text('"""The service\'s own job dispatcher."""\n')
    (folder / "service.py").write_text(textwrap.dedent(HOST_SERVICE))
    return folder


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment with the bare wheel (``pip install pg-outbox``)."""
    work = tmp_path_factory.mktemp("bare")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), ROOT],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (wheel,) = (work / "dist").glob("pg_outbox-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, timeout=120)
    python = work / "venv" / "bin" / "python"
    installed = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    yield python


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PYTHON"))}
    env.pop("VIRTUAL_ENV", None)
    return env | extra


@pytest.mark.timeout(400)
def test_the_bare_install_is_the_producer_without_server_smtp_or_push_libraries(
    bare_venv: Path, database_url: str, tmp_path: Path
) -> None:
    probe = (
        "import importlib.util, outbox\n"
        "from outbox import enqueue, enqueue_async, upsert_recipient, add_push_subscription\n"
        "from outbox import enqueue_campaign, version_location\n"
        "heavy = ('litestar', 'uvicorn', 'aiosmtplib', 'pywebpush', 'httpx', 'aiosmtpd')\n"
        "print(' '.join(m for m in heavy if importlib.util.find_spec(m)) or 'none')\n"
        "print(outbox.__file__)\n"
    )
    result = subprocess.run(
        [bare_venv, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    present, location = result.stdout.split()
    assert present == "none"
    assert location.startswith(str(bare_venv.parents[1]))

    # the host service, with its own `api` package, enqueues through the bare install
    service = _host_service(tmp_path / "service")
    enqueued = subprocess.run(
        [bare_venv, "service.py", database_url],
        cwd=service,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enqueued.returncode == 0, enqueued.stderr
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT user_id, template FROM outbox.message WHERE id = %s",
            [int(enqueued.stdout)],
        ).fetchone()
    assert row == ("u42", "price_alert")


@pytest.mark.timeout(400)
def test_the_bare_install_names_the_extra_a_command_needs(bare_venv: Path) -> None:
    script = bare_venv.with_name("outbox")
    version = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"outbox (pg-outbox) {outbox.__version__}"
    for command, extra in (("dispatch", "dispatcher"), ("api", "api")):
        result = subprocess.run(
            [
                script,
                command,
                "--port" if command == "api" else "--until-idle",
                *(["8000"] if command == "api" else []),
            ],
            env=_clean_env(OUTBOX_DATABASE_URL="postgresql://127.0.0.1:1/none"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert f"pip install 'pg-outbox[{extra}]'" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_service_with_its_own_api_package_runs_the_producer_and_dispatch_side_by_side(
    database_url: str,
    tmp_path: Path,
    smtp_server: SmtpServer,
) -> None:
    service = _host_service(tmp_path / "service")
    # the service's folder first on the path: its `api` and `dispatcher` shadow any
    # top-level package of those names
    env = _clean_env(
        PYTHONPATH=str(service),
        OUTBOX_DATABASE_URL=database_url,
        OUTBOX_SMTP_HOST=smtp_server.host,
        OUTBOX_SMTP_PORT=str(smtp_server.port),
        OUTBOX_SMTP_TLS="none",
        OUTBOX_SMTP_FROM="alerts@outbox.test",
        OUTBOX_SMTP_ALLOWED_SENDERS="alerts@outbox.test",
        OUTBOX_RATE_LIMITS="off",
    )
    enqueued = subprocess.run(
        [sys.executable, "service.py", database_url],
        cwd=service,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enqueued.returncode == 0, enqueued.stderr
    dispatched = subprocess.run(
        [OUTBOX, "dispatch", "--until-idle"],
        cwd=service,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert dispatched.returncode == 0, dispatched.stderr
    [mail] = smtp_server.wait_for_messages(1)
    assert mail.rcpt_tos == ("u42@trader.test",)
    with psycopg.connect(database_url) as conn:
        left: Any = conn.execute(
            "SELECT count(*) FROM outbox.message WHERE status <> 'sent'"
        ).fetchone()
    assert left == (0,)
