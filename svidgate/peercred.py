"""Kernel-verified peer credentials for gRPC services on unix sockets (SO_PEERCRED), which grpcio cannot read.

The front listens on the public unix socket. For every connection it reads SO_PEERCRED (pid, uid, gid), binds
a fresh socket to a new path in the gRPC server's private inner directory (``<dir>/peer-<64 random bits>``),
records that path in a `PeerRegistry`, connects it to the inner socket, unlinks the path (the kernel keeps a
connected socket's bound address), and pumps bytes both ways. grpcio reports such a connection's peer as
``unix:<path>`` (verified with grpcio 1.85, see tests/component/test_peercred.py), so a servicer maps
`context.peer()` back to the caller with `PeerRegistry.lookup`. The entry is removed when the connection
closes.

Why it is safe: the inner directory is 0700, so only svidgate's own user can connect to the inner socket or
bind a path in it. Every connection on the inner socket therefore comes from the front, and no other local
user can take a name the front is about to bind. The name is also unpredictable (`secrets.token_hex`),
but that is defence in depth, not the protection: bound paths are listed in /proc/net/unix for everyone.
An earlier design bound abstract names (``\\0svidgate-<token>-<n>``): those live in a namespace every local
user shares, so anyone could read the token from /proc/net/unix, bind the next names first and make the
front drop callers. A peer that is not in the registry (TCP, or the inner socket reached some other way)
gets no uid/gid, and `unix:` selectors never match it.

Used by SDS and by the Workload API. When the front is given an `attest` function (Kubernetes attestation,
`svidgate.attest.k8s`), it runs it on each caller before the connection is forwarded, so every service sees
the caller's pod from its first request. The connection stays paused meanwhile (the caller's first bytes wait
in the kernel), and other connections are not held up: attestation is a coroutine that does its blocking work
off the event loop.

This module imports only the identity domain (`CallerInfo`), never gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from svidgate.config import MAX_UNIX_PATH_BYTES
from svidgate.errors import SvidgateError
from svidgate.identity.entitlement import CallerInfo

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;} (Linux)
_UNIX_PREFIX = "unix:"


#: The front's client sockets are bound to ``<inner dir>/peer-<16 hex digits>``.
_CLIENT_NAME_PREFIX = "peer-"
_CLIENT_TOKEN_BYTES = 8

#: Adds what attestation finds (the pod) to a caller known by its peer credentials; never raises for a caller.
Attest = Callable[[CallerInfo], Awaitable[CallerInfo]]


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """What the kernel says about the process at the other end of a unix socket (at connect time)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Read SO_PEERCRED of a connected unix socket.

    Args:
        sock: a connected `AF_UNIX` socket.

    Returns:
        The peer's pid, uid and gid.

    Raises:
        SvidgateError: the platform or socket does not support SO_PEERCRED.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except (AttributeError, OSError) as err:
        raise SvidgateError(f"cannot read the peer credentials of a unix socket: {err}") from err
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


class PeerRegistry:
    """Maps the paths the front's inner connections are bound to back to the callers' credentials.

    One registry may serve several fronts (every path is unique: it names a socket file that existed when the
    connection was made).
    """

    def __init__(self) -> None:
        self._peers: dict[str, CallerInfo] = {}

    def register(self, address: str, credentials: PeerCredentials, caller: CallerInfo | None = None) -> bool:
        """Remember the caller behind the inner connection bound to `address`.

        Args:
            address: the filesystem path the front's inner socket is bound to.
            credentials: the caller's SO_PEERCRED.
            caller: what attestation made of them (None: the credentials alone).

        Returns:
            False (and nothing recorded) when `address` is already registered to a live connection.
        """
        if address in self._peers:
            return False
        if caller is None:
            caller = CallerInfo(uid=credentials.uid, gid=credentials.gid, pid=credentials.pid)
        self._peers[address] = caller
        return True

    def unregister(self, address: str) -> None:
        self._peers.pop(address, None)

    def lookup(self, peer: str) -> CallerInfo | None:
        """The caller behind a gRPC `context.peer()` string, or None when it did not come through the front.

        Args:
            peer: e.g. ``unix:/tmp/svidgate-x/peer-0123456789abcdef`` (grpcio's form for a unix client bound
                to a path; an unbound client is plain ``unix:`` and TCP is ``ipv4:...``/``ipv6:...``).

        Returns:
            The caller's uid, gid and pid, or None.
        """
        if not peer.startswith(_UNIX_PREFIX):
            return None
        return self._peers.get(peer[len(_UNIX_PREFIX) :])

    def __len__(self) -> int:
        return len(self._peers)


