"""The svidgate process: the one place that owns the lifecycle.

`run(config, config_path)` (what `svidgate serve` calls) locks `state_dir`, loads the identity source, starts
its background loop, and opens the listeners (the listener contract, docs/configuration.md):

- ``listen.check``: ext_authz Check on grpcio's threaded server (the fast path);
- ``listen.grpc``: SDS on grpc.aio;
- ``listen.workload_api``: the SPIFFE Workload API on grpc.aio;
- ``listen.http``: ``/metrics``, ``/healthz``, ``/readyz``.

Every gRPC listener answers Check with the same decision (`Services.register` is the only place services
are put on a server, and it puts Check on each), because an Envoy with ``failure_mode_allow: true`` pointed at
a listener without Check would turn UNIMPLEMENTED into an allow; each also serves gRPC health and (behind a
switch) reflection. TCP listeners are exclusive (no SO_REUSEPORT: `grpc_server_options`). Then it waits for a
signal:

- SIGTERM / SIGINT drain: readiness and gRPC health go NOT_SERVING, unix listeners stop accepting, every
  long-lived stream (SDS, Workload API, health Watch) is ended with status OK -- Envoy treats that as a normal
  end and reconnects elsewhere, where a cancelled stream would be logged as an error -- and in-flight Check
  calls are answered, all within `drain_grace`; then the process exits 0. In every state -- while the source
  still waits for a SPIRE agent at start-up, while a federation fetch is in progress -- the process is gone
  within `drain_grace` + `STOP_MARGIN`: start-up is cancelled by a stop request, nothing waits on the network
  without a deadline, and a watchdog ends the process (exit 1, `server.stop_overrun`) if a step ever overruns.
- SIGHUP (and a change of the config file's content, polled): the file is re-read and validated; the authz
  policies and the workloads are swapped atomically. An invalid file is rejected with one clear log line and
  the last good configuration stays in force.

Unix sockets are created with mode 0660 (parent directory 0700 when svidgate creates it) and removed on exit.
A stale socket left by a crash is detected by a connect test and replaced; a socket some live process answers
on, a TCP address in use, or a lock held by a second svidgate (on a socket or on `state_dir`) makes the start
fail with one clear line on stderr.

Import direction: this module imports everything (sources, services, metrics, logs); nothing imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import gc
import hashlib
import inspect
import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
import grpc.aio
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health as health_sync
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from svidgate import __version__
from svidgate.attest.k8s import KubernetesAttestor
from svidgate.config import (
    RESTART_REQUIRED_KEYS,
    Address,
    Config,
    KubernetesConfig,
    ServerConfig,
    load_config,
    restart_required_changes,
)
from svidgate.errors import SourceError, SvidgateError
from svidgate.extauthz.inject import TokenInjector
from svidgate.extauthz.policy import compile_authz
from svidgate.extauthz.reload import PolicyHolder
from svidgate.extauthz.servicer import AuthorizationServicer
from svidgate.grpcutil import wrap_handler
from svidgate.identity.bundle import BundleRejectionSink
from svidgate.identity.clock import Clock, system_clock
from svidgate.identity.entitlement import CallerInfo
from svidgate.identity.snapshot import IdentitySnapshot
from svidgate.logs import configure_logging
from svidgate.metrics import Metrics
from svidgate.peercred import (
    PeerCredFront,
    PeerRegistry,
    make_inner_dir,
    remove_stale_inner_dir,
    socket_dir_problem,
)
from svidgate.preflight import preflight
from svidgate.sds.servicer import SERVER_OPTIONS as SDS_SERVER_OPTIONS
from svidgate.sds.servicer import SecretDiscoveryServicer
from svidgate.sources import create_source
from svidgate.sources.base import IdentitySource, SourceStatus, TemplatedSvids
from svidgate.sources.builtin import BuiltinSource
from svidgate.sources.bundle_server import BundleEndpointServer, BundleSequence
from svidgate.sources.spire import SpireSource
from svidgate.workloadapi import SECURITY_HEADER
from svidgate.workloadapi.server import MintJwtSvid, WorkloadApiServicer

log = logging.getLogger(__name__)

__all__ = [
    "DrainInterceptor",
    "HttpEndpoint",
    "ListenerError",
    "StateDirLock",
    "StateDirLockedError",
    "UnixSocketClaim",
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

    def bound(self) -> None:
        """Record the freshly bound socket and give it `mode`."""
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


@contextlib.contextmanager
def restrictive_umask(mode: int) -> Any:
    """Create files under a umask that yields at most `mode`, so a socket is never briefly world-writable.

    grpcio and `bind()` create the socket file with 0777 & ~umask; `chmod` afterwards leaves a window in which
    anyone may connect. The umask is process-wide, so this is only used during start-up, before any other
    thread creates files.
    """
    previous = os.umask(0o777 & ~mode)
    try:
        yield
    finally:
        os.umask(previous)


# ----------------------------------------------------------------------------------------------------------
# Drain: end long-lived streams cleanly
# ----------------------------------------------------------------------------------------------------------


class _DrainContext:
    """The servicer context a drained streaming handler sees: its writes complete even when the drain stops
    the handler in the middle of one.

    grpc.aio's `write()` (and `send_initial_metadata()`) record that the response headers went out only after
    grpc-core reports the batch done. Cancelling the handler inside that await loses the record although the
    headers did go out; the call's final status then asks grpc-core to send the headers again, grpc-core
    refuses the batch (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS), no status is sent, and the call hangs until
    `server.stop()` cancels it: the client sees UNAVAILABLE after the whole grace instead of OK. So the writes
    run shielded from the handler's cancellation, and `settle()` waits for them before the status is sent.
    Everything else is the wrapped context's.
    """

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context
        self._writes: set[asyncio.Future[None]] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        await self._shielded(self._context.write(message))

    async def send_initial_metadata(self, metadata: Any) -> None:
        await self._shielded(self._context.send_initial_metadata(metadata))

    async def _shielded(self, operation: Awaitable[None]) -> None:
        write = asyncio.ensure_future(operation)
        self._writes.add(write)
        write.add_done_callback(self._write_done)
        await asyncio.shield(write)

    def _write_done(self, write: asyncio.Future[None]) -> None:
        self._writes.discard(write)
        if not write.cancelled():
            write.exception()  # retrieved: the handler saw it, or it was stopped and no longer cares

    async def settle(self) -> None:
        """Return once no write is in flight (a stopped handler's last write included)."""
        while self._writes:
            await asyncio.wait(set(self._writes))


class DrainInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Ends every server-streaming RPC with status OK once `drain` is set.

    grpc.aio's `server.stop(grace)` waits for RPCs to finish and then cancels them; SDS and Workload API
    streams never finish by themselves, so without this they would all end CANCELLED at the end of the grace
    period. Unary calls (Check) are left alone: they are answered normally while the server stops.

    A drained handler is stopped by cancelling it wherever it waits; its writes are shielded from that
    (`_DrainContext`), because a cancelled grpc.aio write breaks the call's final status.

    Args:
        drain: set once when the process starts draining.
    """

    def __init__(self, drain: asyncio.Event) -> None:
        self._drain = drain
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once every wrapped streaming RPC is done (its status sent to the client)."""
        await self._idle.wait()

    def _enter(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # Counted until the RPC is done (its status sent), not until the handler returns: stopping the server
        # between the two cancels the call, and the client sees UNAVAILABLE instead of OK.
        self._active += 1
        self._idle.clear()
        # grpc-stubs declares DoneCallback as a class, so no plain callable type-checks against it.
        context.add_done_callback(self._leave)  # type: ignore[arg-type]

    def _leave(self, _context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        # Unary calls (Check) are left alone: they are answered normally while the server stops.
        return wrap_handler(handler, None, self._wrap)

    def _wrap(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        drain = self._drain
        if inspect.isasyncgenfunction(behavior):

            async def generator(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                if drain.is_set():
                    return
                shielded = _DrainContext(context)
                responses = behavior(request, shielded)
                drained = asyncio.ensure_future(drain.wait())
                following: asyncio.Future[Any] | None = None
                self._enter(context)
                try:
                    while True:
                        following = asyncio.ensure_future(responses.__anext__())
                        await asyncio.wait((following, drained), return_when=asyncio.FIRST_COMPLETED)
                        if not following.done():
                            return  # drained: the finally below stops the handler
                        try:
                            response = following.result()
                        except StopAsyncIteration:
                            return
                        following = None
                        yield response
                finally:
                    drained.cancel()
                    # The handler runs its next step in `following`; when the client cancelled or the server
                    # drains, stop it there so that its own finally blocks run (stream gauges, subscriptions).
                    if following is not None and not following.done():
                        following.cancel()
                        with contextlib.suppress(BaseException):
                            await following
                    with contextlib.suppress(Exception):
                        await responses.aclose()
                    await shielded.settle()

            return generator

        async def coroutine(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            # A handler that writes with `await context.write()` and returns when done (grpc health Watch).
            if drain.is_set():
                return None
            shielded = _DrainContext(context)
            task = asyncio.ensure_future(behavior(request, shielded))
            drained = asyncio.ensure_future(drain.wait())
            self._enter(context)
            try:
                await asyncio.wait((task, drained), return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    # A helper task's write (SDS pushes from one) may still run when the handler returns.
                    await shielded.settle()
                    return task.result()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                # A write the cancellation interrupted is still running: grpc.aio sends the status only after
                # it, so that the status does not ask for the response headers a second time.
                await shielded.settle()
                return None
            finally:
                drained.cancel()
                if not task.done():
                    task.cancel()

        return coroutine


# ----------------------------------------------------------------------------------------------------------
# HTTP: /metrics, /healthz, /readyz
# ----------------------------------------------------------------------------------------------------------

Readiness = Callable[[], tuple[bool, str]]
Details = Callable[[], dict[str, object]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class HttpEndpoint:
    """A deliberately small HTTP/1.1 server for Prometheus and probes (no new dependency, one request per
    connection, bounded reads).

    Args:
        host: address to bind.
        port: port to bind (0: the kernel picks; see `port`).
        registry: served on ``/metrics``.
        readiness: returns ``(ready, reason)`` for ``/readyz``.
        details: more fields for the ``/readyz`` JSON body (the health of every source).
    """

    #: Probes and Prometheus send a few hundred bytes; anything bigger is not for us.
    MAX_REQUEST = 8192
    READ_TIMEOUT = 5.0

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: Readiness,
        details: Details | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._registry = registry
        self._readiness = readiness
        self._details = details
        self._server: asyncio.Server | None = None
        self.alive = True

    async def start(self) -> int:
        """Bind and start serving.

        Returns:
            The bound port.

        Raises:
            ListenerError: the address cannot be bound.
        """
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        except OSError as exc:
            raise bind_error("http", f"{_bracket_host(self.host)}:{self.port}", exc) from None
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.READ_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            if len(head) > self.MAX_REQUEST:
                await self._respond(writer, 400, b"request too large\n", "text/plain", head_only=False)
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            if len(parts) != 3:
                await self._respond(writer, 400, b"bad request\n", "text/plain", head_only=False)
                return
            method, target, _ = parts
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await self._respond(writer, 405, b"method not allowed\n", "text/plain", head_only=False)
                return
            status, body, content_type = self._route(path)
            await self._respond(writer, status, body, content_type, head_only=method == "HEAD")
        except Exception:
            log.exception("http.handler_failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _route(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            return 200, generate_latest(self._registry), CONTENT_TYPE_LATEST
        if path == "/healthz":
            if self.alive:
                return 200, b"ok\n", "text/plain; charset=utf-8"
            return 503, b"stopping\n", "text/plain; charset=utf-8"
        if path == "/readyz":
            ready, reason = self._readiness()
            document: dict[str, object] = {"ready": ready, "reason": reason}
            if self._details is not None:
                document.update(self._details())
            body = json.dumps(document).encode() + b"\n"
            return (200 if ready else 503), body, "application/json"
        return 404, b"not found\n", "text/plain; charset=utf-8"

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, *, head_only: bool
    ) -> None:
        header = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        writer.write(header if head_only else header + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()


# ----------------------------------------------------------------------------------------------------------
# Config file watching
# ----------------------------------------------------------------------------------------------------------


def file_fingerprint(path: Path) -> str | None:
    """A content hash of `path`, or None when it cannot be read (a reload then reports the error).

    Content, not mtime alone: editors and Kubernetes ConfigMap updates (a symlink swap) change mtimes without
    changing content, and a reload that changes nothing should not be logged as one.
    """
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _stat_key(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a ConfigMap's ..data swap shows as a new inode
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


# ----------------------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------------------


def install_signal_handlers(
    loop: asyncio.AbstractEventLoop, on_stop: Callable[[str], None], on_reload: Callable[[], None]
) -> Callable[[], None]:
    """Route SIGTERM/SIGINT to `on_stop` and SIGHUP to `on_reload`.

    Returns:
        A function that removes the handlers again.
    """
    installed: list[int] = []
    for signum, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
        loop.add_signal_handler(signum, on_stop, name)
        installed.append(signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    installed.append(signal.SIGHUP)

    def remove() -> None:
        for signum in installed:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)

    return remove


# ----------------------------------------------------------------------------------------------------------
# The process
# ----------------------------------------------------------------------------------------------------------


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
#: source renews at half-life (SPIRE's agent too; cert-manager's csi-driver-spiffe at two thirds), so an SVID
#: this old means its upstream has not delivered for at least a quarter of the SVID's lifetime: time to route
#: callers elsewhere before the certificate expires under them.
READY_MIN_LIFETIME_LEFT = 0.25
#: On SIGTERM/SIGINT the process exits within `server.drain_grace` plus this, in every state.
STOP_MARGIN = 5.0


@dataclass(slots=True)
class _Listener:
    """One bound listening address, for logs, readiness and cleanup."""

    name: str  # "grpc", "workload_api", "check", "http"
    address: str  # as configured
    bound: str  # as bound (the real port when the config said 0)
    claim: UnixSocketClaim | None = None
    front: PeerCredFront | None = None  # the peer-credentials front of a unix listener


class Server:
    """Everything one `svidgate serve` runs, with start, drain and reload.

    Args:
        config: the validated configuration.
        config_path: the file it came from (None: the embedded default; SIGHUP then has nothing to re-read).
        registry: the Prometheus registry `/metrics` serves (tests inject a fresh one).
        clock: epoch seconds for the source, the CA and the metrics.
        settings: process knobs; the config's ``server:`` section by default.
    """

    def __init__(
        self,
        config: Config,
        config_path: Path | None,
        *,
        registry: CollectorRegistry | None = None,
        clock: Clock = system_clock,
        settings: ServerConfig | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.settings = settings if settings is not None else config.server
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.metrics = Metrics(self.registry, clock=clock)
        self._clock = clock
        self._drain = asyncio.Event()
        self._claims: dict[str, UnixSocketClaim] = {}
        self._state_lock = StateDirLock(config.state_dir)
        self._drain_interceptor = DrainInterceptor(self._drain)
        self._stop_requested = asyncio.Event()
        self._stop_reason = ""
        self._stopped = asyncio.Event()
        self._listeners: list[_Listener] = []
        self._grpc_servers: list[grpc.aio.Server] = []
        self._sync_servers: list[grpc.Server] = []
        self._health: list[health_async.HealthServicer] = []
        self._sync_health: list[health_sync.HealthServicer] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._http: HttpEndpoint | None = None
        self._bundle_endpoint: BundleEndpointServer | None = None
        self._inner: Path | None = None
        self._listening = False
        self._reload_lock = asyncio.Lock()
        self._config_fingerprint = file_fingerprint(config_path) if config_path is not None else None
        self.source: IdentitySource | None = None
        self.services: Services | None = None
        # Computed at scrape time: readiness also turns false as time passes (SVIDs running low).
        self.metrics.ready.set_function(lambda: 1.0 if self.readiness()[0] else 0.0)
        self.metrics.watch_sources(self.source_statuses)

    # -- state for probes and tests -------------------------------------------------------------------------

    @property
    def listeners(self) -> tuple[tuple[str, str], ...]:
        """``(name, bound address)`` of every listener, e.g. ``("grpc", "tcp://127.0.0.1:40123")``."""
        return tuple((listener.name, listener.bound) for listener in self._listeners)

    def bound(self, name: str) -> list[str]:
        """Bound addresses of listeners named `name` (``grpc``, ``workload_api``, ``check``, ``http``)."""
        return [listener.bound for listener in self._listeners if listener.name == name]

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    @property
    def bundle_endpoint_port(self) -> int | None:
        return self._bundle_endpoint.port if self._bundle_endpoint is not None else None

    def source_statuses(self) -> list[SourceStatus]:
        """The health of every upstream: the own source, then each federated trust domain (none yet: [])."""
        return list(self.source.statuses()) if self.source is not None else []

    def readiness(self) -> tuple[bool, str]:
        """``/readyz``: ready when the own identity is loaded and fresh and every listener is bound.

        Not ready while draining, before the listeners are bound, before the own trust domain's bundle and
        (with workloads configured) an X.509-SVID are loaded, and whenever a served X.509-SVID has less than
        `READY_MIN_LIFETIME_LEFT` of its lifetime left (its source has stopped renewing it). A federated trust
        domain without a bundle is reported in the reason but keeps the node ready.

        Returns:
            ``(ready, reason)``; the reason names what is missing.
        """
        if self._drain.is_set():
            return False, "draining"
        if not self._listening:
            return False, "listeners not bound"
        if self.source is None:
            return False, "identity source not loaded"
        snapshot = self.source.feed.current()
        if self.config.trust_domain not in snapshot.bundles:
            return False, f"no bundle for the own trust domain {self.config.trust_domain} yet"
        if any(not w.templated for w in self.config.workloads) and not snapshot.svids:
            return False, "no X.509-SVID loaded yet"
        stale = self._stale_svid(snapshot)
        if stale is not None:
            return False, stale
        # A federated trust domain whose endpoint is down does not make this node useless for its own
        # workloads, so it is reported but does not hold readiness (a DaemonSet rollout would stall on it).
        missing = sorted(str(td) for td in self.config.federation if td not in snapshot.bundles)
        if missing:
            return True, "ok; no bundle yet for federated trust domain(s) " + ", ".join(missing)
        return True, "ok"

    def _stale_svid(self, snapshot: IdentitySnapshot) -> str | None:
        now = self._clock()
        for spiffe_id, svid in snapshot.svids.items():
            lifetime = svid.expires_at - svid.leaf.not_valid_before_utc.timestamp()
            left = svid.expires_at - now
            if left >= lifetime * READY_MIN_LIFETIME_LEFT:
                continue
            when = "has expired" if left <= 0 else f"expires in {left:.0f}s"
            own = self.source_statuses()[:1]
            upstream = ""
            if own:
                state = "up" if own[0].up else f"down: {own[0].error}"
                upstream = f"; source {own[0].source} is {state}"
            return (
                f"X.509-SVID {spiffe_id} {when} (less than {READY_MIN_LIFETIME_LEFT:.0%} of its lifetime "
                f"left) and has not been renewed{upstream}"
            )
        return None

    def readiness_details(self) -> dict[str, object]:
        """The ``sources`` field of ``/readyz``: every upstream's health (federation per trust domain)."""
        return {
            "sources": [
                {
                    "source": status.source,
                    "trust_domain": status.trust_domain,
                    "up": status.up,
                    "last_success": status.last_success,
                    **({"error": status.error} if status.error else {}),
                }
                for status in self.source_statuses()
            ]
        }

    # -- start ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the identity source, start every listener, and begin serving.

        Raises:
            SvidgateError: the source cannot load (CA state, SPIRE agent, files) or a listener cannot bind;
                everything started so far is stopped again.
        """
        log.info(
            "server.starting",
            extra={
                "fields": {
                    "version": __version__,
                    "config": str(self.config_path) if self.config_path is not None else "<embedded default>",
                    "summary": self.config.summary(),
                }
            },
        )
        for warning in self.config.warnings():
            log.warning("config.warning", extra={"fields": {"warning": warning}})
        try:
            # Lock state_dir and claim every unix socket and TCP address before anything else exists: a second
            # instance is refused before it loads a CA or creates a gRPC server (half-built grpc.aio objects
            # are fragile to tear down).
            self._state_lock.acquire()
            self._claim_unix_sockets()
            self._check_tcp_addresses()
            self.source = await build_source(self.config, self._clock, self.metrics.bundle_update_rejected)
            self.metrics.watch_feed(self.source.feed)
            self._spawn(self._run_source(self.source), "source")
            self._spawn(self._watch_snapshots(self.source), "snapshot-metrics")
            self.services = build_services(self.config, self.source, self.metrics, self._clock)
            await self._start_grpc()
            await self._start_http()
            await self._start_bundle_endpoint()
        except BaseException:
            await self._shutdown(grace=0.0)
            raise
        self._listening = True
        if self.config_path is not None and self.settings.config_poll_interval > 0:
            self._spawn(self._watch_config_file(self.config_path), "config-watch")
        ready, reason = self.readiness()
        self.metrics.config_last_reload_success.set(self._clock())
        log.info(
            "server.started",
            extra={
                "fields": {
                    "listeners": [f"{n} {b}" for n, b in self.listeners],
                    "ready": ready,
                    "reason": reason,
                }
            },
        )

    async def start_unless_stopped(self) -> bool:
        """`start()`, abandoned when a stop is requested meanwhile (SIGTERM must not wait for start-up: a
        SPIRE source waits up to 30 s for an absent agent). What was started is stopped again.

        Returns:
            True once started; False when a stop request ended start-up (logged as ``server.stopped``).

        Raises:
            SvidgateError: as `start()`.
        """
        starting = asyncio.ensure_future(self.start())
        stopping = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            starting.cancel()
            raise
        finally:
            stopping.cancel()
        if starting.done():
            starting.result()  # start-up errors propagate
            return True
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        log.info("server.stopped", extra={"fields": {"reason": self._stop_reason, "during": "start-up"}})
        return False

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"svidgate-{name}")
        self._tasks.append(task)

    async def _run_source(self, source: IdentitySource) -> None:
        # A source's run() only returns by cancellation; if it raises, identity stops rotating, which would
        # silently expire every SVID. Log loudly, count it, and restart the loop after a pause.
        while True:
            try:
                await source.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.source_errors.labels(source=self.config.source.kind).inc()
                log.error(
                    "source.loop_failed",
                    extra={
                        "fields": {"source": self.config.source.kind, "error": f"{type(exc).__name__}: {exc}"}
                    },
                    exc_info=not isinstance(exc, SvidgateError),
                )
                await asyncio.sleep(5.0)

    async def _watch_snapshots(self, source: IdentitySource) -> None:
        version = source.feed.current().version
        while True:
            snapshot = await source.feed.wait_newer(version)
            version = snapshot.version
            self.metrics.observe_snapshot(snapshot)

    async def _start_grpc(self) -> None:
        services = self.services
        assert services is not None
        listen = self.config.listen
        if listen.check is not None:
            # The threaded server: measured faster than grpc.aio for unary calls (~136 vs ~309 us of server
            # CPU per empty RPC here), and Check is the per-request hot path.
            check_server = grpc.server(
                ThreadPoolExecutor(
                    max_workers=self.settings.check_workers, thread_name_prefix="svidgate-check"
                ),
                options=grpc_server_options(),
            )
            self._sync_servers.append(check_server)
            check_names = services.register(check_server, "check")
            health = health_sync.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health, check_server)
            for name in ["", *check_names]:
                health.set(name, health_pb2.HealthCheckResponse.SERVING)
            self._sync_health.append(health)
            if self.settings.reflection:
                reflection.enable_server_reflection(
                    [*check_names, HEALTH_SERVICE, reflection.SERVICE_NAME], check_server
                )
            await self._bind(check_server, "check", listen.check, services.peers)
            check_server.start()

        if listen.grpc:
            main_server = self._new_grpc_server()
            main_names = services.register(main_server, "grpc")
            await self._add_health_and_reflection(main_server, main_names)
            for address in listen.grpc:
                await self._bind(main_server, "grpc", address, services.peers)
            await main_server.start()

        if listen.workload_api is not None:
            # Its own server: Workload API callers are identified by peer credentials on this socket alone.
            wl_server = self._new_grpc_server()
            wl_names = services.register(wl_server, "workload_api")
            await self._add_health_and_reflection(wl_server, wl_names)
            await self._bind(wl_server, "workload_api", listen.workload_api, services.peers)
            await wl_server.start()

    def _new_grpc_server(self) -> grpc.aio.Server:
        server = grpc.aio.server(
            interceptors=[self.metrics.interceptor(), self._drain_interceptor],
            options=grpc_server_options(),
        )
        self._grpc_servers.append(server)
        return server

    async def _add_health_and_reflection(self, server: grpc.aio.Server, service_names: list[str]) -> None:
        health = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        # "" is the whole server (what grpc_health_probe asks by default); then one entry per service.
        for name in ["", *service_names]:
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._health.append(health)
        if self.settings.reflection:
            reflection.enable_server_reflection(
                [*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME], server
            )

    def _claim_unix_sockets(self) -> None:
        listen = self.config.listen
        for address in (*listen.grpc, listen.workload_api, listen.check):
            if address is not None and address.kind == "unix":
                claim = UnixSocketClaim(Path(address.path), self.settings.socket_mode)
                claim.claim()
                self._claims[address.path] = claim
        if not self._claims:
            return
        # A kill -9 leaves the previous instance's inner-socket directory behind. Each socket lock records the
        # directory of its holder; holding the lock now, that holder is dead, so its directory can go.
        leftovers = {claim.recorded_inner_dir() for claim in self._claims.values()}
        for leftover in sorted(p for p in leftovers if p is not None):
            remove_stale_inner_dir(leftover)
        inner = self._inner_dir()
        for claim in self._claims.values():
            claim.record_inner_dir(inner)

    def _check_tcp_addresses(self) -> None:
        listen = self.config.listen
        named = [("check", listen.check), *(("grpc", address) for address in listen.grpc)]
        if listen.http is not None:
            named.append(("http", Address("tcp", host=listen.http[0], port=listen.http[1])))
        for name, address in named:
            if address is not None and address.kind == "tcp":
                ensure_tcp_address_free(name, address)

    async def _bind(
        self, server: grpc.aio.Server | grpc.Server, name: str, address: Address, peers: PeerRegistry
    ) -> None:
        if address.kind == "tcp":
            try:
                port = server.add_insecure_port(address.grpc_target())
            except RuntimeError as exc:
                raise ListenerError(f"listen.{name} {address}: cannot bind: {exc}") from None
            if port == 0:
                raise ListenerError(f"listen.{name} {address}: cannot bind (address in use?)")
            bound = str(Address(kind="tcp", host=address.host, port=port))
            self._listeners.append(_Listener(name, str(address), bound))
            log.info("grpc.listening", extra={"fields": {"listener": name, "address": bound}})
            return
        claim = self._claims.pop(address.path)
        listener = _Listener(name, str(address), str(address), claim=claim)
        self._listeners.append(listener)
        # grpcio cannot read SO_PEERCRED: the front accepts on the public path, reads the peer's credentials
        # and pipes the connection to the gRPC server's inner socket, in a directory only svidgate can enter.
        inner = str(self._inner_dir() / f"{name}-{len(self._listeners)}.sock")
        try:
            port = server.add_insecure_port(f"unix:{inner}")
        except RuntimeError as exc:
            raise ListenerError(
                f"listen.{name} {address}: cannot bind the inner socket {inner}: {exc}"
            ) from None
        if port == 0:
            raise ListenerError(f"listen.{name} {address}: cannot bind the inner socket {inner}")
        front = PeerCredFront(
            Path(address.path),
            inner,
            peers,
            mode=self.settings.socket_mode,
            attest=self.services.attest if self.services is not None else None,
        )
        try:
            await front.start()
        except SvidgateError as exc:
            raise ListenerError(f"listen.{name} {address}: {exc}") from None
        listener.front = front
        claim.bound()
        log.info(
            "grpc.listening",
            extra={
                "fields": {
                    "listener": name,
                    "address": str(address),
                    "mode": f"{self.settings.socket_mode:04o}",
                }
            },
        )

    def _inner_dir(self) -> Path:
        if self._inner is None:
            self._inner = make_inner_dir()
        return self._inner

    async def _start_http(self) -> None:
        if self.config.listen.http is None:
            return
        host, port = self.config.listen.http
        self._http = HttpEndpoint(host, port, self.registry, self.readiness, self.readiness_details)
        bound = await self._http.start()
        address = f"{_bracket_host(host)}:{bound}"
        self._listeners.append(_Listener("http", f"{_bracket_host(host)}:{port}", address))
        log.info("http.listening", extra={"fields": {"address": address, "port": bound}})

    async def _start_bundle_endpoint(self) -> None:
        listen = self.config.listen.bundle_endpoint
        if listen is None:
            return
        assert self.source is not None
        host, port = listen
        self._bundle_endpoint = BundleEndpointServer(
            host,
            port,
            self.config.bundle_endpoint,
            self.config.trust_domain,
            self.source.feed,
            BundleSequence.in_state_dir(self.config.state_dir),
            poll_interval=self.config.source.poll_interval,
            on_request=self._count_bundle_endpoint_request,
        )
        try:
            bound = await self._bundle_endpoint.start()
        except OSError as exc:
            raise ListenerError(
                f"listen.bundle_endpoint {_bracket_host(host)}:{port}: cannot bind: {exc.strerror or exc}"
            ) from None
        address = f"{_bracket_host(host)}:{bound}"
        self._listeners.append(_Listener("bundle_endpoint", f"{_bracket_host(host)}:{port}", address))
        log.info(
            "bundle_endpoint.listening",
            extra={"fields": {"address": address, "profile": self.config.bundle_endpoint.profile}},
        )

    def _count_bundle_endpoint_request(self, document: str, status: int) -> None:
        self.metrics.bundle_endpoint_requests.labels(document=document, code=str(status)).inc()

    # -- drain and stop -------------------------------------------------------------------------------------

    def request_stop(self, reason: str = "requested") -> None:
        """Begin draining (signal handlers call this). A second request during the drain stops at once."""
        if self._stop_requested.is_set():
            log.warning("server.forced_stop", extra={"fields": {"signal": reason}})
            for server in self._grpc_servers:
                self._spawn(server.stop(0), "forced-stop")
            for sync_server in self._sync_servers:
                sync_server.stop(0)
            return
        self._stop_reason = reason
        self._stop_requested.set()

    async def wait(self) -> int:
        """Serve until `request_stop`, then drain. Returns the exit code (0)."""
        await self._stop_requested.wait()
        await self.stop(self._stop_reason)
        return 0

    async def stop(self, reason: str = "requested") -> None:
        """Drain and stop: no new connections or calls, streams ended with OK, in-flight calls answered.

        Args:
            reason: why (a signal name), for the log.
        """
        if self._drain.is_set():
            await self._stopped.wait()
            return
        grace = self.settings.drain_grace
        started = asyncio.get_running_loop().time()
        log.info("server.draining", extra={"fields": {"reason": reason, "grace_seconds": grace}})
        self._stop_requested.set()
        # Readiness first, so that probes stop routing here before anything closes.
        self._drain.set()
        for health in self._health:
            with contextlib.suppress(Exception):
                await health.enter_graceful_shutdown()
        for sync_health in self._sync_health:
            with contextlib.suppress(Exception):
                sync_health.enter_graceful_shutdown()
        # Stop the gRPC servers only once the streams have ended: `server.stop()` cancels every call whose
        # status is still queued, and through the peer-credential front the client then sees UNAVAILABLE
        # ("Cancelling all calls") instead of the clean OK that lets Envoy reconnect quietly.
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain_interceptor.wait_idle(), grace)
        await self._shutdown(max(grace - (loop.time() - started), 0.0))
        log.info(
            "server.stopped",
            extra={
                "fields": {
                    "reason": reason,
                    "drain_seconds": round(asyncio.get_running_loop().time() - started, 3),
                }
            },
        )

    async def _shutdown(self, grace: float) -> None:
        # grpc.aio stop(grace): refuses new calls at once, lets running ones finish for `grace`, then cancels.
        # Streams were ended by DrainInterceptor already; what remains are unary calls (Check) in flight.
        loop = asyncio.get_running_loop()
        stops: list[Awaitable[Any]] = [server.stop(grace) for server in self._grpc_servers]
        stops += [loop.run_in_executor(None, _wait_sync_stop, server, grace) for server in self._sync_servers]
        if stops:
            results = await asyncio.gather(*stops, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    log.warning("grpc.stop_failed", extra={"fields": {"error": repr(result)}})
        for listener in self._listeners:
            if listener.front is not None:
                with contextlib.suppress(Exception):
                    await listener.front.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if self._http is not None:
            self._http.alive = False
            await self._http.stop()
        if self._bundle_endpoint is not None:
            await self._bundle_endpoint.stop()
            self._bundle_endpoint = None
        for listener in self._listeners:
            if listener.claim is not None:
                listener.claim.release()
        for claim in self._claims.values():
            claim.release()
        self._claims.clear()
        if self._inner is not None:
            shutil.rmtree(self._inner, ignore_errors=True)
            self._inner = None
        self._state_lock.release()
        self._listening = False
        self._stopped.set()

    # -- reload ---------------------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Re-read the config file soon (SIGHUP)."""
        self._spawn(self.reload("SIGHUP"), "reload")

    async def reload(self, trigger: str = "requested") -> bool:
        """Re-read, validate and apply the config file; keep the configuration in force on any error.

        What can change live: ``authz`` (policies swapped atomically), ``workloads`` (entitlements of SDS,
        Workload API and token injection), ``federation`` (a removed trust domain leaves the snapshot at
        once, a new one is fetched at once), ``kubernetes`` (for connections attested after the reload),
        ``log``. A change under `RESTART_REQUIRED_KEYS` is kept for the next start and named in one warning
        line. Never raises (except cancellation): whatever goes wrong -- bad YAML, a bug -- is logged and
        counted as ``rejected``, and the last good configuration stays.

        Args:
            trigger: ``SIGHUP``, ``file_change`` or ``requested`` (for the log line).

        Returns:
            True when a new configuration was applied.
        """
        async with self._reload_lock:
            path = self.config_path
            if path is None:
                log.warning(
                    "config.reload_skipped",
                    extra={
                        "fields": {"trigger": trigger, "reason": "running on the embedded default; no file"}
                    },
                )
                return False
            if self.services is None or self.source is None:
                return False
            try:
                return self._reload_from(path, trigger)
            except Exception as exc:  # one bad reload must never end reloading for good
                self._reject_reload(path, trigger, exc)
                return False

    def _reload_from(self, path: Path, trigger: str) -> bool:
        assert self.services is not None
        self._config_fingerprint = file_fingerprint(path)
        new = load_config(path)
        plan = self.services.prepare_reload(new)
        if new == self.config:
            self.metrics.config_reloads.labels(result="unchanged").inc()
            log.info("config.reload_unchanged", extra={"fields": {"trigger": trigger, "path": str(path)}})
            return False
        restart_required = restart_required_changes(self.config, new)
        plan()
        if new.log != self.config.log:
            configure_logging(new.log.format, new.log.level)
        kept = {key: getattr(self.config, key) for key in RESTART_REQUIRED_KEYS}
        self.config = dataclasses.replace(new, **kept)
        self.metrics.config_last_reload_success.set(self._clock())
        fields: dict[str, object] = {"trigger": trigger, "path": str(path), "summary": self.config.summary()}
        if not restart_required:
            self.metrics.config_reloads.labels(result="applied").inc()
            log.info("config.reloaded", extra={"fields": fields})
            return True
        self.metrics.config_reloads.labels(result="restart_required").inc()
        log.warning(
            "config.reload_partial",
            extra={
                "fields": {
                    **fields,
                    "restart_required": list(restart_required),
                    "reason": "these keys take effect on the next start; everything else was applied",
                }
            },
        )
        return True

    def _reject_reload(self, path: Path, trigger: str, exc: Exception) -> None:
        self.metrics.config_reloads.labels(result="rejected").inc()
        error = str(exc) if isinstance(exc, SvidgateError) else f"{type(exc).__name__}: {exc}"
        log.error(
            "config.reload_rejected",
            extra={
                "fields": {
                    "trigger": trigger,
                    "path": str(path),
                    "error": error,
                    "kept": "the last good configuration stays in force",
                }
            },
            # Bad input is one line; anything else is a bug, and its traceback is what fixes it.
            exc_info=not isinstance(exc, SvidgateError),
        )

    async def _watch_config_file(self, path: Path) -> None:
        # Polling, not inotify: it works on every filesystem and with Kubernetes ConfigMap symlink swaps, and
        # a stat every few seconds costs nothing. The first look compares contents with what was loaded: the
        # file may have changed between the start and this task's first step.
        last: tuple[int, int, int, int] | None = None
        while True:
            await asyncio.sleep(self.settings.config_poll_interval)
            try:
                key = _stat_key(path)
                if key == last:
                    continue
                last = key
                fingerprint = file_fingerprint(path)
                if fingerprint is None or fingerprint == self._config_fingerprint:
                    continue
                await self.reload("file_change")
            except Exception as exc:  # the watcher outlives any one failed look at the file
                log.error(
                    "config.watch_failed",
                    extra={"fields": {"path": str(path), "error": f"{type(exc).__name__}: {exc}"}},
                    exc_info=True,
                )


def _wait_sync_stop(server: grpc.Server, grace: float) -> None:
    server.stop(grace).wait(grace + 1.0)


def _bracket_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# ----------------------------------------------------------------------------------------------------------
# Wiring: one function per service
# ----------------------------------------------------------------------------------------------------------


async def build_source(
    config: Config, clock: Clock, on_bundle_rejected: BundleRejectionSink | None = None
) -> IdentitySource:
    """The identity source `config.source.kind` names, its first snapshot published.

    Args:
        config: the configuration.
        clock: the time source.
        on_bundle_rejected: told of every rejected bundle update (`Metrics.bundle_update_rejected`).

    Raises:
        SvidgateError: the source cannot produce its first snapshot (CA state, files, SPIRE agent).
    """
    if config.source.kind == "spire":
        return await build_spire_source(config, clock, on_bundle_rejected)
    return create_source(config, clock, on_bundle_rejected)


async def build_spire_source(
    config: Config, clock: Clock, on_bundle_rejected: BundleRejectionSink | None = None
) -> SpireSource:
    """The SPIRE agent source (a Workload API client), for ``source.kind: spire``.

    Waits for the agent's first X.509-SVIDs (retrying with backoff) so that svidgate never serves an empty
    identity; a SPIRE agent provides federated bundles itself, so ``federation`` is not consulted.
    """
    endpoint = config.source.spire_socket
    if endpoint is None:  # the config loader guarantees it; keep mypy and a future refactor honest
        raise SourceError("source.spire_socket: required with kind: spire")
    return await SpireSource.connect(
        endpoint, clock=clock, trust_domain=config.trust_domain, on_bundle_rejected=on_bundle_rejected
    )


class Services:
    """The gRPC services of one process and what a reload swaps in them.

    Args:
        config: the configuration at start.
        source: the identity source (its feed and JWT minting).
        metrics: the process's metrics.
        clock: the time source.
    """

    def __init__(self, config: Config, source: IdentitySource, metrics: Metrics, clock: Clock) -> None:
        self.source = source
        self._metrics = metrics
        self.peers = PeerRegistry()
        self._kubernetes: KubernetesConfig | None = None
        self._attestor: KubernetesAttestor | None = None
        self._set_kubernetes(config)
        # Only the built-in CA can mint an SVID per pod (config refuses templates with other sources).
        templated: TemplatedSvids | None = source if isinstance(source, BuiltinSource) else None
        self.policies = PolicyHolder(config.authz)
        self.injector = TokenInjector(source.mint_jwt_svid, config.workloads, clock)
        self.authz = AuthorizationServicer(
            source.feed,
            self.policies,
            metrics,
            clock,
            injector=self.injector,
            peers=self.peers.lookup,
            refresh_bundle=getattr(source, "request_bundle_refresh", None),
        )
        self.sds = build_sds(config, source, self.peers, metrics, clock, templated)
        # The SPIRE source mints over gRPC: the Workload API servicer awaits its async variant so that a cache
        # miss never blocks the event loop.
        mint: MintJwtSvid = source.fetch_jwt_svid if isinstance(source, SpireSource) else source.mint_jwt_svid
        self.workload_api = WorkloadApiServicer(
            source.feed,
            config.workloads,
            self.peers,
            mint,
            metrics,
            clock,
            leeway=config.authz.leeway,
            templated=templated,
        )

    async def attest(self, caller: CallerInfo) -> CallerInfo:
        """Kubernetes attestation of a unix-socket caller, when a workload has a `k8s:` selector (the
        peercred fronts run this on every connection)."""
        attestor = self._attestor
        return caller if attestor is None else await attestor.attest(caller)

    def _set_kubernetes(self, config: Config) -> None:
        wanted = config.kubernetes if config.attests_kubernetes else None
        if wanted != self._kubernetes or (wanted is not None and self._attestor is None):
            self._kubernetes = wanted
            self._attestor = None if wanted is None else KubernetesAttestor(wanted, self._metrics)

    def register(self, server: grpc.aio.Server | grpc.Server, listener: str) -> list[str]:
        """Put the services of one listener on its gRPC server: Check on every one, then its own.

        This is the only place services are registered, so no listener (and no combination of listeners)
        can lack Check: an Envoy pointed with ``failure_mode_allow: true`` at a listener that answered
        UNIMPLEMENTED would let every request through, unlogged and uncounted. Every listener answers with
        the one `AuthorizationServicer` (same policies, cache, metrics and decision log). On the Workload API
        socket Check also requires the Workload Endpoint's security header, as every call there must carry
        (SPIFFE_Workload_Endpoint.md 3); without it the answer is a denial, never an RPC error.

        Args:
            server: a grpc.aio server, or the threaded server of ``listen.check``.
            listener: ``check``, ``grpc`` (adds SDS) or ``workload_api`` (adds the SPIFFE Workload API).

        Returns:
            The full names of the services added (for health and reflection).
        """
        if not isinstance(server, grpc.aio.Server):
            if listener != "check":  # SDS and the Workload API stream: they run on grpc.aio only
                raise ValueError(f"listener {listener!r} needs a grpc.aio server")
            self.authz.add_to_sync_server(server)
            return [AUTHZ_SERVICE]
        header = SECURITY_HEADER if listener == "workload_api" else None
        self.authz.add_to_server(server, required_metadata=header)
        if listener == "grpc":
            self.sds.add_to_server(server)
            return [AUTHZ_SERVICE, SDS_SERVICE]
        if listener == "workload_api":
            self.workload_api.add_to_server(server)
            return [AUTHZ_SERVICE, WORKLOAD_API_SERVICE]
        if listener == "check":
            return [AUTHZ_SERVICE]
        raise ValueError(f"unknown gRPC listener {listener!r}")

    def prepare_reload(self, new: Config) -> Callable[[], None]:
        """Validate what a reload would apply; return the function that applies it.

        Everything that can fail runs here, before anything is swapped, so a reload is all or nothing.

        Raises:
            ConfigError: the new configuration cannot be applied (the old one stays).
        """
        compile_authz(new.authz)  # raises ConfigError: nothing swapped yet
        workloads = new.workloads
        federation = new.federation

        def apply() -> None:
            set_source_workloads = getattr(self.source, "set_workloads", None)
            if set_source_workloads is not None:  # the built-in CA mints for new IDs; SPIRE decides itself
                set_source_workloads(workloads)
            set_federation = getattr(self.source, "set_federation", None)
            if set_federation is not None:  # a SPIRE agent delivers federated bundles itself
                set_federation(federation)
            self.policies.swap(new.authz)
            self.injector.swap_workloads(workloads)
            self.workload_api.set_workloads(workloads)
            self.sds.update_workloads(workloads)
            self._set_kubernetes(new)

        return apply


def build_services(config: Config, source: IdentitySource, metrics: Metrics, clock: Clock) -> Services:
    """Construct every service on top of `source`."""
    return Services(config, source, metrics, clock)


def build_sds(
    config: Config,
    source: IdentitySource,
    peers: PeerRegistry,
    metrics: Metrics,
    clock: Clock,
    templated: TemplatedSvids | None = None,
) -> SecretDiscoveryServicer:
    """The SDS servicer."""
    return SecretDiscoveryServicer(
        source.feed,
        config.workloads,
        config.sds,
        config.trust_domain,
        peers=peers,
        metrics=metrics,
        clock=clock,
        templated=templated,
    )


HEALTH_SERVICE = "grpc.health.v1.Health"
SDS_SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
WORKLOAD_API_SERVICE = "SpiffeWorkloadAPI"


# ----------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------


async def serve(
    config: Config,
    config_path: Path | None,
    *,
    registry: CollectorRegistry | None = None,
    install_signals: bool = True,
    on_started: Callable[[Server], None] | None = None,
    stop_watchdog: bool = False,
) -> int:
    """Run one svidgate process until SIGTERM/SIGINT, then drain.

    Args:
        config: the validated configuration.
        config_path: its file (None: the embedded default).
        registry: the Prometheus registry (a fresh one by default).
        install_signals: route SIGTERM/SIGINT/SIGHUP to the server (off when embedded in a test loop).
        on_started: called once everything listens (tests read the bound addresses from it).
        stop_watchdog: on the first stop signal, arm a watchdog that ends the whole process (exit 1) if it is
            still running `drain_grace` + `STOP_MARGIN` later. Only for a process of its own (`run()`).

    Returns:
        The exit code: 0 after a clean drain (or a stop requested during start-up).

    Raises:
        SvidgateError: the source cannot load or a listener cannot bind.
    """
    server = Server(config, config_path, registry=registry)
    remove: Callable[[], None] | None = None
    if install_signals:
        bound = server.settings.drain_grace + STOP_MARGIN

        def on_stop(reason: str) -> None:
            if stop_watchdog:
                _arm_stop_watchdog(bound)
            server.request_stop(reason)

        remove = install_signal_handlers(asyncio.get_running_loop(), on_stop, server.request_reload)
    try:
        if not await server.start_unless_stopped():
            return 0
        if on_started is not None:
            on_started(server)
        return await server.wait()
    finally:
        if remove is not None:
            remove()


_watchdog_armed = threading.Event()


def _arm_stop_watchdog(seconds: float) -> None:
    """End the process `seconds` from now unless it has exited by then (a backstop: no drain step is meant to
    take that long, but a thread stuck in the kernel -- a DNS lookup, a hung disk -- must not keep a process
    that was told to stop). Armed once."""
    if _watchdog_armed.is_set():
        return
    _watchdog_armed.set()

    def overrun() -> None:
        # The log line gets a second of its own: a handler lock held by a stuck thread must not keep us alive.
        reported = threading.Event()

        def report() -> None:
            log.error("server.stop_overrun", extra={"fields": {"bound_seconds": seconds}})
            reported.set()

        threading.Thread(target=report, daemon=True).start()
        reported.wait(1.0)
        os._exit(1)

    timer = threading.Timer(seconds, overrun)
    timer.daemon = True
    timer.start()


def run(config: Config, config_path: Path | None, *, stderr: TextIO | None = None) -> int:
    """`svidgate serve`: configure logging, serve until a signal, drain. Never raises.

    A failure (a `preflight` problem, a listener that cannot bind, a second instance, ...) is logged as
    ``server.failed`` and printed as one plain ``svidgate: error: ...`` line on `stderr`, for the operator
    who reads the terminal rather than the structured log.

    Args:
        config: the validated configuration.
        config_path: its file, re-read on SIGHUP (None: the embedded default).
        stderr: where the plain line goes (`sys.stderr` by default).

    Returns:
        The process exit code: 0 after a clean drain, 1 when serving failed.
    """
    configure_logging(config.log.format, config.log.level)
    err = stderr if stderr is not None else sys.stderr
    # Each SDS stream holds a few hundred small objects, so Python's default generation-0 threshold (700)
    # triggers hundreds of collections during a rotation fan-out: measured with bench/sds_streams.py, 10k
    # streams took 1.8-2.8 s to receive a rotation with the default and ~0.84 s with this threshold.
    gc.set_threshold(50_000, 10, 10)
    try:
        # The same checks `check-config` makes, before anything is bound: a config it accepts starts here.
        preflight(config, str(config_path) if config_path is not None else None)
        return asyncio.run(serve(config, config_path, stop_watchdog=True))
    except SvidgateError as exc:
        log.error("server.failed", extra={"fields": {"error": str(exc)}})
        # One plain line besides the structured log: what a person starting `svidgate serve` reads first.
        err.write(f"svidgate: error: {exc}\n")
        return 1
    except KeyboardInterrupt:  # only before the handlers are installed
        return 130
    except Exception as exc:  # a bug: its traceback goes to the log, one line to the operator
        log.error("server.failed", extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}}, exc_info=True)
        err.write(
            f"svidgate: error: unexpected {type(exc).__name__}: {exc} (see the server.failed log line)\n"
        )
        return 1
