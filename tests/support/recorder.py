"""A loopback HTTP server that records every message a test channel delivers.

Dispatcher subprocesses post ``{"message_id", "channel", "user_id", "attempt",
"dispatcher"}`` to it. A test scripts answers per user id: ``fail_users[user] =
[500, 500, 200]`` answers 500 twice, then 200.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Recorder:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.script: dict[str, list[int]] = defaultdict(list)
        self.default_status = 200
        self.delay = 0.0
        self.lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: one connection per client
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                body["received_at"] = time.time()
                if recorder.delay:
                    time.sleep(recorder.delay)
                with recorder.lock:
                    queue = recorder.script.get(body["user_id"])
                    status = queue.pop(0) if queue else recorder.default_status
                    body["status"] = status
                    recorder.records.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/deliver"

    def start(self) -> Recorder:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def delivered(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.records if r["status"] == 200]
