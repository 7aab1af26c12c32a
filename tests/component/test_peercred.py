"""The SO_PEERCRED front: kernel-verified uid/gid/pid for gRPC callers on a unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from svidgate.peercred import PeerRegistry, peer_credentials
from svidgate.runtime.listeners import UnixSocketClaim
from tests.support.peercred import ClaimedFront
from tests.support.sds import FRONTEND, Identities, secrets_of, sotw_request
from tests.support.sds_server import sds_server, stub


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
        ClaimedFront(public, str(inner), registry),
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
    async with ClaimedFront(sock_dir / "pub.sock", str(inner), registry):
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

    registry = PeerRegistry()
    address = "/run/svidgate-x/peer-0123456789abcdef"
    assert registry.register(address, PeerCredentials(pid=7, uid=1000, gid=100))
    assert not registry.register(address, PeerCredentials(pid=8, uid=0, gid=0))  # taken: refused, kept
    caller = registry.lookup(f"unix:{address}")
    assert caller is not None
    assert (caller.uid, caller.gid, caller.pid) == (1000, 100, 7)
    assert registry.lookup("ipv4:127.0.0.1:5000") is None
    assert registry.lookup("unix:") is None  # an unbound client (the inner socket reached directly)
    assert registry.lookup("unix:/run/svidgate-x/peer-other") is None
    # The abstract form of the earlier design is never trusted (any local user can bind abstract names).
    assert registry.lookup(f"unix-abstract:{address}") is None
    registry.unregister(address)
    assert registry.lookup(f"unix:{address}") is None


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
    async with ClaimedFront(sock_dir / "pub.sock", str(inner), registry):
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
    claim = UnixSocketClaim(path, 0o660)
    claim.claim()
    with claim.listen():
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert stat.S_ISSOCK(path.stat().st_mode)
    claim.release()


def test_live_socket_is_refused(sock_dir: Path) -> None:
    # The one stale-socket probe is the claim's; it also finds a live socket whose process holds no lock.
    path = sock_dir / "live.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    with live, pytest.raises(SvidgateError, match="another process is accepting connections"):
        UnixSocketClaim(path).claim()
    assert path.exists()


def test_non_socket_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "file.sock"
    path.write_text("not a socket")
    with pytest.raises(SvidgateError, match="not a socket"):
        UnixSocketClaim(path).claim()
    assert path.read_text() == "not a socket"


async def test_close_removes_only_its_own_socket(sock_dir: Path) -> None:
    path = sock_dir / "own.sock"
    front = ClaimedFront(path, str(sock_dir / "nowhere.sock"), PeerRegistry())
    await front.start()
    await front.close()
    assert not path.exists()


async def test_inner_unreachable_closes_the_connection(sock_dir: Path) -> None:
    registry = PeerRegistry()
    async with ClaimedFront(sock_dir / "pub.sock", str(sock_dir / "missing.sock"), registry):
        reader, writer = await asyncio.open_unix_connection(str(sock_dir / "pub.sock"))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert len(registry) == 0


# -- the inner connection's client address (security review: abstract names could be squatted) --------------


class _PeerEcho:
    """A gRPC server on `inner` whose one unary method answers with the caller's `context.peer()`."""

    def __init__(self, inner: Path, registry: PeerRegistry) -> None:
        self.inner = inner
        self.registry = registry
        self.server = grpc.aio.server()
        self.looked_up: list[object] = []

        async def peer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            self.looked_up.append(registry.lookup(context.peer()))
            return context.peer().encode()

        handler = grpc.unary_unary_rpc_method_handler(peer)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("t.Peer", {"Get": handler}),)
        )
        self.server.add_insecure_port(f"unix:{inner}")

    async def __aenter__(self) -> _PeerEcho:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(None)


async def _get_peer(channel: grpc.aio.Channel) -> str:
    call = channel.unary_unary("/t.Peer/Get", request_serializer=None, response_deserializer=None)
    response = await call(b"", timeout=5)
    assert isinstance(response, bytes)
    return response.decode()


