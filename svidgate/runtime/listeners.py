"""Listeners and socket ownership: every address one svidgate process listens on, claimed, bound and released.

- `StateDirLock`: one serving process per ``state_dir`` (an exclusive flock for the life of the process).
- `ensure_tcp_address_free`: a taken TCP port is reported as such before gRPC would hide the errno.
- `UnixSocketClaim`: the one owner of a public unix socket file. It locks ``<path>.lock``, removes a stale
  socket a crash left (and refuses a live one or a non-socket), binds the listening socket atomically with its
  mode, and removes the file on release only if it is still the one it bound. The peer-credential front
  (`svidgate.peercred.PeerCredFront`) accepts on the socket it is handed and never touches the file.
- `Listeners`: the listeners of one process, in the order the runtime binds them, for logs, readiness and
  cleanup; on unix sockets a gRPC server listens on an inner socket behind a front.

TCP listeners are exclusive (no SO_REUSEPORT: `grpc_server_options`).

This module imports the config types and `svidgate.peercred`; only the runtime imports it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from svidgate.config import UNIX_TEMP_NAME_BYTES, Address, ListenConfig
from svidgate.errors import SvidgateError
from svidgate.peercred import (
    LISTEN_BACKLOG,
    Attest,
    PeerCredFront,
    PeerRegistry,
    make_inner_dir,
    remove_stale_inner_dir,
    socket_dir_problem,
)
from svidgate.sds.servicer import SERVER_OPTIONS as SDS_SERVER_OPTIONS

log = logging.getLogger(__name__)

__all__ = [
    "GRPC_SERVER_OPTIONS",
    "ListenerError",
    "Listeners",
    "StateDirLock",
    "StateDirLockedError",
    "UnixSocketClaim",
    "bind_error",
    "bracket_host",
    "ensure_tcp_address_free",
    "grpc_server_options",
]


class ListenerError(SvidgateError):
    """A listener cannot be bound: the address is in use, a second instance runs, a path is not a socket."""


class StateDirLockedError(SvidgateError):
    """`state_dir` cannot be locked: another svidgate serves from it, or the lock file cannot be opened."""


# ----------------------------------------------------------------------------------------------------------
# One instance per state directory and per TCP port
# ----------------------------------------------------------------------------------------------------------


class StateDirLock:
    """An exclusive `flock` on ``<state_dir>/serve.lock``, held for the life of the serving process.

    Two processes on one state directory would both rotate the CA and overwrite each other's state; the lock
    makes the second one exit at start instead. The lock dies with the process (kill -9 included), so a
    leftover lock file is harmless and stays: unlinking it would let a starting instance lock a file that is
    no longer the one at the path. The file holds the holder's pid, for the error message.

    Args:
        state_dir: the configured ``state_dir`` (created 0700 when missing, as the CA would).
    """

    FILE_NAME = "serve.lock"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / self.FILE_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            StateDirLockedError: another process holds it, or the directory or file cannot be used.
        """
        try:
            # Only created private here; an existing state_dir is the operator's and keeps its mode.
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # O_NOFOLLOW: a symlink planted at the lock path must not make svidgate lock another file.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StateDirLockedError(
                f"state_dir {self.state_dir}: cannot open the lock file {self.path}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                by = f" (pid {holder})" if holder else ""
                raise StateDirLockedError(
                    f"state_dir {self.state_dir} is locked by another svidgate instance{by}; "
                    "stop it first or give this one another state_dir"
                ) from None
            raise StateDirLockedError(
                f"state_dir {self.state_dir}: cannot lock {self.path}: {exc.strerror}"
            ) from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock. Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def bind_error(name: str, address: str, exc: OSError) -> ListenerError:
    """The one line a listener that cannot bind is reported with, e.g.
    ``listen.check: 127.0.0.1:8081: address already in use``.

    Args:
        name: the listener's key under ``listen`` (``grpc``, ``check``, ``workload_api``, ``http``).
        address: the address as the operator wrote it (``host:port`` or a path).
        exc: what `bind()` raised.
    """
    if isinstance(exc, socket.gaierror) or not exc.errno:  # resolver errors carry negative EAI_* codes
        reason = exc.strerror or str(exc)
    else:
        reason = os.strerror(exc.errno)
    line = f"listen.{name}: {address}: {reason[:1].lower()}{reason[1:]}"
    if exc.errno == errno.EADDRINUSE:
        line += " (another process listens there: a second svidgate?); stop it or choose another address"
    return ListenerError(line)


