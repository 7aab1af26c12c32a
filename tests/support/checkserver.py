"""Shared pieces of the ext_authz end-to-end tests: an echo backend behind Envoy and a Check server.

The Check server runs on its own event loop in a thread, as `listen.grpc` does in svidgate, so that the test's
synchronous HTTP client and Envoy can talk to it while the test body blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc.aio

from svidgate.extauthz.servicer import AuthorizationServicer


class Backend(ThreadingHTTPServer):
    """The upstream behind Envoy; `received` holds the headers of every request it saw."""

    received: list[dict[str, str]]


class Echo(BaseHTTPRequestHandler):
    server: Backend

    def do_GET(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        # Every copy, so that an appended (rather than overwritten) x-spiffe-id would show.
        headers["x-spiffe-id-all"] = json.dumps(self.headers.get_all("x-spiffe-id") or [])
        self.server.received.append(headers)
        body = json.dumps(headers).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def echo_backend() -> Iterator[Backend]:
    """An echo backend on 127.0.0.1 (its port: `backend.server_address[1]`), shut down on exit."""
    backend = Backend(("127.0.0.1", 0), Echo)
    backend.received = []
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    try:
        yield backend
    finally:
        backend.shutdown()


@contextlib.contextmanager
def aio_check_server(servicer: AuthorizationServicer) -> Iterator[int]:
    """`servicer` on a grpc.aio server on 127.0.0.1, on its own event loop thread; yields the port."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        servicer.add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
