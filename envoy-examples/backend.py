#!/usr/bin/env python3
"""The examples' backend application: answers every GET with one line of JSON about what reached it.

Run it with ``python3 envoy-examples/backend.py [port]`` (default 9000, on 127.0.0.1). It never looks at
tokens or certificates itself: the Envoy in front of it hands it the caller's SPIFFE ID in ``x-spiffe-id``
(ext_authz) and the mTLS peer's in ``x-forwarded-client-cert``. Every request's headers are logged to stderr.
``svidgate demo`` runs this same file (a copy ships in the package, kept identical by a test).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TextIO


def mtls_peer(headers: dict[str, str]) -> str | None:
    """The URI SAN of the mTLS peer, from the ``x-forwarded-client-cert`` the Envoy in front sets."""
    xfcc = headers.get("x-forwarded-client-cert")
    if not xfcc:
        return None
    fields = dict(part.split("=", 1) for part in xfcc.split(";") if "=" in part)
    return fields.get("URI")


def what_reached_me(path: str, headers: dict[str, str]) -> object:
    """The answer: the path, the caller's SPIFFE ID, the mTLS peer, and whether a token got through."""
    return {
        "path": path,
        "x-spiffe-id": headers.get("x-spiffe-id"),
        "mtls_peer": mtls_peer(headers),
        "token_forwarded": "authorization" in headers,
    }


class EchoHandler(BaseHTTPRequestHandler):
    """GET -> 200 with ``server.describe(path, headers)`` as JSON; each request's headers are recorded."""

    server: BackendServer

    def do_GET(self) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.server.received.append(headers)
        body = (json.dumps(self.server.describe(self.path, headers)) + "\n").encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.log is not None:
            headers = {name.lower(): value for name, value in self.headers.items()}
            self.server.log.write(f"backend: {self.command} {self.path} {json.dumps(headers)}\n")


class BackendServer(ThreadingHTTPServer):
    """A threading HTTP server that remembers the headers of every request (newest last)."""

    received: list[dict[str, str]]
    describe: Callable[[str, dict[str, str]], object]
    log: TextIO | None


def make_server(
    host: str = "127.0.0.1",
    port: int = 9000,
    *,
    describe: Callable[[str, dict[str, str]], object] = what_reached_me,
    log: TextIO | None = sys.stderr,
) -> BackendServer:
    """Bind the backend (port 0 picks a free port); call ``serve_forever()`` on the result.

    `describe` turns a request's path and headers (lower-case names) into the JSON answer; `log` gets one
    line per request (None: silent).
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