def ensure_tcp_address_free(name: str, address: Address) -> None:
    """Bind `address` once before gRPC does, to report a taken port as such.

    grpcio reports a failed bind only as internal log lines (``add_port.cc``) on stderr and a RuntimeError
    without the errno. The probe sets the options grpcio uses: SO_REUSEADDR (a previous run's TIME_WAIT
    connections do not count) and no SO_REUSEPORT (see `grpc_server_options`), so a port another process
    listens on is always refused. A race with another process between this probe and gRPC's own bind still
    fails the start, only with gRPC's words.

    Raises:
        ListenerError: the port is taken or not ours to bind (`bind_error`'s line).
    """
    if address.kind != "tcp" or address.port == 0:
        return
    try:
        candidates = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        # gRPC could not bind it either, and would say so only in its own log lines.
        raise ListenerError(
            f"listen.{name}: {address.grpc_target()}: cannot resolve {address.host}: {exc.strerror}"
        ) from None
    for family, kind, proto, _, sockaddr in candidates:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                # Only what certainly stops gRPC too: "localhost" also resolves to ::1, which a host without
                # IPv6 cannot bind while gRPC happily serves on 127.0.0.1.
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise bind_error(name, address.grpc_target(), exc) from None


# ----------------------------------------------------------------------------------------------------------
# Unix sockets: safe modes, stale sockets, a second instance
# ----------------------------------------------------------------------------------------------------------


def check_socket_dir(directory: Path) -> None:
    """Refuse a socket directory that another user controls (`socket_dir_problem`).

    Raises:
        ListenerError: the directory is not safe to put sockets in.
    """
    problem = socket_dir_problem(directory)
    if problem is not None:
        raise ListenerError(problem)


