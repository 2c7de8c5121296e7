"""The browser client in headless Chromium, against ``outbox api`` on loopback.

Real: ``outbox api`` (a subprocess) serves ``/static/outbox-demo.html``,
``outbox-push.js`` and ``outbox-sw.js``; Debian's Chromium (``/usr/bin/chromium``,
driven by Playwright over the DevTools protocol, with a fresh profile per test and the
notification permission granted to the API's origin) loads the demo page, whose client
registers the service worker; a push is delivered to that worker by the DevTools
protocol (``ServiceWorker.deliverPushMessage``, with the payload our dispatcher renders
from ``templates/push/price_alert.json.j2``), and the notifications it shows are read
back with ``registration.getNotifications()``.

Stubbed, and why:

- ``pushManager.subscribe`` and ``getSubscription``: a real subscription needs the
  browser vendor's push service (FCM for Chromium), out of reach here. An init script
  replaces them in the page before the client runs, with a subscription object of the
  same shape (``endpoint``, ``options.applicationServerKey``, ``toJSON()``,
  ``unsubscribe()``) that records how it was called.
- ``GET /api/v1/push/vapid-public-key`` and ``POST``/``DELETE
  /api/v1/push/subscriptions``: answered inside the browser by the test (Playwright's
  request routing) as the API answers them, and records what the client sent: so the
  refusals, the rotated key and the second user of one browser take no database. The
  API serving the files runs without one (its pool retries in the background).
  One test, ``..._through_the_real_api``, uses the API's own endpoints on a migrated
  database instead, and reads ``outbox.push_subscription``.
- The click: Chromium lets a worker open or focus a window only while it handles a
  real ``notificationclick`` (a user's click on the notification), and the DevTools
  protocol cannot click a notification. So the test dispatches a ``notificationclick``
  event carrying the notification Chromium shows to the worker's own listener, with
  the worker's ``clients`` replaced by a recorder: the listener closes the
  notification and asks for a new window at ``data.url``, or focuses the tab already
  there.

Chromium sometimes loses the very first notification that a fresh profile shows from
a push event (``showNotification`` resolves, ``getNotifications()`` stays empty; a
second push always shows): :meth:`Browser.push_until_shown` delivers a push again, at
most twice more, until its notification is there.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from playwright.sync_api import BrowserContext, CDPSession, Page, Playwright, Route, sync_playwright

from outbox._templates import TemplateCatalog
from outbox.dispatcher.channels.base import RenderedPush
from outbox.dispatcher.rendering import render
from outbox.testing.push import VapidKeys
from tests.acceptance.conftest import wait_until
from tests.support.binaries import require_binary
from tests.support.pg_cluster import free_port

ROOT = Path(__file__).resolve().parents[2]
JWT_SECRET = "browser-test-jwt-secret-0123456789abcdef"
TOKEN = "user-token-for-the-stubbed-endpoints"  # the stubs check it is sent as is
OTHER_TOKEN = "another-user-of-the-same-browser"
SCOPE = "/static/outbox/"
VAPID_KEY = (  # P-256 public keys, uncompressed, base64url: what the real endpoint answers
    "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM"
)
ROTATED_KEY = (
    "BBMdZzyLH8fYS-xiTMRi-OKO8LYWVlTGDujOTuO0i6-R-IqWM3GHtZm-18WZ2zmosaWGna69c6UlZqYsIUQ8I2o"
)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# the stubbed subscription's keys, as a browser makes them: a P-256 point and 16 bytes
STUB_KEYS = {
    "p256dh": _b64url(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    ),
    "auth": _b64url(os.urandom(16)),
}
# Debian's chromium in a container: no sandbox, no GPU, and no background traffic
# (without these flags it hangs on the closed network); Playwright adds --headless.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PRICE_ALERT = {
    "instrument": "EURUSD",
    "condition": "above",
    "trigger_price": "1.0900",
    "current_price": "1.0912",
}

# Replaces PushManager's methods before the page's scripts run: see the module docstring.
PUSH_MANAGER_STUB = """
(() => {
  const calls = (window.__pushStub = { subscribe: [], unsubscribed: [] });
  const subscriptions = new WeakMap();
  const b64 = (bytes) =>
    btoa(String.fromCharCode(...new Uint8Array(bytes)))
      .replace(/\\+/g, "-").replace(/\\//g, "_").replace(/=+$/, "");
  PushManager.prototype.getSubscription = async function () {
    return subscriptions.get(this) || null;
  };
  PushManager.prototype.subscribe = async function (options) {
    const key = new Uint8Array(options.applicationServerKey).buffer;
    calls.subscribe.push({ userVisibleOnly: options.userVisibleOnly, key: b64(key) });
    const manager = this;
    const subscription = {
      endpoint: "https://fcm.googleapis.com/fcm/send/browser-test-" + calls.subscribe.length,
      expirationTime: null,
      options: { userVisibleOnly: true, applicationServerKey: key },
      toJSON() {
        return {
          endpoint: this.endpoint,
          expirationTime: null,
          keys: __KEYS__,
        };
      },
      async unsubscribe() {
        calls.unsubscribed.push(this.endpoint);
        subscriptions.delete(manager);
        return true;
      },
    };
    subscriptions.set(this, subscription);
    return subscription;
  };
})();
""".replace("__KEYS__", json.dumps(STUB_KEYS))


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_binary(
        "chromium", "the browser client's test: apt-get install -y chromium chromium-driver"
    )


@contextmanager
def serve_api(log_path: Path, ready: str, **env: str) -> Iterator[str]:
    """``outbox api`` on a free loopback port with ``env``; yields its origin once
    ``ready`` (a path) answers 200."""
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    environment = {
        **os.environ,
        "OUTBOX_API_JWT_SECRET": JWT_SECRET,
        "OUTBOX_API_PUBLIC_URL": origin,
        "PYTHONPATH": str(ROOT),
        **env,
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("outbox")), "api", "--port", str(port)],
            env=environment,
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
    try:
        wait_until(lambda: _answers(f"{origin}{ready}"), 30, "the API to start")
        yield origin
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def api_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``outbox api`` without a database (static files need none: /livez says ready)."""
    log_path = tmp_path_factory.mktemp("api") / "api.log"
    nowhere = f"postgresql://outbox@127.0.0.1:{free_port()}/none"
    with serve_api(log_path, "/livez", OUTBOX_DATABASE_URL=nowhere) as origin:
        yield origin


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


class Browser:
    """A fresh Chromium profile with one page on the demo, and a DevTools session."""

    def __init__(self, context: BrowserContext, origin: str) -> None:
        self.context = context
        self.origin = origin
        self.page: Page = context.pages[0] if context.pages else context.new_page()
        self.cdp: CDPSession = context.new_cdp_session(self.page)
        self.registrations: dict[str, str] = {}
        self.cdp.on("ServiceWorker.workerRegistrationUpdated", self._registrations_updated)
        self.cdp.send("ServiceWorker.enable")

    def _registrations_updated(self, event: dict[str, Any]) -> None:
        for registration in event["registrations"]:
            if registration.get("isDeleted"):
                self.registrations.pop(registration["scopeURL"], None)
            else:
                self.registrations[registration["scopeURL"]] = registration["registrationId"]

    def open_demo(self) -> None:
        self.page.goto(f"{self.origin}/static/outbox-demo.html#token={TOKEN}")
        self.page.wait_for_selector("body[data-ready=true]")

    def register_worker(self) -> str:
        """Register the worker through the client; return its DevTools registration id."""
        scope = self.page.evaluate(
            "import('/static/outbox-push.js').then((push) => push.registerWorker())"
            ".then((registration) => registration.scope)"
        )
        assert scope == f"{self.origin}{SCOPE}"
        return self.registration_id()

    def registration_id(self) -> str:
        scope = f"{self.origin}{SCOPE}"
        self.wait(lambda: scope in self.registrations, "the worker's registration")
        return self.registrations[scope]

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
        """Wait for ``condition``, letting Playwright dispatch DevTools events meanwhile."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            self.page.wait_for_timeout(50)

    def deliver(self, payload: bytes | str) -> None:
        data = payload.decode() if isinstance(payload, bytes) else payload
        self.cdp.send(
            "ServiceWorker.deliverPushMessage",
            {"origin": self.origin, "registrationId": self.registration_id(), "data": data},
        )

    def notifications(self) -> list[dict[str, Any]]:
        """What ``registration.getNotifications()`` has, read in the page."""
        return self.page.evaluate(
            """(scope) => navigator.serviceWorker.getRegistration(scope)
                .then((registration) => registration.getNotifications())
                .then((shown) => shown.map((n) => ({
                    title: n.title, body: n.body, icon: n.icon, badge: n.badge,
                    tag: n.tag, renotify: n.renotify, data: n.data })))""",
            SCOPE,
        )

    def push_until_shown(
        self, payload: bytes | str, shown: Callable[[list[dict[str, Any]]], bool]
    ) -> list[dict[str, Any]]:
        """Deliver ``payload`` until ``shown(notifications)``; see the module docstring."""
        for _ in range(3):
            self.deliver(payload)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                found = self.notifications()
                if shown(found):
                    return found
                self.page.wait_for_timeout(100)
        raise AssertionError(f"no notification for {payload!r}; shown: {self.notifications()}")

    def click(self, title: str) -> list[list[str]]:
        """Dispatch ``notificationclick`` for the notification ``title`` to the worker's
        listener, with ``clients`` recording what it opens or focuses."""
        (worker,) = [w for w in self.context.service_workers if w.url.endswith("/outbox-sw.js")]
        calls: list[list[str]] = worker.evaluate(
            """async (title) => {
                const [notification] = (await self.registration.getNotifications())
                    .filter((n) => n.title === title);
                const calls = [];
                // [Global] attributes are the global object's own properties
                const own = Object.getOwnPropertyDescriptor(self, "clients");
                const real = self.clients;
                const recorder = {
                    matchAll: async (options) => (await real.matchAll(options)).map((client) => ({
                        url: client.url,
                        focus: async () => calls.push(["focus", client.url]),
                    })),
                    openWindow: async (url) => calls.push(["openWindow", url]),
                };
                Object.defineProperty(self, "clients", { value: recorder, configurable: true });
                try {
                    const event = new NotificationEvent("notificationclick", { notification });
                    self.dispatchEvent(event);
                    // the listener's promise: wait until it has asked for a window
                    for (let i = 0; i < 100 && calls.length === 0; i++) {
                        await new Promise((resolve) => setTimeout(resolve, 20));
                    }
                } finally {
                    delete self.clients;
                    if (own !== undefined) Object.defineProperty(self, "clients", own);
                }
                return calls;
            }""",
            title,
        )
        return calls


Launch = Callable[[str], Browser]


@pytest.fixture
def launch(chromium: str, playwright: Playwright, tmp_path: Path) -> Iterator[Launch]:
    """Open Chromium with a fresh profile that may show notifications from ``origin``."""
    contexts: list[BrowserContext] = []

    def open_browser(origin: str) -> Browser:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / f"profile-{len(contexts)}"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        contexts.append(context)
        context.set_default_timeout(15_000)
        context.grant_permissions(["notifications"], origin=origin)
        return Browser(context, origin)

    try:
        yield open_browser
    finally:
        for context in contexts:
            context.close()


@pytest.fixture
def browser(launch: Launch, api_origin: str) -> Browser:
    return launch(api_origin)


def price_alert(origin: str) -> tuple[dict[str, Any], bytes]:
    """The payload and bytes our dispatcher sends for a price alert."""
    rendered = render(
        TemplateCatalog(None),
        "push",
        "price_alert",
        PRICE_ALERT,
        message_id=1,
        lane="transactional",
        platform_base_url=origin,
    )
    assert isinstance(rendered, RenderedPush)
    return dict(rendered.payload), rendered.body


class ApiStub:
    """The push endpoints of the API, answered in the browser as the API answers them
    (an endpoint another user holds is 409); records each request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.key = VAPID_KEY
        self.holders: dict[str, str] = {}  # endpoint -> the token of its user

    def __call__(self, route: Route) -> None:
        request = route.request
        path = request.url.split("://", 1)[1].split("/", 1)[1]
        authorization = request.headers.get("authorization")
        body = json.loads(request.post_data) if request.post_data else None
        self.requests.append(
            {
                "method": request.method,
                "path": "/" + path,
                "authorization": authorization,
                "content_type": request.headers.get("content-type"),
                "body": body,
            }
        )
        if authorization not in (f"Bearer {TOKEN}", f"Bearer {OTHER_TOKEN}"):
            route.fulfill(status=401, json={"status_code": 401, "detail": "no token"})
        elif request.method == "GET" and path == "api/v1/push/vapid-public-key":
            route.fulfill(status=200, json={"key": self.key})
        elif request.method == "POST" and path == "api/v1/push/subscriptions":
            holder = self.holders.setdefault(body["endpoint"], authorization)
            if holder == authorization:
                route.fulfill(status=201, json={"id": 1, "endpoint": body["endpoint"]})
            else:
                route.fulfill(status=409, json={"status_code": 409, "detail": "another user's"})
        elif request.method == "DELETE" and path == "api/v1/push/subscriptions":
            if self.holders.get(body["endpoint"]) == authorization:
                del self.holders[body["endpoint"]]
                route.fulfill(status=204)
            else:
                route.fulfill(status=404, json={"status_code": 404, "detail": "not found"})
        else:
            route.fulfill(status=404, json={"status_code": 404, "detail": "Not Found"})


def test_the_demo_page_registers_the_worker_subscribes_and_unsubscribes(browser: Browser) -> None:
    """The subscription is the stubbed pushManager's (the vendor's push service is out
    of reach) and the API's push endpoints are stubbed in the browser: see the module
    docstring. What is checked is the page's own code path, in Chromium."""
    api = ApiStub()
    browser.context.add_init_script(PUSH_MANAGER_STUB)
    browser.context.route("**/api/v1/push/**", api)
    browser.open_demo()
    assert browser.page.text_content("#state") == "not subscribed (permission granted)"

    browser.page.click("#subscribe")
    browser.page.wait_for_selector("body[data-state=subscribed]")

    endpoint = "https://fcm.googleapis.com/fcm/send/browser-test-1"
    stub = browser.page.evaluate("window.__pushStub")
    assert stub["subscribe"] == [{"userVisibleOnly": True, "key": VAPID_KEY}]
    assert [(r["method"], r["path"], r["authorization"]) for r in api.requests] == [
        ("GET", "/api/v1/push/vapid-public-key", f"Bearer {TOKEN}"),
        ("POST", "/api/v1/push/subscriptions", f"Bearer {TOKEN}"),
    ]
    assert api.requests[1]["content_type"] == "application/json"
    assert api.requests[1]["body"] == {
        "endpoint": endpoint,
        "expirationTime": None,
        "keys": STUB_KEYS,
    }
    worker = browser.page.evaluate(
        """(scope) => navigator.serviceWorker.getRegistration(scope).then((registration) =>
            ({ scope: registration.scope, script: registration.active.scriptURL,
               state: registration.active.state }))""",
        SCOPE,
    )
    assert worker == {
        "scope": f"{browser.origin}{SCOPE}",
        "script": f"{browser.origin}/static/outbox-sw.js",
        "state": "activated",
    }
    browser.registration_id()  # DevTools sees the registration too

    # subscribing again sends the same subscription again: no second pushManager.subscribe
    browser.page.click("#subscribe")
    browser.wait(lambda: len(api.requests) == 4, "the second subscribe's requests")
    assert api.requests[3]["body"]["endpoint"] == endpoint
    assert len(browser.page.evaluate("window.__pushStub")["subscribe"]) == 1

    browser.page.click("#unsubscribe")
    browser.page.wait_for_selector("body[data-state=unsubscribed]")
    delete = api.requests[-1]
    assert (delete["method"], delete["path"], delete["authorization"]) == (
        "DELETE",
        "/api/v1/push/subscriptions",
        f"Bearer {TOKEN}",
    )
    assert delete["body"] == {"endpoint": endpoint}
    assert browser.page.evaluate("window.__pushStub")["unsubscribed"] == [endpoint]
    assert "unsubscribe: done" in (browser.page.text_content("#log") or "")


@pytest.mark.parametrize(
    ("status", "kept"), [(422, False), (400, False), (409, False), (503, True), (401, True)]
)
def test_a_subscription_the_api_refuses_is_dropped_one_it_may_take_later_kept(
    browser: Browser, status: int, kept: bool
) -> None:
    """The API refuses a new subscription (400, 409, 422: it would never receive anything):
    the page says why and the browser drops it. A failure that may pass (5xx, an
    expired token): the browser keeps it, and the next subscribe sends it again."""

    def answer(route: Route) -> None:
        if route.request.method == "POST":
            route.fulfill(status=status, json={"status_code": status, "detail": "not now"})
        else:
            route.fulfill(status=200, json={"key": VAPID_KEY})

    browser.context.add_init_script(PUSH_MANAGER_STUB)
    browser.context.route("**/api/v1/push/**", answer)
    browser.open_demo()
    browser.page.click("#subscribe")
    browser.page.wait_for_function(
        "document.getElementById('log').textContent.includes('subscribe failed')"
    )
    log = browser.page.text_content("#log") or ""
    assert f"POST /api/v1/push/subscriptions: {status} not now" in log
    stub = browser.page.evaluate("window.__pushStub")
    assert len(stub["subscribe"]) == 1
    dropped = [] if kept else ["https://fcm.googleapis.com/fcm/send/browser-test-1"]
    assert stub["unsubscribed"] == dropped
    state = "subscribed" if kept else "unsubscribed"
    browser.page.wait_for_selector(f"body[data-state={state}]")


def test_a_subscription_made_with_a_rotated_key_is_replaced(browser: Browser) -> None:
    """The server's VAPID key changed: the old subscription is deleted from the API and
    the browser, and a new one is made with the new key (stubbed pushManager)."""
    api = ApiStub()
    browser.context.add_init_script(PUSH_MANAGER_STUB)
    browser.context.route("**/api/v1/push/**", api)
    browser.open_demo()
    browser.page.click("#subscribe")
    browser.page.wait_for_selector("body[data-state=subscribed]")

    api.key = ROTATED_KEY
    browser.page.click("#subscribe")
    browser.wait(lambda: len(api.requests) == 5, "the second subscribe's requests")
    first = "https://fcm.googleapis.com/fcm/send/browser-test-1"
    second = "https://fcm.googleapis.com/fcm/send/browser-test-2"
    assert [(r["method"], r["body"]) for r in api.requests[2:]] == [
        ("GET", None),
        ("DELETE", {"endpoint": first}),
        ("POST", {"endpoint": second, "expirationTime": None, "keys": STUB_KEYS}),
    ]
    stub = browser.page.evaluate("window.__pushStub")
    assert [call["key"] for call in stub["subscribe"]] == [VAPID_KEY, ROTATED_KEY]
    assert stub["unsubscribed"] == [first]


def test_another_user_of_the_browser_gets_a_subscription_of_their_own(browser: Browser) -> None:
    """The browser's subscription is another user's (the API answers 409 and keeps it
    theirs): the client unsubscribes it and sends a new one (stubbed pushManager)."""
    api = ApiStub()
    browser.context.add_init_script(PUSH_MANAGER_STUB)
    browser.context.route("**/api/v1/push/**", api)
    browser.open_demo()
    browser.page.click("#subscribe")
    browser.page.wait_for_selector("body[data-state=subscribed]")

    browser.page.fill("#token", OTHER_TOKEN)
    browser.page.click("#subscribe")
    browser.wait(lambda: len(api.requests) == 5, "the second user's requests")
    first = "https://fcm.googleapis.com/fcm/send/browser-test-1"
    second = "https://fcm.googleapis.com/fcm/send/browser-test-2"
    assert [(r["method"], (r["body"] or {}).get("endpoint")) for r in api.requests[2:]] == [
        ("GET", None),
        ("POST", first),  # 409
        ("POST", second),
    ]
    assert api.holders == {first: f"Bearer {TOKEN}", second: f"Bearer {OTHER_TOKEN}"}
    stub = browser.page.evaluate("window.__pushStub")
    assert stub["unsubscribed"] == [first]
    browser.page.wait_for_function(
        "document.getElementById('log').textContent.split('subscribe: done').length === 3"
    )


def test_a_push_shows_our_notification_and_a_click_opens_its_url(browser: Browser) -> None:
    browser.open_demo()
    browser.register_worker()
    payload, body = price_alert(browser.origin)
    assert browser.notifications() == []

    shown = browser.push_until_shown(body, lambda found: len(found) > 0)

    assert shown == [
        {
            "title": payload["title"],
            "body": payload["body"],
            "icon": payload["icon"],
            "badge": payload["badge"],
            # the renderer tags a price alert with its topic: a newer one replaces it
            "tag": payload["data"]["tag"],
            "renotify": True,
            "data": payload["data"],
        }
    ]
    assert len(payload["data"]["tag"]) == 32
    assert payload["title"] == "Price alert: EURUSD above 1.0900"
    url = payload["data"]["url"]
    assert url == f"{browser.origin}/dashboard/positions"

    # no window at the URL yet: the click opens one, and closes the notification
    assert browser.click(payload["title"]) == [["openWindow", url]]
    assert browser.notifications() == []

    # a tab already at the URL: the click focuses it instead
    browser.push_until_shown(body, lambda found: len(found) > 0)
    tab = browser.context.new_page()
    tab.goto(url)  # the API answers 404 there: a window at that address all the same
    assert browser.click(payload["title"]) == [["focus", url]]


def test_a_collapsed_alert_replaces_the_older_notification(browser: Browser) -> None:
    browser.open_demo()
    browser.register_worker()
    payload, _ = price_alert(browser.origin)
    tagged = {**payload, "data": {**payload["data"], "tag": "price:EURUSD"}}
    newer = {**tagged, "body": "EURUSD is now at 1.0950, above your alert level of 1.0900."}

    browser.push_until_shown(json.dumps(tagged), lambda found: len(found) == 1)
    shown = browser.push_until_shown(
        json.dumps(newer), lambda found: [n["body"] for n in found] == [newer["body"]]
    )
    assert [(n["tag"], n["renotify"]) for n in shown] == [("price:EURUSD", True)]

    # without a tag each push is a notification of its own; not our JSON: its text
    browser.push_until_shown(json.dumps(payload), lambda found: len(found) == 2)
    shown = browser.push_until_shown("plain text", lambda found: len(found) == 3)
    assert {n["title"] for n in shown} == {payload["title"], "New notification"}
    assert "plain text" in [n["body"] for n in shown]


@pytest.fixture
def real_api(database_url: str, tmp_path: Path) -> Iterator[tuple[str, VapidKeys]]:
    """``outbox api`` on a migrated database, with a VAPID key: its push endpoints."""
    vapid = VapidKeys.generate()
    with serve_api(
        tmp_path / "api.log",
        "/health",
        OUTBOX_DATABASE_URL=database_url,
        OUTBOX_VAPID_PRIVATE_KEY=vapid.private_pem,
    ) as origin:
        yield origin, vapid


def test_the_demo_page_subscribes_and_unsubscribes_through_the_real_api(
    launch: Launch, real_api: tuple[str, VapidKeys], admin: psycopg.Connection[Any]
) -> None:
    """The API's own push endpoints and database; only pushManager is stubbed (the
    vendor's push service is out of reach), with an FCM endpoint and browser-shaped
    keys, which the API checks as the push channel does before a send."""
    origin, vapid = real_api
    token = jwt.encode(
        {"sub": "trader-7", "role": "user", "exp": int(time.time()) + 600},
        JWT_SECRET,
        algorithm="HS256",
    )
    browser = launch(origin)
    browser.context.add_init_script(PUSH_MANAGER_STUB)
    browser.page.goto(f"{origin}/static/outbox-demo.html#token={token}")
    browser.page.wait_for_selector("body[data-ready=true]")

    browser.page.click("#subscribe")
    browser.page.wait_for_selector("body[data-state=subscribed]")

    endpoint = "https://fcm.googleapis.com/fcm/send/browser-test-1"
    stub = browser.page.evaluate("window.__pushStub")
    assert stub["subscribe"] == [{"userVisibleOnly": True, "key": vapid.public_raw}]
    rows = "SELECT user_id, endpoint, p256dh, auth FROM outbox.push_subscription"
    assert admin.execute(rows).fetchall() == [
        ("trader-7", endpoint, STUB_KEYS["p256dh"], STUB_KEYS["auth"])
    ]

    browser.page.click("#unsubscribe")
    browser.page.wait_for_selector("body[data-state=unsubscribed]")
    assert admin.execute(rows).fetchall() == []
    assert browser.page.evaluate("window.__pushStub")["unsubscribed"] == [endpoint]
    assert "unsubscribe: done" in (browser.page.text_content("#log") or "")