def _abstract_names() -> set[str]:
    """Abstract unix names currently bound on this host, as /proc/net/unix shows them to every user."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return {
        fields[7] for fields in (line.split() for line in lines) if len(fields) > 7 and fields[7][0] == "@"
    }


def _private_dir(parent: Path) -> Path:
    inner_dir = parent / "inner"
    inner_dir.mkdir(mode=0o700)
    return inner_dir


async def test_grpc_reports_the_bound_path_and_the_file_is_gone(sock_dir: Path) -> None:
    inner_dir = _private_dir(sock_dir)
    registry = PeerRegistry()
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with (
        _PeerEcho(inner_dir / "grpc.sock", registry) as echo,
        ClaimedFront(sock_dir / "pub.sock", str(inner_dir / "grpc.sock"), registry),
        grpc.aio.insecure_channel(f"unix:{sock_dir / 'pub.sock'}", options=options) as channel,
    ):
        peer = await _get_peer(channel)
        # grpcio (checked here, not assumed) names a path-bound unix client by its path...
        prefix = f"unix:{inner_dir}/peer-"
        assert peer.startswith(prefix), peer
        assert len(peer) - len(prefix) == 16  # 64 random bits, hex
        # ...even though the file was unlinked right after the connect...
        assert sorted(p.name for p in inner_dir.iterdir()) == ["grpc.sock"]
        # ...and the servicer finds the caller's kernel-verified credentials under it.
        caller = echo.looked_up[0]
        assert caller is not None
        assert (caller.uid, caller.gid, caller.pid) == (os.getuid(), os.getgid(), os.getpid())  # type: ignore[attr-defined]
        # A second connection gets another unpredictable name.
        async with grpc.aio.insecure_channel(f"unix:{sock_dir / 'pub.sock'}", options=options) as second:
            other = await _get_peer(second)
        assert other.startswith(prefix)
        assert other != peer


async def test_squatting_the_names_seen_in_proc_net_unix_drops_no_caller(sock_dir: Path) -> None:
    """What /tmp/review/inj/squat.py does: a local user reads the front's live names from /proc/net/unix and
    binds the names that come next; the next caller must still get through."""
    inner_dir = _private_dir(sock_dir)
    registry = PeerRegistry()
    options = [("grpc.use_local_subchannel_pool", 1)]
    before = _abstract_names()
    squatters: list[socket.socket] = []
    async with (
        _PeerEcho(inner_dir / "grpc.sock", registry),
        ClaimedFront(sock_dir / "pub.sock", str(inner_dir / "grpc.sock"), registry),
        grpc.aio.insecure_channel(f"unix:{sock_dir / 'pub.sock'}", options=options) as victim,
    ):
        await _get_peer(victim)  # a live connection through the front
        leaked = _abstract_names() - before
        try:
            for name in leaked:  # squat.py's move, for whatever the front's connection did expose
                token, _, number = name[1:].rpartition("-")
                if number.isdigit():
                    for successor in range(int(number) + 1, int(number) + 50):
                        squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        squatters.append(squatter)
                        with contextlib.suppress(OSError):
                            squatter.bind(f"\0{token}-{successor}")
            async with grpc.aio.insecure_channel(
                f"unix:{sock_dir / 'pub.sock'}", options=options
            ) as next_caller:
                assert (await _get_peer(next_caller)).startswith(f"unix:{inner_dir}/peer-")
        finally:
            for squatter in squatters:
                squatter.close()
        # The front binds nothing in the abstract namespace any more: nothing to learn there.
        assert not {name for name in leaked if "svidgate" in name}


async def test_a_failed_bind_is_retried_once_with_a_new_name(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inner_dir = _private_dir(sock_dir)
    registry = PeerRegistry()
    front = ClaimedFront(sock_dir / "pub.sock", str(inner_dir / "grpc.sock"), registry)
    taken = inner_dir / "peer-taken"
    taken.write_text("")  # bind() on an existing path fails with EADDRINUSE
    fresh = front.client_address
    names = iter([str(taken), fresh()])
    front.client_address = lambda: next(names)  # type: ignore[method-assign]
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with (
        _PeerEcho(inner_dir / "grpc.sock", registry),
        front,
        grpc.aio.insecure_channel(f"unix:{sock_dir / 'pub.sock'}", options=options) as channel,
    ):
        peer = await _get_peer(channel)
        assert peer.startswith(f"unix:{inner_dir}/peer-")
        assert peer != f"unix:{taken}"
        assert taken.exists()  # someone else's file is never removed
        # Two failures in a row: the caller is dropped, with one error line, and nothing is left registered.
        names = iter([str(taken), str(taken)])
        with caplog.at_level(logging.ERROR, logger="svidgate.peercred"):
            reader, writer = await asyncio.open_unix_connection(str(sock_dir / "pub.sock"))
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        errors = [r for r in caplog.records if r.name == "svidgate.peercred" and r.levelno >= logging.ERROR]
        assert [r.getMessage() for r in errors] == ["peercred.inner_connect_failed"]
        assert len(registry) == 1  # only the channel above


async def test_client_paths_too_long_for_a_unix_socket_are_refused_at_start(sock_dir: Path) -> None:
    deep = sock_dir / ("d" * 90)
    deep.mkdir(mode=0o700)
    front = ClaimedFront(sock_dir / "pub.sock", str(deep / "g.sock"), PeerRegistry())
    with pytest.raises(SvidgateError, match="too long"):
        await front.start()
    assert not (sock_dir / "pub.sock").exists()