class _Pipe(asyncio.Protocol):
    """One side of a proxied connection: what it reads is written to the other side, with back-pressure."""

    def __init__(self, on_lost: _Connection) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Pipe | None = None
        self.eof = False
        self._conn = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.other is not None and self.other.eof:
            # Both directions are finished: release both sockets and the registry entry.
            self._conn.close()
            return False
        other = self.other.transport if self.other is not None else None
        if other is not None and other.can_write_eof():
            other.write_eof()
        return True  # keep our write side open (half-close): the other side may still send its last bytes

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.close()

    # Back-pressure: when our write buffer fills, stop reading from the other side until it drains.
    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class _Connection:
    """One accepted connection and its inner counterpart."""

    def __init__(self, front: PeerCredFront) -> None:
        self.front = front
        self.outer = _Pipe(self)
        self.inner = _Pipe(self)
        self.outer.other, self.inner.other = self.inner, self.outer
        #: The registered path of the inner connection (unregistered on close).
        self.address: str | None = None
        #: The socket file still to unlink (None once unlinked).
        self._socket_file: str | None = None
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for pipe in (self.outer, self.inner):
            if pipe.transport is not None:
                pipe.transport.close()
        self._unlink()
        if self.address is not None:
            self.front.registry.unregister(self.address)
        self.front.connections.discard(self)

    def _unlink(self) -> None:
        if self._socket_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._socket_file)
            self._socket_file = None

    def _bind(self, credentials: PeerCredentials, caller: CallerInfo | None) -> socket.socket:
        """A socket bound to a fresh, registered path in the inner directory.

        A failed bind (or, vanishingly unlikely, a name already registered) is retried once with a new name:
        only svidgate's own user can create files there, so a second failure is not a collision but a broken
        directory (removed, full, read-only).

        Raises:
            OSError: the second attempt failed too.
        """
        for attempt in (1, 2):
            address = self.front.client_address()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.bind(address)
            except OSError:
                sock.close()
                if attempt == 2:
                    raise
                continue
            self._socket_file = address
            if self.front.registry.register(address, credentials, caller):
                self.address = address
                return sock
            sock.close()
            self._unlink()
        raise OSError(errno.EADDRINUSE, "no free inner client address after two attempts")

    async def connect_inner(self) -> None:
        outer = self.outer.transport
        assert outer is not None
        raw = outer.get_extra_info("socket")
        try:
            credentials = peer_credentials(raw)
        except SvidgateError as err:
            log.warning("peercred.no_credentials", extra={"fields": {"error": str(err)}})
            self.close()
            return
        caller: CallerInfo | None = None
        if self.front.attest is not None:
            caller = await self.front.attest(
                CallerInfo(uid=credentials.uid, gid=credentials.gid, pid=credentials.pid)
            )
            if self.closed:  # the caller went away while it was attested
                return
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            sock = self._bind(credentials, caller)
            try:
                await loop.sock_connect(sock, self.front.inner_path)
            finally:
                # grpcio reads the peer address from the connected socket (getpeername), which keeps the bound
                # path after the file is gone: the file is only needed until the connect.
                self._unlink()
            await loop.create_unix_connection(lambda: self.inner, sock=sock)
        except OSError as err:
            if sock is not None:
                sock.close()
            log.error(
                "peercred.inner_connect_failed",
                extra={"fields": {"inner": self.front.inner_path, "error": str(err), "pid": credentials.pid}},
            )
            self.close()
            return
        if self.closed:  # the caller went away while we connected
            self.close()
            return
        outer.resume_reading()


class _Outer(asyncio.Protocol):
    """Accepts a public connection: pauses it until the inner connection exists, then hands over to
    `_Pipe`."""

    def __init__(self, front: PeerCredFront) -> None:
        self._conn = _Connection(front)
        self._front = front

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._conn.outer.connection_made(transport)
        transport.pause_reading()
        self._front.connections.add(self._conn)
        task = asyncio.get_running_loop().create_task(self._conn.connect_inner())
        self._front.tasks.add(task)
        task.add_done_callback(self._front.tasks.discard)

    def data_received(self, data: bytes) -> None:
        self._conn.outer.data_received(data)

    def eof_received(self) -> bool:
        return self._conn.outer.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.close()

    def pause_writing(self) -> None:
        self._conn.outer.pause_writing()

    def resume_writing(self) -> None:
        self._conn.outer.resume_writing()


