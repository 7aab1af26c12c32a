#!/usr/bin/env python3
"""The example's backend application: answers every GET with the headers it received, as JSON.

Run it with ``python3 backend.py [port]`` (default 9000, on 127.0.0.1). The end-to-end test imports
`make_server` and runs the same code. It never looks at tokens: the ingress Envoy hands it the caller's
SPIFFE ID in ``x-spiffe-id``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TextIO


def echo_headers(headers: dict[str, str]) -> object:
    """The example's answer: the caller's SPIFFE ID and every header the backend received."""
    return {"x-spiffe-id": headers.get("x-spiffe-id"), "headers": headers}


class EchoHandler(BaseHTTPRequestHandler):
    """GET -> 200 with the JSON of ``server.describe(headers)``; each request's headers are recorded."""

    server: BackendServer

    def do_GET(self) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.server.received.append(headers)
        body = json.dumps(self.server.describe(headers), indent=2).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.log is not None:
            self.server.log.write(
                f"backend: {self.command} {self.path} x-spiffe-id={self.headers.get('x-spiffe-id')}\n"
            )


class BackendServer(ThreadingHTTPServer):
    """A threading HTTP server that remembers the headers of every request (newest last)."""

    received: list[dict[str, str]]
    describe: Callable[[dict[str, str]], object]
    log: TextIO | None


def make_server(
    host: str = "127.0.0.1",
    port: int = 9000,
    *,
    describe: Callable[[dict[str, str]], object] = echo_headers,
    log: TextIO | None = sys.stderr,
) -> BackendServer:
    """Bind the backend (port 0 picks a free port); call ``serve_forever()`` on the result.

    `describe` turns a request's headers (lower-case names) into the JSON answer; `log` gets one line per
    request (None: silent). ``svidgate demo`` runs this same backend with its own answer.
    """
    server = BackendServer((host, port), EchoHandler)
    server.received = []
    server.describe = describe
    server.log = log
    return server


if __name__ == "__main__":
    backend = make_server(port=int(sys.argv[1]) if len(sys.argv) > 1 else 9000)
    print(f"backend listening on http://127.0.0.1:{backend.server_address[1]}", file=sys.stderr)
    backend.serve_forever()