class UnixSocketClaim:
    """Claims a unix socket path for this process, and gives it back on exit.

    `claim()` takes an exclusive `flock` on ``<path>.lock`` (so that two instances starting at the same moment
    cannot both pass the stale-socket test and unlink each other's sockets), then looks at the path: nothing
    there is fine; a socket nobody answers on is a leftover of a crash and is removed; a socket some process
    answers on, or anything that is not a socket, is an error. `bound()` sets the socket's mode and remembers
    its inode; `release()` removes the socket only if it is still the one this process bound.

    Args:
        path: the socket path.
        mode: permission bits for the socket (0660: the owner and the group Envoy runs in).
    """

    def __init__(self, path: Path, mode: int = 0o660) -> None:
        self.path = path
        self.mode = mode
        self._lock_fd: int | None = None
        self._inode: tuple[int, int] | None = None

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def claim(self) -> None:
        """Make the path ready to bind.

        Raises:
            ListenerError: another process serves the socket, holds the lock, or the path is not a socket.
        """
        parent = self.path.parent
        if not parent.exists():
            # 0700: only svidgate's user may create or replace entries next to its sockets.
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            log.info("socket.dir_created", extra={"fields": {"path": str(parent), "mode": "0700"}})
        check_socket_dir(parent)
        try:
            # O_NOFOLLOW: a symlink planted at the lock path must not make svidgate create or lock another
            # file.
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise ListenerError(
                f"unix://{self.path}: cannot open lock file {self.lock_path}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ListenerError(
                    f"unix://{self.path}: another svidgate instance is already serving this socket "
                    f"(it holds {self.lock_path}); stop it first or choose another path"
                ) from None
            raise ListenerError(f"unix://{self.path}: cannot lock {self.lock_path}: {exc.strerror}") from None
        self._lock_fd = fd
        try:
            self._clear_stale()
        except BaseException:
            self._unlock()
            raise

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(
                f"unix://{self.path}: the path exists and is not a socket; refusing to replace it"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            # Nobody accepts on it: the socket file of a process that died without cleaning up.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            log.warning("socket.stale_removed", extra={"fields": {"path": str(self.path)}})
            return
        except OSError as exc:
            raise ListenerError(
                f"unix://{self.path}: cannot probe the existing socket: {exc.strerror}"
            ) from None
        finally:
            probe.close()
        raise ListenerError(
            f"unix://{self.path}: another process is accepting connections on this socket "
            "(a second svidgate?); refusing to start"
        )

    def recorded_inner_dir(self) -> Path | None:
        """The inner-socket directory the last holder of this lock recorded (`record_inner_dir`), if any.

        Read after `claim()`: holding the lock proves that holder is gone, so a directory still there was left
        by a crash (kill -9) and no live instance uses it.
        """
        if self._lock_fd is None:
            return None
        try:
            text = os.pread(self._lock_fd, 4096, 0).decode("utf-8", "replace").strip()
        except OSError:
            return None
        return Path(text) if text.startswith("/") and "\0" not in text else None

    def record_inner_dir(self, directory: Path) -> None:
        """Write `directory` into the lock file, for the next instance to clean up after a crash."""
        if self._lock_fd is None:
            return
        try:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{directory}\n".encode(), 0)
        except OSError as exc:
            log.warning(
                "socket.lock_record_failed",
                extra={"fields": {"path": str(self.lock_path), "error": exc.strerror or str(exc)}},
            )

    def listen(self, backlog: int = LISTEN_BACKLOG) -> socket.socket:
        """Bind and listen on the claimed path, with `mode` from the first moment the path exists.

        The socket is bound under a temporary name in the same directory, given its mode and renamed into
        place, so no process ever sees the path with the umask's (looser) mode. Call after `claim()`.

        Args:
            backlog: the `listen()` backlog (`LISTEN_BACKLOG`: Envoys reconnect in bursts).

        Returns:
            The listening, non-blocking socket (the caller accepts on it; this claim owns the file).

        Raises:
            ListenerError: the path cannot be bound.
        """
        tmp = self.path.with_name(f".{secrets.token_hex(4)}.tmp")
        assert len(tmp.name) == UNIX_TEMP_NAME_BYTES  # the config checks that this name fits (sun_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, self.mode)
            os.rename(tmp, self.path)
            sock.listen(backlog)
            sock.setblocking(False)
            st = os.lstat(self.path)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ListenerError(f"{self.path}: cannot listen: {exc}") from None
        self._inode = (st.st_dev, st.st_ino)
        return sock

    def bound(self) -> None:
        """Record a socket the caller bound at the path itself, and give it `mode`."""
        try:
            os.chmod(self.path, self.mode)
            st = os.lstat(self.path)
        except OSError as exc:
            raise ListenerError(f"unix://{self.path}: cannot set the socket's mode: {exc.strerror}") from None
        self._inode = (st.st_dev, st.st_ino)

    def release(self) -> None:
        """Remove the socket if it is still ours, and drop the lock. Idempotent."""
        if self._inode is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning(
                    "socket.cleanup_failed", extra={"fields": {"path": str(self.path), "error": exc.strerror}}
                )
            self._inode = None
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            # The lock file stays: unlinking it would let a starting instance lock a file that is no longer
            # the one at the path, and a leftover lock file is harmless (a lock dies with its process).
            os.close(self._lock_fd)
            self._lock_fd = None


#: The SDS servicer's server options (pending-request limits raised for reconnect storms: grpcio's defaults
#: refused 1,847 of 5,000 streams opened in one burst here), plus keepalive: Envoy keeps SDS streams open for
#: days and its HTTP/2 keepalive pings must not earn it a GOAWAY.
GRPC_SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    *SDS_SERVER_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


def grpc_server_options(*, share_port: bool = False) -> list[tuple[str, int]]:
    """The options of every gRPC server svidgate creates (grpc.aio and threaded alike).

    grpcio sets SO_REUSEPORT on TCP listeners by default: a second process binding the same address would
    silently receive part of the connections (measured: two `svidgate serve` on one port split them 6/14).
    svidgate's listeners are exclusive; this is the one place to opt in, for Check worker processes of one
    svidgate that share its port on purpose (`ensure_tcp_address_free` would then probe with SO_REUSEPORT
    too, so that a sibling worker does not count as another process).

    Args:
        share_port: let processes bind the same TCP port (SO_REUSEPORT).
    """
    return [*GRPC_SERVER_OPTIONS, ("grpc.so_reuseport", 1 if share_port else 0)]


#: `/readyz` turns unready when a served X.509-SVID has less than this fraction of its lifetime left. Every


def bracket_host(host: str) -> str:
    """`host` as it is written before ``:port`` (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


@dataclass(slots=True)
class Listener:
    """One bound listening address, for logs, readiness and cleanup."""

    name: str  # "grpc", "workload_api", "check", "http", "bundle_endpoint"
    address: str  # as configured
    bound: str  # as bound (the real port when the config said 0)
    claim: UnixSocketClaim | None = None
    front: PeerCredFront | None = None  # the peer-credentials front of a unix listener


class Listeners:
    """The listeners of one process: claimed before anything is built, bound, and released on stop.

    Args:
        socket_mode: permission bits of the public unix sockets (``server.socket_mode``).
    """

    def __init__(self, socket_mode: int) -> None:
        self.socket_mode = socket_mode
        self.bound: list[Listener] = []
        self._claims: dict[str, UnixSocketClaim] = {}
        self._inner: Path | None = None

    def claim(self, listen: ListenConfig) -> None:
        """Claim every unix socket and probe every TCP address of `listen`, before anything else exists: a
        second instance is refused before it loads a CA or creates a gRPC server (half-built grpc.aio objects
        are fragile to tear down).

        Raises:
            ListenerError: a socket or port is taken, or a socket directory is unsafe.
        """
        for address in (*listen.grpc, listen.workload_api, listen.check):
            if address is not None and address.kind == "unix":
                claim = UnixSocketClaim(Path(address.path), self.socket_mode)
                claim.claim()
                self._claims[address.path] = claim
        if self._claims:
            # A kill -9 leaves the previous instance's inner-socket directory behind. Each socket lock records
            # the directory of its holder; holding the lock now, that holder is dead, so its directory can go.
            leftovers = {claim.recorded_inner_dir() for claim in self._claims.values()}
            for leftover in sorted(p for p in leftovers if p is not None):
                remove_stale_inner_dir(leftover)
            inner = self._inner_dir()
            for claim in self._claims.values():
                claim.record_inner_dir(inner)
        named = [("check", listen.check), *(("grpc", address) for address in listen.grpc)]
        if listen.http is not None:
            named.append(("http", Address("tcp", host=listen.http[0], port=listen.http[1])))
        for name, tcp in named:
            if tcp is not None and tcp.kind == "tcp":
                ensure_tcp_address_free(name, tcp)

    def add(self, name: str, host: str, port: int, bound_port: int) -> str:
        """Record a TCP listener bound elsewhere (HTTP, bundle endpoint); returns its bound address."""
        address = f"{bracket_host(host)}:{bound_port}"
        self.bound.append(Listener(name, f"{bracket_host(host)}:{port}", address))
        return address

    async def bind_grpc(
        self,
        server: grpc.aio.Server | grpc.Server,
        name: str,
        address: Address,
        peers: PeerRegistry,
        attest: Attest | None,
    ) -> None:
        """Bind `server` to `address`: directly on TCP; on a unix path through a peer-credential front.

        Raises:
            ListenerError: the address cannot be bound.
        """
        if address.kind == "tcp":
            try:
                port = server.add_insecure_port(address.grpc_target())
            except RuntimeError as exc:
                raise ListenerError(f"listen.{name} {address}: cannot bind: {exc}") from None
            if port == 0:
                raise ListenerError(f"listen.{name} {address}: cannot bind (address in use?)")
            bound = str(Address(kind="tcp", host=address.host, port=port))
            self.bound.append(Listener(name, str(address), bound))
            log.info("grpc.listening", extra={"fields": {"listener": name, "address": bound}})
            return
        claim = self._claims.pop(address.path)
        listener = Listener(name, str(address), str(address), claim=claim)
        self.bound.append(listener)
        # grpcio cannot read SO_PEERCRED: the front accepts on the public path, reads the peer's credentials
        # and pipes the connection to the gRPC server's inner socket, in a directory only svidgate can enter.
        inner = str(self._inner_dir() / f"{name}-{len(self.bound)}.sock")
        try:
            port = server.add_insecure_port(f"unix:{inner}")
        except RuntimeError as exc:
            raise ListenerError(
                f"listen.{name} {address}: cannot bind the inner socket {inner}: {exc}"
            ) from None
        if port == 0:
            raise ListenerError(f"listen.{name} {address}: cannot bind the inner socket {inner}")
        try:
            front = PeerCredFront(claim.path, claim.listen(), inner, peers, attest=attest)
            await front.start()
        except SvidgateError as exc:
            raise ListenerError(f"listen.{name} {address}: {exc}") from None
        listener.front = front
        log.info(
            "grpc.listening",
            extra={"fields": {"listener": name, "address": str(address), "mode": f"{self.socket_mode:04o}"}},
        )

    def _inner_dir(self) -> Path:
        if self._inner is None:
            self._inner = make_inner_dir()
        return self._inner

    async def close_fronts(self) -> None:
        """Stop accepting on the unix sockets and close every connection through them."""
        for listener in self.bound:
            if listener.front is not None:
                with contextlib.suppress(Exception):
                    await listener.front.close()

    def release(self) -> None:
        """Remove the socket files still ours, drop their locks and the inner directory. Idempotent."""
        for listener in self.bound:
            if listener.claim is not None:
                listener.claim.release()
        for claim in self._claims.values():
            claim.release()
        self._claims.clear()
        if self._inner is not None:
            shutil.rmtree(self._inner, ignore_errors=True)
            self._inner = None
