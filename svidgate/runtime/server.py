"""The svidgate process: the one place that owns start, drain, stop and reload.

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

The shape is uvicorn's: `serve()` -> `Server.start()` (startup) -> `Server.wait()` (the main loop: until a
stop is requested) -> `Server.stop()` (shutdown). What it composes lives beside it: `listeners` (addresses,
socket ownership), `http` (the probe endpoints), `drain`, `signals`, `reload` and `wiring` (the services).

Import direction: the runtime imports everything (sources, services, metrics, logs); only the CLI imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import grpc
import grpc.aio
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health as health_sync
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from svidgate import __version__
from svidgate.config import Address, Config, ServerConfig
from svidgate.errors import SvidgateError
from svidgate.grpcutil import WrappingServer
from svidgate.identity.clock import Clock, system_clock
from svidgate.logs import configure_logging
from svidgate.metrics import Metrics
from svidgate.preflight import preflight
from svidgate.runtime.checkprocs import CheckProcessError, CheckProcesses, MergedRegistry
from svidgate.runtime.drain import DrainInterceptor
from svidgate.runtime.health import READY_MIN_LIFETIME_LEFT, readiness, source_document
from svidgate.runtime.http import HttpEndpoint
from svidgate.runtime.listeners import (
    Listener,
    ListenerError,
    Listeners,
    StateDirLock,
    bracket_host,
    grpc_server_options,
)
from svidgate.runtime.reload import ConfigReloader
from svidgate.runtime.signals import arm_stop_watchdog, install_signal_handlers
from svidgate.runtime.wiring import AUTHZ_SERVICE, HEALTH_SERVICE, Services, build_source
from svidgate.sources.base import IdentitySource, SourceStatus
from svidgate.sources.bundle_server import BundleEndpointServer, BundleSequence

log = logging.getLogger(__name__)

__all__ = ["READY_MIN_LIFETIME_LEFT", "STOP_MARGIN", "Server", "run", "serve"]

#: On SIGTERM/SIGINT the process exits within `server.drain_grace` plus this, in every state.
STOP_MARGIN = 5.0


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
        self.config_path = config_path
        self.settings = settings if settings is not None else config.server
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.metrics = Metrics(self.registry, clock=clock)
        self._clock = clock
        self._reloader = ConfigReloader(config, config_path, self.metrics, clock)
        self._drain = asyncio.Event()
        self._state_lock = StateDirLock(config.state_dir)
        self._listeners = Listeners(self.settings.socket_mode)
        self._drain_interceptor = DrainInterceptor(self._drain)
        self._stop_requested = asyncio.Event()
        self._stop_reason = ""
        self._stopped = asyncio.Event()
        self._grpc_servers: list[grpc.aio.Server] = []
        self._sync_servers: list[grpc.Server] = []
        # server.check_processes > 1: the worker processes that answer listen.check instead of this one.
        self._check_procs: CheckProcesses | None = None
        self._health: list[health_async.HealthServicer] = []
        self._sync_health: list[health_sync.HealthServicer] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._http: HttpEndpoint | None = None
        self._bundle_endpoint: BundleEndpointServer | None = None
        self._listening = False
        self.source: IdentitySource | None = None
        self.services: Services | None = None
        # Computed at scrape time: readiness also turns false as time passes (SVIDs running low).
        self.metrics.ready.set_function(lambda: 1.0 if self.readiness()[0] else 0.0)
        self.metrics.watch_sources(self.source_statuses)

    # -- state for probes and tests -------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The configuration in force (replaced by a reload)."""
        return self._reloader.config

    @property
    def listeners(self) -> tuple[tuple[str, str], ...]:
        """``(name, bound address)`` of every listener, e.g. ``("grpc", "tcp://127.0.0.1:40123")``."""
        return tuple((listener.name, listener.bound) for listener in self._listeners.bound)

    def bound(self, name: str) -> list[str]:
        """Bound addresses of listeners named `name` (``grpc``, ``workload_api``, ``check``, ``http``)."""
        return [listener.bound for listener in self._listeners.bound if listener.name == name]

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
        """``/readyz``: ``(ready, reason)`` (`svidgate.runtime.health.readiness`; the reason names what is
        missing)."""
        if self._drain.is_set():
            return False, "draining"
        if not self._listening:
            return False, "listeners not bound"
        if self.source is None:
            return False, "identity source not loaded"
        if self._check_procs is not None and self._check_procs.serving() == 0:
            # One restarting worker leaves the others answering on the port; none at all is an outage.
            return False, "no Check process serving listen.check with the current policy"
        return readiness(self.config, self.source.feed.current(), self.source_statuses(), self._clock())

    def readiness_details(self) -> dict[str, object]:
        """The ``sources`` field of ``/readyz``: every upstream's health (federation per trust domain)."""
        return {"sources": [source_document(status) for status in self.source_statuses()]}

    # -- start ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the identity source, start every listener, and begin serving.

        Raises:
            SvidgateError: the source cannot load (CA state, SPIRE agent, files) or a listener cannot bind;
                everything started so far is stopped again.
        """
        config = self.config
        log.info(
            "server.starting",
            extra={
                "fields": {
                    "version": __version__,
                    "config": str(self.config_path) if self.config_path is not None else "<embedded default>",
                    "summary": config.summary(),
                }
            },
        )
        for warning in config.warnings():
            log.warning("config.warning", extra={"fields": {"warning": warning}})
        try:
            # Lock state_dir and claim every unix socket and TCP address before anything else exists: a second
            # instance is refused before it loads a CA or creates a gRPC server.
            self._state_lock.acquire()
            self._listeners.claim(config.listen)
            built = await build_source(config, self._clock, self.metrics.bundle_update_rejected)
            self.source = built.source
            self.metrics.watch_feed(self.source.feed)
            self._spawn(self._run_source(self.source), "source")
            self._spawn(self._watch_snapshots(self.source), "snapshot-metrics")
            self.services = Services(config, built, self.metrics, self._clock)
            self._reloader.prepare = self._prepare_reload
            await self._start_grpc(self.services)
            await self._start_http()
            await self._start_bundle_endpoint(self.source)
        except BaseException:
            await self._shutdown(grace=0.0)
            raise
        self._listening = True
        if self.config_path is not None and self.settings.config_poll_interval > 0:
            self._spawn(self._reloader.watch(self.settings.config_poll_interval), "config-watch")
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
            if self._check_procs is not None:
                self._check_procs.publish_bundles(snapshot.bundles)

    def _prepare_reload(self, new: Config) -> Callable[[], None]:
        assert self.services is not None
        apply = self.services.prepare_reload(new)
        procs = self._check_procs
        if procs is None:
            return apply

        def apply_everywhere() -> None:
            apply()
            procs.publish_authz(new.authz)  # confirmed by reload() before it returns

        return apply_everywhere

    async def _start_grpc(self, services: Services) -> None:
        listen = self.config.listen
        attest = services.attest
        if listen.check is not None and self.settings.check_processes > 1:
            await self._start_check_processes(listen.check)
        elif listen.check is not None:
            # The threaded server: measured faster than grpc.aio for unary calls (~136 vs ~309 us of server
            # CPU per empty RPC here), and Check is the per-request hot path.
            check_server = services.check_server(self.settings.check_workers, grpc_server_options())
            self._sync_servers.append(check_server)
            health = health_sync.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health, check_server)
            for name in ["", AUTHZ_SERVICE]:
                health.set(name, health_pb2.HealthCheckResponse.SERVING)
            self._sync_health.append(health)
            if self.settings.reflection:
                reflection.enable_server_reflection(
                    [AUTHZ_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME], check_server
                )
            await self._listeners.bind_grpc(check_server, "check", listen.check, services.peers, attest)
            check_server.start()

        if listen.grpc:
            main_server = self._new_grpc_server()
            main_names = services.register(main_server, "grpc")
            await self._add_health_and_reflection(main_server, main_names)
            for address in listen.grpc:
                await self._listeners.bind_grpc(main_server, "grpc", address, services.peers, attest)
            await main_server.start()

        if listen.workload_api is not None:
            # Its own server: Workload API callers are identified by peer credentials on this socket alone.
            wl_server = self._new_grpc_server()
            wl_names = services.register(wl_server, "workload_api")
            await self._add_health_and_reflection(wl_server, wl_names)
            await self._listeners.bind_grpc(
                wl_server, "workload_api", listen.workload_api, services.peers, attest
            )
            await wl_server.start()

    async def _start_check_processes(self, address: Address) -> None:
        assert self.source is not None
        procs = CheckProcesses(
            self.settings.check_processes,
            address,
            self.settings.check_workers,
            self.config.authz,
            self.config.log.format,
            self.config.log.level,
            self.settings.drain_grace,
        )
        self._check_procs = procs  # stopped by _shutdown from here on, whatever happens next
        try:
            bound = procs.reserve()
        except CheckProcessError as exc:
            raise ListenerError(str(exc)) from None
        procs.publish_bundles(self.source.feed.current().bundles)
        await procs.start()
        self._listeners.bound.append(Listener("check", str(address), f"tcp://{bound}"))
        log.info(
            "grpc.listening",
            extra={"fields": {"listener": "check", "address": f"tcp://{bound}", "processes": procs.count}},
        )

    def _new_grpc_server(self) -> grpc.aio.Server:
        # Metrics and drain wrap each method once, when it is registered, instead of as interceptors that run
        # on every call (issue 11: ~60k instructions per Check on listen.grpc).
        metrics, drain = self.metrics.interceptor(), self._drain_interceptor
        server = WrappingServer(
            grpc.aio.server(options=grpc_server_options()),
            lambda method, handler: metrics.wrap(method, drain.wrap(handler)),
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

    async def _start_http(self) -> None:
        if self.config.listen.http is None:
            return
        host, port = self.config.listen.http
        procs = self._check_procs
        if procs is None:
            self._http = HttpEndpoint(host, port, self.registry, self.readiness, self.readiness_details)
        else:
            # One /metrics for every process: the workers' Check counts are added to this process's series.
            self._http = HttpEndpoint(
                host,
                port,
                MergedRegistry(self.registry, procs.counts),
                self.readiness,
                self.readiness_details,
                before_metrics=procs.refresh_counts,
            )
        bound = await self._http.start()
        address = self._listeners.add("http", host, port, bound)
        log.info("http.listening", extra={"fields": {"address": address, "port": bound}})

    async def _start_bundle_endpoint(self, source: IdentitySource) -> None:
        config = self.config
        listen = config.listen.bundle_endpoint
        if listen is None:
            return
        host, port = listen
        self._bundle_endpoint = BundleEndpointServer(
            host,
            port,
            config.bundle_endpoint,
            config.trust_domain,
            source.feed,
            BundleSequence.in_state_dir(config.state_dir),
            poll_interval=config.source.poll_interval,
            on_request=self._count_bundle_endpoint_request,
        )
        try:
            bound = await self._bundle_endpoint.start()
        except OSError as exc:
            raise ListenerError(
                f"listen.bundle_endpoint {bracket_host(host)}:{port}: cannot bind: {exc.strerror or exc}"
            ) from None
        address = self._listeners.add("bundle_endpoint", host, port, bound)
        log.info(
            "bundle_endpoint.listening",
            extra={"fields": {"address": address, "profile": config.bundle_endpoint.profile}},
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
        if self._check_procs is not None:
            stops.append(self._check_procs.stop(grace))
        if stops:
            results = await asyncio.gather(*stops, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    log.warning("grpc.stop_failed", extra={"fields": {"error": repr(result)}})
        await self._listeners.close_fronts()
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
        self._listeners.release()
        self._state_lock.release()
        self._listening = False
        self._stopped.set()

    # -- reload ---------------------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Re-read the config file soon (SIGHUP)."""
        self._spawn(self.reload("SIGHUP"), "reload")

    async def reload(self, trigger: str = "requested") -> bool:
        """Re-read, validate and apply the config file (`ConfigReloader.reload`); never raises.

        Returns:
            True when a new configuration was applied.
        """
        applied = await self._reloader.reload(trigger)
        if applied and self._check_procs is not None:
            await self._check_procs.confirm_authz()
        return applied


def _wait_sync_stop(server: grpc.Server, grace: float) -> None:
    server.stop(grace).wait(grace + 1.0)


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
                arm_stop_watchdog(bound)
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
