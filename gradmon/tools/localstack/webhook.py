"""`WebhookReceiver`: an HTTP server on 127.0.0.1 that collects the JSON Alertmanager
POSTs to its webhook."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from typing import Any

from gradmon.tools.localstack.common import LOOPBACK, STOP_TIMEOUT, LocalStackError, Served

__all__ = ["WebhookReceiver"]


class WebhookReceiver(Served):
    """Collects Alertmanager's webhook POSTs (JSON) on http://127.0.0.1:<port>/.

    on_payload(payload) is called on the server's thread for each POST.
    """

    def __init__(self, on_payload: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._payloads: list[dict[str, Any]] = []
        self._on_payload = on_payload
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> WebhookReceiver:
        if self._server is not None:
            return self
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    payload = json.loads(body.decode("utf-8"))
                except ValueError:
                    self.send_response(400)
                    self.end_headers()
                    return
                receiver._received(payload)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # no access log on stderr

        self._server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="gradmon-webhook", daemon=True
        )
        self._thread.start()
        return self

    def _received(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        with self._lock:
            self._payloads.append(payload)
        if self._on_payload is not None:
            self._on_payload(payload)

    @property
    def url(self) -> str:
        if self._server is None:
            raise LocalStackError("the webhook receiver is not started")
        return f"http://{LOOPBACK}:{self._server.server_address[1]}/"

    @property
    def payloads(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._payloads)

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert of every payload so far, each with its `status` at delivery."""
        return [a for p in self.payloads for a in p.get("alerts", []) if isinstance(a, dict)]

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT)
            self._thread = None
