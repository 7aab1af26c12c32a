"""A burst of connections on svidgate's unix sockets: none is refused, every one reaches the gRPC server.

A unix connect is refused at once (EAGAIN) when the listen backlog is full -- unlike TCP, nothing retries --
so the backlog the peer-credential front asks for must be the one the kernel applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from pathlib import Path

from svidgate.peercred import LISTEN_BACKLOG, effective_backlog
from tests.support.runtime import Layout, config_text
from tests.support.server import running_server

BURST = 1000
#: The HTTP/2 client connection preface and an empty SETTINGS frame (RFC 9113 3.4, 6.5).
CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SETTINGS_FRAME_TYPE = 0x04


def _connect_burst(path: Path, count: int) -> tuple[list[socket.socket], list[str]]:
    """`count` non-blocking connects in a row, while the server's event loop cannot accept any of them."""
    connected: list[socket.socket] = []
    refused: list[str] = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            refused.append(errno.errorcode.get(exc.errno or 0, str(exc)))
            continue
        connected.append(sock)
    return connected, refused


async def _server_settings(sock: socket.socket) -> int:
    """Speak the HTTP/2 preface through the front and return the type of the first frame gRPC answers."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        writer.write(CLIENT_PREFACE)
        await writer.drain()
        header = await asyncio.wait_for(reader.readexactly(9), 30)
        return header[3]
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_a_burst_of_1000_connects_is_never_refused(layout: Layout) -> None:
    assert effective_backlog() >= BURST, "net.core.somaxconn is below the burst this test opens"
    assert LISTEN_BACKLOG >= BURST
    # Every unix listener: SDS (grpc.aio), the Workload API, and Check on the threaded server.
    check_socket = layout.run / "check.sock"
    layout.config.write_text(config_text(layout, check=f"unix://{check_socket}"))
    async with running_server(layout.config):
        for path in (layout.sds_socket, layout.workload_socket, check_socket):
            connected, refused = _connect_burst(path, BURST)
            try:
                assert refused == [], f"{path.name}: {len(refused)} of {BURST} connects refused"
                # Every accepted connection is proxied to the gRPC server, which opens with its SETTINGS.
                frames = await asyncio.gather(*(_server_settings(sock) for sock in connected))
                assert frames == [SETTINGS_FRAME_TYPE] * BURST
            finally:
                for sock in connected:
                    sock.close()
