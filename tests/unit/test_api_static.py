"""The API serves the browser client at /static/ without a login, with a JavaScript type."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from outbox._settings import Secret, Settings
from outbox.api import create_app

SECRET = "api-jwt-secret-for-tests-only-0123456789"


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient[Litestar]]:
    # no database: the static files never touch it (the pool retries in the background)
    settings = Settings(api_jwt_secret=Secret(SECRET), database_url="postgresql://127.0.0.1:9/x")
    with TestClient(create_app(settings, channels={})) as test_client:
        yield test_client


@pytest.mark.parametrize("name", ["outbox-push.js", "outbox-sw.js"])
def test_scripts_are_javascript_without_a_token(client: TestClient[Litestar], name: str) -> None:
    response = client.get(f"/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["etag"].startswith('"')
    assert b"Copyright" not in response.content  # ours, not a vendored file
    assert len(response.content) > 1000


def test_the_worker_may_serve_the_whole_origin(client: TestClient[Litestar]) -> None:
    assert client.get("/static/outbox-sw.js").headers["service-worker-allowed"] == "/"
    assert "service-worker-allowed" not in client.get("/static/outbox-push.js").headers


def test_the_demo_page_is_html_and_loads_the_client(client: TestClient[Litestar]) -> None:
    response = client.get("/static/outbox-demo.html")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert 'from "./outbox-push.js"' in response.text


def test_an_unchanged_file_is_not_sent_again(client: TestClient[Litestar]) -> None:
    etag = client.get("/static/outbox-sw.js").headers["etag"]
    again = client.get("/static/outbox-sw.js", headers={"If-None-Match": f'"other", {etag}'})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    changed = client.get("/static/outbox-sw.js", headers={"If-None-Match": '"other"'})
    assert changed.status_code == 200


@pytest.mark.parametrize(
    "path", ["/static/other.js", "/static/", "/static/..%2F_app.py", "/static/outbox-sw.js.map"]
)
def test_other_names_are_not_found(client: TestClient[Litestar], path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "text/javascript" not in response.headers.get("content-type", "")


def test_the_client_is_not_in_the_openapi_document(client: TestClient[Litestar]) -> None:
    paths = client.get("/schema/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith("/static")]
