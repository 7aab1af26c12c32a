"""Check worker processes (`server.check_processes`): ext_authz Check on every core.

Check is CPU-bound Python, so one process answers about one core's worth of Checks (the GIL). With
`server.check_processes: N` (N > 1) the main process starts N worker processes that each serve Check on
`listen.check` (TCP) with its own threaded gRPC server, all bound to the one port with SO_REUSEPORT, so the
kernel spreads connections over them. Only that port is shared: every other listener stays exclusive
(`grpc_server_options(share_port=)`), and the main process reserves the port first (a bound socket that never
listens), so that port 0 resolves once and no other program can take the port between two workers' binds.

The channel. Each worker holds one end of a private socketpair (its fd is inherited, nothing on disk).
Messages are length-prefixed pickles, in both directions, between processes of this one program:

- main -> worker: ``("authz", generation, AuthzConfig)`` on start and on every reload;
  ``("bundles", generation, {trust_domain: SPIFFE bundle JSON})`` on start and on every snapshot whose bundles
  changed (rotation, federation, a removed key). Bundles travel as the SPIFFE bundle format because key
  objects do not pickle; the worker parses them with the same strict parser as a bundle file.
- main -> worker: ``("report", generation, None)`` at every scrape of /metrics.
- worker -> main: ``("applied", kind, generation)`` once a message is in force (tests and the reload path wait
  on it; ``serving`` once its port is bound), and ``("metrics", samples)`` when asked and every
  `METRICS_INTERVAL` seconds: the worker's cumulative Check counters and histogram, which the main process
  adds to its own series at scrape time (`MergedRegistry`), so one /metrics counts every process.

Fail closed: a worker starts with no policy (``authz.default: deny``) and no bundles, so until its first
messages arrive every Check is a denial, never UNIMPLEMENTED and never an allow. Inject-mode policies are
refused with check_processes > 1 (the config loader says so): minting stays in the main process.

A worker that crashes takes the connections it had accepted, and those still in its accept queue, with it
(they are reset; Envoy sees an error for the Checks on them and reconnects); new connections go to the
others while it is restarted.

Lifetime: a worker dies with the main process (PR_SET_PDEATHSIG, and the channel's EOF as a second signal);
the main process restarts a worker that exits unasked (backoff from `RESTART_BACKOFF` up to `MAX_BACKOFF`,
reset after a worker has run `STABLE_AFTER` seconds) and sends it the current state at once.

Imports: config types, identity, extauthz, metrics. Never the server module (the server imports this one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import io
import logging
import os
import pickle  # a private socketpair between processes of this one program: no foreign input
import signal
import socket
import struct
import sys
import threading
import time
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from svidgate.config import Address, AuthzConfig
from svidgate.errors import SvidgateError
from svidgate.identity.bundle import Bundle, parse_spiffe_bundle, spiffe_bundle_json
from svidgate.identity.spiffe_id import TrustDomain

log = logging.getLogger(__name__)

#: Seconds between a worker's metric reports (the most a scrape lags behind a worker).
METRICS_INTERVAL = 1.0
#: First pause before restarting a worker that exited, doubled per quick failure up to `MAX_BACKOFF`.
RESTART_BACKOFF = 0.2
MAX_BACKOFF = 10.0
#: A worker that ran this long resets the backoff.
STABLE_AFTER = 30.0
#: The metric families a worker reports (what Check records); the rest of its registry stays empty.
WORKER_METRIC_PREFIXES = ("svidgate_authz_", "svidgate_grpc_server_")
_HEADER = struct.Struct("!I")
_MAX_MESSAGE = 64 * 2**20
_PR_SET_PDEATHSIG = 1


class CheckProcessError(SvidgateError):
    """A Check worker process could not be started, or the channel to it broke."""


# -- the channel ---------------------------------------------------------------------------------------------


def _frozen_mapping(items: dict[Any, Any]) -> Mapping[Any, Any]:
    return types.MappingProxyType(items)


class _Pickler(pickle.Pickler):
    # The frozen config holds read-only mappings (context_extensions), which pickle cannot name.
    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.MappingProxyType:
            return _frozen_mapping, (dict(obj),)
        return NotImplemented


def _encode(message: object) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    body = buffer.getvalue()
    return _HEADER.pack(len(body)) + body


def _read_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _receive(sock: socket.socket) -> Any:
    """The next message, or None at EOF (the other end is gone)."""
    header = _read_exact(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > _MAX_MESSAGE:
        raise CheckProcessError(f"channel message of {size} bytes (at most {_MAX_MESSAGE})")
    body = _read_exact(sock, size)
    return None if body is None else pickle.loads(body)  # noqa: S301 -- see the import


def bundles_message(bundles: Mapping[TrustDomain, Bundle]) -> dict[str, bytes]:
    """The bundles as the channel carries them: SPIFFE bundle JSON by trust domain name."""
    return {str(td): spiffe_bundle_json(bundle) for td, bundle in bundles.items()}


# -- metrics: the main process adds what the workers counted -------------------------------------------------


def _samples(registry: CollectorRegistry) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    samples = []
    for family in registry.collect():
        if not family.name.startswith(WORKER_METRIC_PREFIXES) or family.type == "gauge":
            continue  # gauges (cache entries) are per process; only counts add up
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            samples.append((sample.name, tuple(sorted(sample.labels.items())), float(sample.value)))
    return samples


@dataclass
class WorkerCounts:
    """Cumulative counts reported by the workers, summed; a restarted worker's last report is kept."""

    latest: dict[int, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = field(default_factory=dict)
    retired: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def report(self, slot: int, samples: Iterable[tuple[str, tuple[tuple[str, str], ...], float]]) -> None:
        self.latest[slot] = {(name, labels): value for name, labels, value in samples}

    def retire(self, slot: int) -> None:
        # A worker's counters restart from zero with its process: what it reported last stays counted.
        for key, value in self.latest.pop(slot, {}).items():
            self.retired[key] = self.retired.get(key, 0.0) + value

    def totals(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        totals = dict(self.retired)
        for counts in self.latest.values():
            for key, value in counts.items():
                totals[key] = totals.get(key, 0.0) + value
        return totals


class MergedRegistry(CollectorRegistry):
    """What /metrics exposes with Check workers: the main registry, with the workers' counts added to the
    matching samples (and samples only workers have appended to their family). The equivalent of
    prometheus_client's multiprocess mode for the few series workers record, without moving every metric of
    the main process to files."""

    def __init__(self, registry: CollectorRegistry, counts: WorkerCounts) -> None:
        super().__init__(auto_describe=False)
        self._registry = registry
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        extra = self._counts.totals()
        for family in self._registry.collect():
            if extra and family.name.startswith(WORKER_METRIC_PREFIXES) and family.type != "gauge":
                samples = []
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    added = extra.pop(key, 0.0)
                    samples.append(sample._replace(value=sample.value + added) if added else sample)
                prefix = family.name
                for (name, labels), value in list(extra.items()):
                    if name == prefix or name.startswith(prefix + "_"):
                        samples.append(Sample(name, dict(labels), value, None, None))
                        del extra[(name, labels)]
                family.samples = samples
            yield family


# -- the main process's side ---------------------------------------------------------------------------------


@dataclass
class _Slot:
    index: int
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    applied: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    backoff: float = RESTART_BACKOFF
    restarts: int = 0


class CheckProcesses:
    """Starts, feeds, restarts and stops the Check worker processes of one svidgate.

    Args:
        count: worker processes (`server.check_processes`).
        address: `listen.check` (TCP).
        threads: threads of each worker's gRPC server (`server.check_workers`).
        authz: the ``authz`` section in force.
        log_format: the main process's log format (workers log to the same stderr).
        log_level: the main process's log level.
        drain_grace: how long a worker answers its calls in flight after SIGTERM (`server.drain_grace`).
    """

    def __init__(
        self,
        count: int,
        address: Address,
        threads: int,
        authz: AuthzConfig,
        log_format: str,
        log_level: str,
        drain_grace: float = 5.0,
    ) -> None:
        if address.kind != "tcp":
            raise CheckProcessError(f"listen.check {address}: check_processes needs a tcp:// address")
        self.count = count
        self._address = address
        self._threads = threads
        self._log = (log_format, log_level)
        self._drain_grace = drain_grace
        self._authz = (1, authz)
        self._bundles: tuple[int, dict[str, bytes]] = (0, {})
        self._slots = [_Slot(i) for i in range(count)]
        self._tasks: list[asyncio.Task[None]] = []
        self._reservation: socket.socket | None = None
        self._changed = asyncio.Event()
        self._stopping = False
        self._report = 0
        self._slot_of_pid: dict[int, _Slot] = {}
        self.counts = WorkerCounts()
        self.port = 0

    # -- start and stop

    def reserve(self) -> str:
        """Bind (never listen on) the Check address with SO_REUSEPORT; returns the bound address.

        Port 0 resolves here, once; the workers bind the same concrete port. Holding the socket keeps any
        program that does not set SO_REUSEPORT off the port while workers come and go.
        """
        host = self._address.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, self._address.port))
        except OSError as exc:
            sock.close()
            raise CheckProcessError(f"listen.check {self._address}: cannot bind: {exc.strerror}") from None
        self._reservation = sock
        self.port = int(sock.getsockname()[1])
        return f"{host}:{self.port}" if family == socket.AF_INET else f"[{host}]:{self.port}"

    async def start(self, ready_timeout: float = 60.0) -> None:
        """Start every worker and wait until each serves with the current policy and bundles.

        Raises:
            CheckProcessError: a worker could not start or did not confirm its state in `ready_timeout`.
        """
        if self._reservation is None:
            self.reserve()
        for slot in self._slots:
            await self._spawn(slot)
            self._tasks.append(asyncio.create_task(self._supervise(slot), name=f"check-process-{slot.index}"))
        try:
            await asyncio.wait_for(self.wait_applied(self._authz[0], self._bundles[0]), ready_timeout)
        except TimeoutError:
            raise CheckProcessError(
                f"the Check worker processes did not confirm their policy within {ready_timeout:g} s"
            ) from None

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker (each answers its calls in flight for up to `grace`), SIGKILL what remains."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        procs = [slot.proc for slot in self._slots if slot.proc is not None and slot.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), grace + 1.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for slot in self._slots:
            if slot.writer is not None:
                slot.writer.close()
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None

    def serving(self) -> int:
        """How many workers run and have confirmed the current policy and bundles (for ``/readyz``)."""
        authz, bundles = self._authz[0], self._bundles[0]
        return sum(
            1
            for s in self._slots
            if s.proc is not None
            and s.proc.returncode is None
            and s.applied.get("authz", 0) >= authz
            and s.applied.get("bundles", 0) >= bundles
        )

    def pids(self) -> list[int]:
        """The process ids of the running workers (for tests and benchmarks)."""
        return [s.proc.pid for s in self._slots if s.proc is not None and s.proc.returncode is None]

    # -- state to the workers

    def publish_authz(self, authz: AuthzConfig) -> int:
        """Send a reloaded ``authz`` section to every worker; returns its generation (see `wait_applied`)."""
        generation = self._authz[0] + 1
        self._authz = (generation, authz)
        self._broadcast(("authz", generation, authz))
        return generation

    def publish_bundles(self, bundles: Mapping[TrustDomain, Bundle]) -> int:
        """Send the trust bundles (rotation, federation, a removed key) to every worker when they changed;
        returns the generation in force."""
        encoded = bundles_message(bundles)
        if encoded == self._bundles[1]:
            return self._bundles[0]
        generation = self._bundles[0] + 1
        self._bundles = (generation, encoded)
        self._broadcast(("bundles", generation, encoded))
        return generation

    async def confirm_authz(self, timeout: float = 10.0) -> None:
        """Wait until every worker has the last published ``authz`` section in force; a worker that has not
        confirmed it within `timeout` is logged (it keeps answering with the previous one until it does)."""
        try:
            await asyncio.wait_for(self.wait_applied(self._authz[0], 0), timeout)
        except TimeoutError:
            late = [s.index for s in self._slots if s.applied.get("authz", 0) < self._authz[0]]
            log.error(
                "check_process.reload_unconfirmed",
                extra={"fields": {"slots": late, "generation": self._authz[0], "waited_seconds": timeout}},
            )

    async def wait_applied(self, authz: int, bundles: int) -> None:
        """Return once every worker has confirmed authz generation `authz` and bundles generation `bundles`
        (or newer)."""
        while True:
            changed = self._changed
            if all(
                s.applied.get("authz", 0) >= authz and s.applied.get("bundles", 0) >= bundles
                for s in self._slots
            ):
                return
            await changed.wait()

    async def wait_exited(self, pid: int) -> None:
        """Return once the worker `pid` is known to have exited (its listening socket is closed then)."""
        while True:
            changed = self._changed
            if pid not in self.pids():
                return
            await changed.wait()

    async def wait_restarted(self, old_pid: int) -> int:
        """Return the pid of the worker that replaced `old_pid`, once it serves with the current state."""
        slot = self._slot_of_pid[old_pid]
        while True:
            changed = self._changed
            proc = slot.proc
            if (
                proc is not None
                and proc.pid != old_pid
                and slot.applied.get("authz", 0) >= self._authz[0]
                and slot.applied.get("bundles", 0) >= self._bundles[0]
            ):
                return proc.pid
            await changed.wait()

    async def refresh_counts(self, timeout: float = 1.0) -> None:
        """Ask every worker for its counts now and wait (at most `timeout`) for the answers, so that a scrape
        sees every Check answered before it. A worker that does not answer in time keeps its last report."""
        self._report += 1
        generation = self._report
        self._broadcast(("report", generation, None))

        async def answered() -> None:
            while True:
                changed = self._changed
                if all(s.applied.get("report", 0) >= generation for s in self._slots):
                    return
                await changed.wait()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(answered(), timeout)

    def _broadcast(self, message: object) -> None:
        data = _encode(message)
        for slot in self._slots:
            if slot.writer is not None and not slot.writer.is_closing():
                slot.writer.write(data)

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- one worker

    async def _spawn(self, slot: _Slot) -> None:
        parent, child = socket.socketpair()
        log_format, log_level = self._log
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "svidgate.runtime.checkprocs",
                "--channel-fd",
                str(child.fileno()),
                "--address",
                f"{self._address.host}:{self.port}",
                "--threads",
                str(self._threads),
                "--cache-size",
                str(self._authz[1].cache_size),
                "--log-format",
                log_format,
                "--log-level",
                log_level,
                "--parent-pid",
                str(os.getpid()),
                "--drain-grace",
                str(self._drain_grace),
                pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            parent.close()
            raise CheckProcessError(f"cannot start a Check worker process: {exc}") from None
        finally:
            child.close()
        slot.started_at = time.monotonic()
        slot.applied = {}
        self._slot_of_pid[slot.proc.pid] = slot
        reader, slot.writer = await asyncio.open_unix_connection(sock=parent)
        # Its state first: until these arrive the worker denies every Check.
        slot.writer.write(_encode(("authz", *self._authz)))
        slot.writer.write(_encode(("bundles", *self._bundles)))
        self._tasks = [task for task in self._tasks if not task.done()]  # a restarted worker's old channel
        listener = asyncio.create_task(self._listen(slot, reader), name=f"check-channel-{slot.index}")
        self._tasks.append(listener)
        log.info("check_process.started", extra={"fields": {"slot": slot.index, "pid": slot.proc.pid}})
        self._wake()

    async def _listen(self, slot: _Slot, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                message = pickle.loads(await reader.readexactly(size))  # noqa: S301 -- see the import
                if message[0] == "applied":
                    _, kind, generation = message
                    slot.applied[kind] = max(slot.applied.get(kind, 0), generation)
                    self._wake()
                elif message[0] == "metrics":
                    self.counts.report(slot.index, message[1])

    async def _supervise(self, slot: _Slot) -> None:
        while True:
            assert slot.proc is not None
            code = await slot.proc.wait()
            if self._stopping:
                return
            self._wake()
            self.counts.retire(slot.index)
            if slot.writer is not None:
                slot.writer.close()
            ran = time.monotonic() - slot.started_at
            if ran >= STABLE_AFTER:
                slot.backoff = RESTART_BACKOFF
            slot.restarts += 1
            log.warning(
                "check_process.exited",
                extra={
                    "fields": {
                        "slot": slot.index,
                        "pid": slot.proc.pid,
                        "code": code,
                        "ran_seconds": round(ran, 1),
                        "restart_in_seconds": slot.backoff,
                        "effect": "its connections are closed; Envoy reconnects to the other Check processes "
                        "(the port stays open) and this one is restarted",
                    }
                },
            )
            await asyncio.sleep(slot.backoff)
            slot.backoff = min(slot.backoff * 2, MAX_BACKOFF)
            try:
                await self._spawn(slot)
            except CheckProcessError as exc:
                log.error(
                    "check_process.restart_failed", extra={"fields": {"slot": slot.index, "error": str(exc)}}
                )
                await asyncio.sleep(slot.backoff)
                continue


# -- the worker process --------------------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the channel's EOF still ends the worker
    if os.getppid() != parent_pid:
        os._exit(0)  # the parent died before the prctl took effect


def worker_main(argv: list[str] | None = None) -> int:
    """A Check worker process (started by `CheckProcesses`, never by hand)."""
    parser = argparse.ArgumentParser(prog="svidgate-check-process")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--cache-size", type=int, required=True)
    parser.add_argument("--log-format", default="json")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--drain-grace", type=float, default=5.0)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)

    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from svidgate.extauthz.reload import PolicyHolder
    from svidgate.extauthz.servicer import AuthorizationServicer
    from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
    from svidgate.logs import configure_logging
    from svidgate.metrics import Metrics
    from svidgate.runtime.listeners import grpc_server_options

    configure_logging(args.log_format, args.log_level)
    channel = socket.socket(fileno=args.channel_fd)
    send_lock = threading.Lock()

    def send(message: object) -> None:
        with send_lock:
            channel.sendall(_encode(message))

    # Fail closed until the main process's state arrives: no policy and `default: deny`, no bundles.
    feed = SnapshotFeed(IdentitySnapshot())
    policies = PolicyHolder(AuthzConfig(cache_size=args.cache_size))
    registry = CollectorRegistry()
    metrics = Metrics(registry, process_metrics=False)
    servicer = AuthorizationServicer(feed, policies, metrics.authz)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=args.threads, thread_name_prefix="svidgate-check"),
        options=grpc_server_options(share_port=True),
    )
    servicer.add_to_sync_server(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        port = server.add_insecure_port(args.address)
    except RuntimeError as exc:
        port = 0
        log.error("check_process.bind_failed", extra={"fields": {"address": args.address, "error": str(exc)}})
    if port == 0:
        return 1
    server.start()
    send(("applied", "serving", 1))

    def stop(signum: int, _frame: object) -> None:
        # SIGTERM from the main process's drain: answer what is in flight, then go.
        grace = args.drain_grace
        threading.Thread(target=lambda: (server.stop(grace).wait(), os._exit(0)), daemon=True).start()

    signal.signal(signal.SIGTERM, stop)

    def report_metrics() -> None:
        while True:
            time.sleep(METRICS_INTERVAL)
            try:
                send(("metrics", _samples(registry)))
            except OSError:
                os._exit(0)

    threading.Thread(target=report_metrics, daemon=True, name="svidgate-check-metrics").start()
    while True:
        try:
            message = _receive(channel)
        except (OSError, CheckProcessError) as exc:
            log.error("check_process.channel_failed", extra={"fields": {"error": str(exc)}})
            message = None
        if message is None:
            # The main process is gone (or closed the channel): nothing will update the policy any more.
            server.stop(0)
            os._exit(0)
        kind, generation, payload = message
        if kind == "report":
            send(("metrics", _samples(registry)))
            send(("applied", kind, generation))
            continue
        try:
            if kind == "authz":
                policies.swap(payload)
            elif kind == "bundles":
                bundles = {
                    TrustDomain(td): parse_spiffe_bundle(TrustDomain(td), data)
                    for td, data in payload.items()
                }
                feed.publish(IdentitySnapshot(bundles=bundles, version=generation))
        except SvidgateError as exc:
            # Validated by the main process already; if this still fails, keep the previous state in force.
            log.error("check_process.update_failed", extra={"fields": {"kind": kind, "error": str(exc)}})
            continue
        send(("applied", kind, generation))


if __name__ == "__main__":
    sys.exit(worker_main())