def socket_dir_problem(directory: Path) -> str | None:
    """Why `directory` is not safe for svidgate's sockets, or None when it is.

    Whoever can write to the directory can replace svidgate's socket with their own and hand Envoy their
    certificates, or receive Workload API callers. The default path (``/tmp/svidgate-<uid>``) is predictable,
    so another user could create it first. The directory (and a symlink to it) must belong to svidgate's
    user or root, and must not be writable by others unless the sticky bit protects entries (as in /tmp).
    Shared by `serve` (before it binds) and `check-config` (`svidgate.preflight`).
    """
    trusted = {os.geteuid(), 0}
    try:
        link = os.lstat(directory)
        st = os.stat(directory)
    except OSError as exc:
        return f"{directory}: cannot inspect the socket directory: {exc.strerror}"
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in trusted:
        return f"{directory}: is a symlink owned by uid {link.st_uid}; refusing to use it"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory}: is not a directory"
    if st.st_uid not in trusted:
        return (
            f"{directory}: is owned by uid {st.st_uid}, not by svidgate's user ({os.geteuid()}) or root; "
            "another user could replace the sockets in it"
        )
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        return (
            f"{directory}: is writable by every user (mode {stat.S_IMODE(st.st_mode):04o}); "
            "another user could replace the sockets in it"
        )
    return None


#: The `listen()` backlog of the public unix sockets: Envoys and workloads reconnect in bursts (a node
#: restart, a svidgate restart), and a full backlog refuses a unix connect at once (EAGAIN) where TCP would
#: retry the SYN. The kernel caps it at ``net.core.somaxconn`` (4096 by default since Linux 5.4);
#: `PeerCredFront.start` logs the effective value.
LISTEN_BACKLOG = 4096


def effective_backlog(backlog: int = LISTEN_BACKLOG) -> int:
    """`backlog` as the kernel applies it: capped at ``net.core.somaxconn`` (when it can be read)."""
    try:
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text().strip())
    except (OSError, ValueError):
        return backlog
    return min(backlog, somaxconn)


#: The private directory of the inner sockets is ``$TMPDIR/svidgate-inner-<random>``.
INNER_DIR_PREFIX = "svidgate-inner-"


def make_inner_dir() -> Path:
    """A new private directory for the fronts' inner sockets (mode 0700: only svidgate's user may connect to
    them or bind names in them, so every connection there came through a front)."""
    return Path(tempfile.mkdtemp(prefix=INNER_DIR_PREFIX))


def remove_stale_inner_dir(path: Path) -> bool:
    """Remove the inner-socket directory a killed svidgate left behind.

    The caller must hold the socket lock the directory was recorded under
    (`svidgate.runtime.listeners.UnixSocketClaim`):
    its previous holder is then dead, and no live instance uses the directory. Even so, only what svidgate
    made is touched: a real directory (a symlink is never followed) named ``svidgate-inner-*``, owned by this
    user, mode 0700, holding nothing but sockets. Anything else is left alone with a warning.

    Args:
        path: the directory as recorded.

    Returns:
        True when it was removed.
    """

    def keep(reason: str) -> bool:
        log.warning("peercred.stale_inner_dir_kept", extra={"fields": {"path": str(path), "reason": reason}})
        return False

    if not path.is_absolute() or not path.name.startswith(INNER_DIR_PREFIX):
        return keep(f"not a svidgate inner directory name ({INNER_DIR_PREFIX}* expected)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # the previous instance cleaned up after itself
    except OSError as err:
        # ELOOP: a symlink; ENOTDIR: not a directory.
        return keep(f"cannot open it as a directory without following links: {err.strerror or err}")
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) != 0o700:
            return keep(f"owned by uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):04o}, not ours")
        names = os.listdir(fd)
        for name in names:
            if not stat.S_ISSOCK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                return keep(f"holds {name!r}, which is not a socket")
        for name in names:
            os.unlink(name, dir_fd=fd)
        os.rmdir(path)
    except OSError as err:
        return keep(f"cannot remove it: {err.strerror or err}")
    finally:
        os.close(fd)
    log.warning("peercred.stale_inner_dir_removed", extra={"fields": {"path": str(path)}})
    return True


