"""A non-editable install ships sql/, templates/, migrations/ and the browser client
(api/static/) as package data."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_the_wheel_carries_the_data_folders_and_finds_them_when_installed(
    tmp_path: Path,
) -> None:
    # Build from a copy without build/ or *.egg-info: setuptools reuses a stale
    # build/lib of the working tree, which would hide (or fake) what a clean clone ships.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", ".ci-venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (wheel,) = (tmp_path / "dist").glob("pg_outbox-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "outbox/sql/schema.sql",
        "outbox/sql/queries.sql",
        "outbox/migrations/env.py",
        "outbox/migrations/script.py.mako",
        "outbox/migrations/versions/outbox_0001_initial.py",
        "outbox/migrations/versions/outbox_0001_initial.upgrade.sql",
        "outbox/migrations/versions/outbox_0001_initial.downgrade.sql",
        "outbox/dispatcher/__init__.py",
        "outbox/dispatcher/channels/email.py",
        "outbox/api/__init__.py",
        "outbox/demo/__init__.py",
        "outbox/demo/demo.sql",
        "outbox/testing/__init__.py",
        "outbox/testing/smtp.py",
        "outbox/api/static/outbox-push.js",
        "outbox/api/static/outbox-sw.js",
        "outbox/api/static/outbox-demo.html",
    ):
        assert expected in names, f"{expected} missing from {wheel.name}"
    assert any(n.startswith("outbox/templates/email/") and n.endswith(".j2") for n in names)
    # one import root: a host service's own `api` or `dispatcher` package never clashes
    top_level = {n.split("/")[0] for n in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"outbox"}

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )
    probe = (
        "import outbox, outbox._queries as q, outbox._migrate as m, pathlib;"
        f"assert outbox.__file__.startswith({str(target)!r}), outbox.__file__;"
        "assert 'CREATE TABLE outbox.message' in q.read_sql_file('schema.sql');"
        "assert 'enqueue' in q.load_queries();"
        "assert (pathlib.Path(m.version_location()) / 'outbox_0001_initial.upgrade.sql').is_file();"
        # the API serves the browser client from the installed package
        "from litestar.testing import TestClient;"
        "from outbox._settings import Secret, Settings;"
        "import outbox.api as api;"
        f"assert api.__file__.startswith({str(target)!r}), api.__file__;"
        "s = Settings(api_jwt_secret=Secret('x' * 40), database_url='postgresql://127.0.0.1:9/x');"
        "c = TestClient(api.create_app(s, channels={}));"
        "rs = [c.get('/static/' + n) for n in ('outbox-push.js', 'outbox-sw.js')];"
        "assert [r.status_code for r in rs] == [200, 200], rs;"
        "assert {r.headers['content-type'] for r in rs} == {'text/javascript; charset=utf-8'};"
        "assert b'showNotification' in rs[1].content;"
        "assert c.get('/static/outbox-demo.html').status_code == 200"
    )
    # run from an unrelated folder so the repository is not on sys.path
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {probe}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
