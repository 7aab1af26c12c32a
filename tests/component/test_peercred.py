"""The SO_PEERCRED front: kernel-verified uid/gid/pid for gRPC callers on a unix socket."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from svidgate.config import Selector, Workload
from svidgate.errors import SvidgateError
from svidgate.identity.snapshot import SnapshotFeed
from svidgate.peercred import PeerCredFront, PeerRegistry, bind_unix_socket, peer_credentials
from tests.component.sds_fixtures import FRONTEND, Identities, sds_server, secrets_of, sotw_request, stub


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sgp-", dir="/tmp"))  # AF_UNIX paths: 108 bytes at most
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_sds_caller_identified_by_uid(sock_dir: Path) -> None:
    registry = PeerRegistry()
    feed = SnapshotFeed(Identities.create().snapshot())
    # Entitled by uid alone: only a kernel-verified peer can get it, whatever node it claims.
    workloads = (Workload(FRONTEND, (Selector.parse(f"unix:uid:{os.getuid()}"),)),)
    inner = sock_dir / "inner.sock"
    public = sock_dir / "sds.sock"
    async with (
        sds_server(feed, workloads, address=f"unix:{inner}", peers=registry),
        PeerCredFront(public, str(inner), registry),
    ):
        assert stat.S_IMODE(public.stat().st_mode) == 0o600
        # A local subchannel pool: closing the channel closes its connection (the global pool may keep it).
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(f"unix:{public}", options=options) as channel:
            response = await stub(channel).FetchSecrets(sotw_request(["default"], node_id="anything"))
            assert list(secrets_of(response)) == ["default"]
            assert len(registry) == 1
        # Directly on the inner socket there are no peer credentials: no SVID.
        async with grpc.aio.insecure_channel(f"unix:{inner}") as channel:
            response = await stub(channel).FetchSecrets(sotw_request(["default"], node_id="anything"))
            assert list(secrets_of(response)) == []
        for _ in range(100):
            if len(registry) == 0:
                break
            await asyncio.sleep(0.02)
        assert len(registry) == 0  # entry removed when the connection closed


async def test_registry_entry_lives_as_long_as_the_connection(sock_dir: Path) -> None:
    inner = sock_dir / "echo.sock"
    server = await echo_server(inner)
    registry = PeerRegistry()
    async with PeerCredFront(sock_dir / "pub.sock", str(inner), registry):
        reader, writer = await asyncio.open_unix_connection(str(sock_dir / "pub.sock"))
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        assert len(registry) == 1
        writer.close()
        await writer.wait_closed()
        for _ in range(100):
            if len(registry) == 0:
                break
            await asyncio.sleep(0.01)
        assert len(registry) == 0
    server.close()


async def test_registry_lookup() -> None:
    from svidgate.peercred import PeerCredentials

    registry = PeerRegistry(token="t0k")
    name = registry.register(PeerCredentials(pid=7, uid=1000, gid=100))
    assert name == "svidgate-t0k-1"
    caller = registry.lookup(f"unix-abstract:{name}")
    assert caller is not None
    assert (caller.uid, caller.gid, caller.pid) == (1000, 100, 7)
    assert registry.lookup("ipv4:127.0.0.1:5000") is None
    assert registry.lookup("unix-abstract:svidgate-other-1") is None
    registry.unregister(name)
    assert registry.lookup(f"unix-abstract:{name}") is None


async def echo_server(path: Path) -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(echo, path=str(path))


async def test_bytes_pumped_both_ways_with_back_pressure(sock_dir: Path) -> None:
    inner = sock_dir / "echo.sock"
    server = await echo_server(inner)
    registry = PeerRegistry()
    payload = os.urandom(8 << 20)
    async with PeerCredFront(sock_dir / "pub.sock", str(inner), registry):
        reader, writer = await asyncio.open_unix_connection(str(sock_dir / "pub.sock"))

        async def send() -> None:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        received = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
        await sender
        assert received == payload
        writer.close()
    server.close()


def test_peer_credentials_of_a_socketpair() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        creds = peer_credentials(left)
    assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), os.getuid(), os.getgid())


def test_stale_socket_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: a crash left it
    sock = bind_unix_socket(path, 0o660)
    with sock:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert stat.S_ISSOCK(path.stat().st_mode)


def test_live_socket_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "live.sock"
    live = bind_unix_socket(path)
    with live, pytest.raises(SvidgateError, match="another process is listening"):
        bind_unix_socket(path)
    assert path.exists()


def test_non_socket_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "file.sock"
    path.write_text("not a socket")
    with pytest.raises(SvidgateError, match="not a unix socket"):
        bind_unix_socket(path)
    assert path.read_text() == "not a socket"


async def test_close_removes_only_its_own_socket(sock_dir: Path) -> None:
    path = sock_dir / "own.sock"
    front = PeerCredFront(path, str(sock_dir / "nowhere.sock"), PeerRegistry())
    await front.start()
    await front.close()
    assert not path.exists()


async def test_inner_unreachable_closes_the_connection(sock_dir: Path) -> None:
    registry = PeerRegistry()
    async with PeerCredFront(sock_dir / "pub.sock", str(sock_dir / "missing.sock"), registry):
        reader, writer = await asyncio.open_unix_connection(str(sock_dir / "pub.sock"))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert len(registry) == 0