class PeerCredFront:
    """The accepting front on a public unix socket that forwards to a gRPC server's inner socket.

    The front accepts on a listening socket it is handed and closes it on `close()`; the socket file belongs
    to `svidgate.runtime.listeners.UnixSocketClaim`, the one owner of each public socket file (its lock, the
    stale-socket probe, its mode, and its removal on exit).

    Args:
        path: the public socket's path (Envoy's SDS cluster, or the Workload API endpoint, points here), for
            the log.
        listening: the bound, listening, non-blocking unix socket at `path`.
        inner_path: the gRPC server's own unix socket (``server.add_insecure_port("unix:" + inner_path)``),
            in a directory only svidgate can enter.
        registry: where connections are recorded; the servicer looks peers up in it.
        client_dir: where the inner connections' client sockets are bound: a directory only svidgate can
            enter (default: the directory of `inner_path`, which must be one already).
        attest: run on every caller before its connection is forwarded (Kubernetes attestation), or None.
    """

    def __init__(
        self,
        path: Path,
        listening: socket.socket,
        inner_path: str,
        registry: PeerRegistry,
        client_dir: Path | None = None,
        attest: Attest | None = None,
    ) -> None:
        self.path = path
        self.attest = attest
        self.inner_path = inner_path
        self.registry = registry
        self.client_dir = client_dir if client_dir is not None else Path(inner_path).parent
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._listening: socket.socket | None = listening
        self._server: asyncio.Server | None = None

    def client_address(self) -> str:
        """A fresh, unpredictable path in `client_dir` for one inner connection's client socket."""
        return str(self.client_dir / f"{_CLIENT_NAME_PREFIX}{secrets.token_hex(_CLIENT_TOKEN_BYTES)}")

    def _check_client_dir(self) -> None:
        example = self.client_address()
        if len(os.fsencode(example)) > MAX_UNIX_PATH_BYTES:
            raise SvidgateError(
                f"{self.client_dir}: too long for the front's client sockets ({example!r} is "
                f"{len(os.fsencode(example))} bytes; unix socket paths hold at most {MAX_UNIX_PATH_BYTES})"
            )
        try:
            info = os.stat(self.client_dir)
        except OSError as err:
            raise SvidgateError(
                f"{self.client_dir}: cannot use it for the front's client sockets: {err}"
            ) from err
        if stat.S_IMODE(info.st_mode) & 0o077 or info.st_uid != os.geteuid():
            # Others could then reach the inner socket (no credentials, so no SVID) and bind paths in it.
            log.warning(
                "peercred.inner_dir_not_private",
                extra={"fields": {"dir": str(self.client_dir), "mode": f"{stat.S_IMODE(info.st_mode):04o}"}},
            )

    async def start(self) -> None:
        """Start accepting.

        Raises:
            SvidgateError: the client directory is missing or its paths would be too long for a unix socket
                (the listening socket is closed then).
        """
        listening = self._listening
        if listening is None:
            raise SvidgateError(f"{self.path}: the front was closed")
        try:
            self._check_client_dir()
            # asyncio calls listen() again with its own backlog (100 unless told): pass ours, or a burst of
            # 500 connects has most of them refused (measured: 297 of 500 on SDS, 382 on the Workload API).
            self._server = await asyncio.get_running_loop().create_unix_server(
                lambda: _Outer(self), sock=listening, backlog=LISTEN_BACKLOG
            )
        except BaseException:
            self._listening = None
            listening.close()
            raise
        log.info(
            "peercred.listening",
            extra={
                "fields": {
                    "path": str(self.path),
                    "inner": self.inner_path,
                    "mode": f"{stat.S_IMODE(os.stat(self.path).st_mode):04o}",
                    "backlog": effective_backlog(),
                }
            },
        )

    async def close(self) -> None:
        """Stop accepting and close every proxied connection (the socket file is its owner's to remove)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        elif self._listening is not None:
            self._listening.close()
        self._listening = None
        for conn in list(self.connections):
            conn.close()
        for task in list(self.tasks):
            task.cancel()

    async def __aenter__(self) -> PeerCredFront:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
