"""System programs some tests need (PgBouncer, kubectl, ...), found or explained.

A developer's machine may lack them: those tests then skip with a reason that says
what to install, so the README's test command passes on a fresh machine. CI sets
``OUTBOX_TEST_REQUIRE_ALL=1`` (``.ci/run`` installs every such program), and there a
missing program fails the test instead: a skip must never hide a gap in CI.
"""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_ALL = "OUTBOX_TEST_REQUIRE_ALL"

# Debian installs some daemons outside a non-root PATH.
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def find_binary(name: str) -> str | None:
    """The path of ``name`` on PATH or in an sbin folder, or None."""
    found = shutil.which(name)
    if found:
        return found
    return next(
        (
            path
            for path in (os.path.join(folder, name) for folder in _SBIN)
            if os.access(path, os.X_OK)
        ),
        None,
    )


def require_binary(name: str, why: str) -> str:
    """Return the path of ``name``; skip the test when it is absent (fail under CI).

    ``why`` says what the program is for and how to install it, e.g.
    ``"PgBouncer tests: apt-get install -y pgbouncer"``.
    """
    path = find_binary(name)
    if path is not None:
        return path
    message = f"{name} is not installed ({why})"
    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{message}; {REQUIRE_ALL}=1 forbids skipping it", pytrace=False)
    pytest.skip(message)
