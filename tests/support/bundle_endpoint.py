"""A real HTTPS bundle endpoint on 127.0.0.1 that drips: it answers ``200 OK`` with a Content-Length, then
sends the body one byte every `interval` seconds (the slow partner of issue 9).

Its certificate (DNS SAN ``localhost``) is issued by a `TestCA` whose root is written to `ca_file`, so a
``https_web`` endpoint with that ``ca_file`` authenticates it. Every connection is served by its own thread;
`stop()` ends every drip and closes the listener.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from svidgate.identity.bundle import pem_bundle
from tests.support.ca import TestCA


class DrippingBundleEndpoint:
    """An HTTPS server that never finishes a response in any reasonable time.

    Args:
        directory: where the server's key, certificate and the client's `ca_file` are written.
        interval: seconds between two body bytes.
        length: the Content-Length announced (the drip would take ``length * interval`` seconds).

    Attributes:
        url: ``https://localhost:<port>/bundle``.
        ca_file: the root that vouches for the server (for ``bundle_endpoint.ca_file``).
        dripping: set once a body byte has been sent on some connection.
        requests: connections that sent a request so far.
    """

    def __init__(self, directory: Path, *, interval: float = 0.05, length: int = 100_000) -> None:
        now = time.time()  # OpenSSL checks validity against real time
        root = TestCA("partner.test", not_before=now - 3600, not_after=now + 86400)
        cert, key = root.create_x509_certificate(
            None, dns_names=["localhost"], not_before=now - 60, not_after=now + 3600
        )
        cert_file, key_file = directory / "drip-cert.pem", directory / "drip-key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.ca_file = directory / "drip-ca.pem"
        self.ca_file.write_bytes(pem_bundle(root.bundle()))
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert_file, key_file)
        self._interval = interval
        self._length = length
        self._stop = threading.Event()
        self.dripping = threading.Event()
        self.requests = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self.url = f"https://localhost:{self.port}/bundle"
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(5)
            with self._context.wrap_socket(conn, server_side=True) as tls:
                self._drip(tls)

    def _drip(self, tls: ssl.SSLSocket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = tls.recv(4096)
            if not chunk:
                return
            request += chunk
        self.requests += 1
        tls.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {self._length}\r\n\r\n".encode()
        )
        for _ in range(self._length):
            if self._stop.wait(self._interval):
                return
            tls.sendall(b" ")
            self.dripping.set()

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        self._accepting.join(5)
        for thread in self._threads:
            thread.join(5)
