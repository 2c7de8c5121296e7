"""The browser client, served without a login at ``GET /static/<name>``.

``outbox-push.js`` (an ES module: ask the permission, subscribe this browser, send the
subscription to the API, unsubscribe), ``outbox-sw.js`` (the service worker: shows
the notification of a push, opens its ``data.url`` on click) and ``outbox-demo.html``
(a page that uses them). They ship in the package (``outbox/api/static/``) and are read
once, when the app is built; any other name is 404.

Headers: ``Content-Type`` ``text/javascript`` (RFC 9239) or ``text/html``, UTF-8;
``Cache-Control: no-cache`` with a strong ``ETag`` (browsers revalidate on each load,
a 304 when unchanged, so a new release reaches every browser at once; the browser
checks a service worker's script for updates by itself too);
``X-Content-Type-Options: nosniff``; and on the worker ``Service-Worker-Allowed: /``,
so that a site may register it for a scope wider than ``/static/``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from litestar import Request, Response, get
from litestar.exceptions import NotFoundException
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

STATIC_PATH = "/static"
WORKER = "outbox-sw.js"
FILES = ("outbox-push.js", WORKER, "outbox-demo.html")
MEDIA_TYPES = {".js": "text/javascript", ".html": "text/html"}
CACHE_CONTROL = "no-cache"


@dataclass(frozen=True)
class StaticFile:
    """One file of the client, its type and the headers it is served with."""

    body: bytes
    media_type: str
    etag: str
    headers: dict[str, str] = field(default_factory=dict)


def load_static_files() -> dict[str, StaticFile]:
    """Read the client's files from the installed package."""
    folder = resources.files("outbox.api") / "static"
    files: dict[str, StaticFile] = {}
    for name in FILES:
        body = (folder / name).read_bytes()
        etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        headers = {
            "Cache-Control": CACHE_CONTROL,
            "ETag": etag,
            "X-Content-Type-Options": "nosniff",
        }
        if name == WORKER:
            headers["Service-Worker-Allowed"] = "/"
        media_type = MEDIA_TYPES[name[name.rindex(".") :]]
        files[name] = StaticFile(body=body, media_type=media_type, etag=etag, headers=headers)
    return files


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return etag in tags or "*" in tags


def static_files_handler(files: dict[str, StaticFile] | None = None) -> HTTPRouteHandler:
    """The route handler of ``GET /static/{name}`` over ``files`` (the packaged ones)."""
    served = load_static_files() if files is None else files

    @get(
        f"{STATIC_PATH}/{{name:str}}",
        exclude_from_auth=True,
        include_in_schema=False,
        sync_to_thread=False,
    )
    def static_file(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[bytes]:
        """Serve one file of the browser client; 304 when the browser's copy is current."""
        found = served.get(name)
        if found is None:
            raise NotFoundException(detail="no such file")
        if _matches(request.headers.get("if-none-match"), found.etag):
            return Response(b"", status_code=304, headers=found.headers)
        return Response(found.body, media_type=found.media_type, headers=found.headers)

    return static_file
