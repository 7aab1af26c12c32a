"""The metrics of one svidgate process: each service's own collectors, plus the process's series.

Each service keeps its metrics beside it (`svidgate.sds.metrics.SdsMetrics`,
`svidgate.extauthz.metrics.AuthzMetrics`, `svidgate.workloadapi.metrics.WorkloadApiMetrics`,
`svidgate.attest.metrics.AttestMetrics`) and receives only those. `Metrics` registers all of them on one
injected registry, together with what belongs to the process: the gRPC interceptor's per-call series
(every service, by service, method and status code), reloads, readiness, the bundle endpoint, source errors,
bundle rejections, and the scrape-time gauges read from the identity snapshot (SVID expiry, bundle sequence
and age) and from the sources' health. Names follow Prometheus conventions (`svidgate_` prefix, base units,
`_total` for counters, `_seconds` for time). Only prometheus_client's public API is used.

Services never import this module: the runtime builds `Metrics` and hands each service its part.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from prometheus_client import CollectorRegistry, Counter, Gauge, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from svidgate import __version__
from svidgate.attest.metrics import AttestMetrics
from svidgate.extauthz.metrics import CHECK_BUCKETS, AuthzMetrics, CheckRecorder, FlushingCounter
from svidgate.grpcutil import wrap_handler
from svidgate.identity.clock import Clock, system_clock
from svidgate.sds.metrics import SdsMetrics
from svidgate.workloadapi.metrics import WorkloadApiMetrics

if TYPE_CHECKING:
    from svidgate.identity.bundle import Bundle
    from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
    from svidgate.identity.spiffe_id import TrustDomain
    from svidgate.sources.base import SourceStatus

__all__ = ["CHECK_BUCKETS", "Metrics", "MetricsInterceptor"]


class Metrics:
    """Every collector of one svidgate process, registered on `registry`.

    Args:
        registry: where every collector is registered; `/metrics` serves this registry. Tests pass a fresh
            `CollectorRegistry()` so that runs never share state.
        clock: epoch seconds; drives `svidgate_x509_svid_expiry_seconds` and `svidgate_bundle_age_seconds`.
        process_metrics: also register the standard `process_*` and `python_info` collectors (they read
            `/proc/self`, so they are off for registries that must hold only svidgate's own series).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        clock: Clock = system_clock,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry
        self._clock = clock

        # --- gRPC (every service, through `MetricsInterceptor`; the threaded Check server counts its calls
        # through the Check recorder, so these flush it when collected)
        self.grpc_handled = FlushingCounter(
            "svidgate_grpc_server_handled_total",
            "gRPC calls completed on the server, by service, method and status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.grpc_started = FlushingCounter(
            "svidgate_grpc_server_started_total",
            "gRPC calls started on the server, by service and method.",
            ["service", "method"],
            registry=registry,
        )

        # --- the services' own
        templated_ids_refused = Counter(
            "svidgate_templated_spiffe_ids_refused_total",
            "Templated SPIFFE IDs not issued because the caller's values do not make a valid SPIFFE ID, by "
            "service.",
            ["service"],
            registry=registry,
        )
        self.sds = SdsMetrics(registry, templated_ids_refused.labels(service="sds"))
        self.authz = AuthzMetrics(registry, self.grpc_started, self.grpc_handled)
        self.workload_api = WorkloadApiMetrics(registry, templated_ids_refused.labels(service="workload_api"))
        self.attest = AttestMetrics(registry)
        self.grpc_handled.before_collect = self.grpc_started.before_collect = self.authz.recorder.flush

        # --- process lifecycle (svidgate.runtime)
        self.config_reloads = Counter(
            "svidgate_config_reloads_total",
            "Configuration reloads (SIGHUP or file change), by result: applied, restart_required (applied "
            "but for keys that need a restart), unchanged, rejected.",
            ["result"],
            registry=registry,
        )
        self.config_last_reload_success = Gauge(
            "svidgate_config_last_reload_success_timestamp_seconds",
            "When the configuration in force was loaded (epoch seconds).",
            registry=registry,
        )
        self.ready = Gauge(
            "svidgate_ready",
            "1 when /readyz answers ready (identity loaded and fresh, every listener bound, not draining).",
            registry=registry,
        )
        self.bundle_endpoint_requests = Counter(
            "svidgate_bundle_endpoint_requests_total",
            "Requests answered by the SPIFFE bundle endpoint, by document and HTTP status.",
            ["document", "code"],
            registry=registry,
        )
        self.source_errors = Counter(
            "svidgate_source_errors_total",
            "Identity source failures (a SPIRE agent unreachable, a file unreadable, ...).",
            ["source"],
            registry=registry,
        )
        self.bundle_updates_rejected = Counter(
            "svidgate_bundle_updates_rejected_total",
            "Trust bundle updates refused, the last good bundle kept, by trust domain and reason (malformed, "
            "too_large, no_usable_authority, no_usable_x509_authority, no_usable_jwt_authority, "
            "sequence_regressed).",
            ["trust_domain", "reason"],
            registry=registry,
        )
        self.snapshots_published = Counter(
            "svidgate_identity_snapshots_total",
            "Identity snapshots published by the source (rotations, bundle updates).",
            registry=registry,
        )
        info = Gauge("svidgate_build_info", "svidgate version.", ["version"], registry=registry)
        info.labels(version=__version__).set(1)

        self._snapshots = _SnapshotCollector(clock)
        registry.register(self._snapshots)
        self._sources = _SourceCollector()
        registry.register(self._sources)

        if process_metrics:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)

    def watch_feed(self, feed: SnapshotFeed) -> None:
        """Read `feed` at every scrape for the SVID expiry and bundle gauges.

        Args:
            feed: the identity source's feed. Calling again replaces it (a reload may swap the source).
        """
        self._snapshots.feed = feed
        self._snapshots.observe(feed.current())

    def watch_sources(self, statuses: Callable[[], Sequence[SourceStatus]]) -> None:
        """Read `statuses` at every scrape for `svidgate_source_up`, `..._last_success_timestamp_seconds` and
        `svidgate_source_failures_total` (one series per upstream: the own source and each federated trust
        domain)."""
        self._sources.statuses = statuses

    def observe_snapshot(self, snapshot: IdentitySnapshot) -> None:
        """Note a newly published snapshot: bundle ages restart when a bundle's content changes.

        The server calls this on every publish so that ages are exact; without it, a change is noticed at the
        next scrape (at most one scrape interval late).
        """
        self.snapshots_published.inc()
        self._snapshots.observe(snapshot)

    def bundle_update_rejected(self, trust_domain: TrustDomain, reason: str) -> None:
        """Count one refused bundle update (a `BundleRejectionSink` for the sources; any thread)."""
        self.bundle_updates_rejected.labels(trust_domain=str(trust_domain), reason=reason).inc()

    def interceptor(self) -> MetricsInterceptor:
        """A grpc.aio server interceptor that fills `svidgate_grpc_server_{started,handled}_total`."""
        return MetricsInterceptor(self)


def _bundle_fingerprint(bundle: Bundle) -> tuple[object, ...]:
    # Content, not identity: a source may rebuild an equal Bundle object on every snapshot, and that must not
    # make the bundle look new.
    certs = tuple(
        sorted(hashlib.sha256(c.tbs_certificate_bytes).hexdigest() for c in bundle.x509_authorities)
    )
    return (bundle.sequence, certs, tuple(sorted(bundle.jwt_authorities)))


class _SnapshotCollector(Collector):
    """Scrape-time gauges computed from the current identity snapshot."""

    def __init__(self, clock: Clock) -> None:
        self.feed: SnapshotFeed | None = None
        self._clock = clock
        # trust domain -> (content fingerprint, first seen at); bookkeeping only, no key material.
        self._bundle_seen: dict[TrustDomain, tuple[tuple[object, ...], float]] = {}

    def observe(self, snapshot: IdentitySnapshot) -> None:
        now = self._clock()
        seen: dict[TrustDomain, tuple[tuple[object, ...], float]] = {}
        for trust_domain, bundle in snapshot.bundles.items():
            fingerprint = _bundle_fingerprint(bundle)
            previous = self._bundle_seen.get(trust_domain)
            if previous is not None and previous[0] == fingerprint:
                seen[trust_domain] = previous
            else:
                seen[trust_domain] = (fingerprint, now)
        # One assignment: a concurrent scrape sees the old or the new map, never a half-built one.
        self._bundle_seen = seen

    def describe(self) -> Iterable[Metric]:
        # Declaring no descriptions keeps registration cheap and lets collect() run only at scrape time.
        return []

    def collect(self) -> Iterable[Metric]:
        expiry = GaugeMetricFamily(
            "svidgate_x509_svid_expiry_seconds",
            "Seconds until each served X.509-SVID expires (negative once expired).",
            labels=["spiffe_id"],
        )
        sequence = GaugeMetricFamily(
            "svidgate_bundle_sequence",
            "spiffe_sequence of each trust domain's bundle (-1 when the bundle carries none).",
            labels=["trust_domain"],
        )
        age = GaugeMetricFamily(
            "svidgate_bundle_age_seconds",
            "Seconds since each trust domain's bundle content last changed.",
            labels=["trust_domain"],
        )
        svid_count = GaugeMetricFamily("svidgate_x509_svids", "X.509-SVIDs held.")
        bundle_count = GaugeMetricFamily("svidgate_bundles", "Trust bundles held (own and federated).")
        feed = self.feed
        if feed is not None:
            snapshot = feed.current()
            self.observe(snapshot)
            now = self._clock()
            for spiffe_id, svid in snapshot.svids.items():
                expiry.add_metric([str(spiffe_id)], svid.expires_at - now)
            seen = self._bundle_seen
            for trust_domain, bundle in snapshot.bundles.items():
                sequence.add_metric([str(trust_domain)], -1 if bundle.sequence is None else bundle.sequence)
                first_seen = seen.get(trust_domain)
                if first_seen is not None:
                    age.add_metric([str(trust_domain)], max(0.0, now - first_seen[1]))
            svid_count.add_metric([], len(snapshot.svids))
            bundle_count.add_metric([], len(snapshot.bundles))
        yield expiry
        yield sequence
        yield age
        yield svid_count
        yield bundle_count


class _SourceCollector(Collector):
    """Scrape-time health of every upstream of identity, from the source's `statuses()`."""

    def __init__(self) -> None:
        self.statuses: Callable[[], Sequence[SourceStatus]] | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        labels = ["source", "trust_domain"]
        up = GaugeMetricFamily(
            "svidgate_source_up",
            "1 while an upstream of identity delivers: the own source (builtin, files, spire) and each "
            "federated trust domain (source=federation).",
            labels=labels,
        )
        last = GaugeMetricFamily(
            "svidgate_source_last_success_timestamp_seconds",
            "When each upstream last delivered (epoch seconds; a connected stream: now; 0: never).",
            labels=labels,
        )
        failures = CounterMetricFamily(
            "svidgate_source_failures",
            "Failed attempts of each upstream, by reason (ca_state_write, mint, files, fetch, file, "
            "stream_lost).",
            labels=[*labels, "reason"],
        )
        statuses = self.statuses
        for status in statuses() if statuses is not None else ():
            key = [status.source, status.trust_domain]
            up.add_metric(key, 1.0 if status.up else 0.0)
            last.add_metric(key, status.last_success or 0.0)
            for reason, count in sorted(status.failures.items()):
                failures.add_metric([*key, reason], count)
        yield up
        yield last
        yield failures


def _split_method(full_method: str) -> tuple[str, str]:
    # "/envoy.service.auth.v3.Authorization/Check" -> ("envoy.service.auth.v3.Authorization", "Check")
    _, _, rest = full_method.partition("/")
    service, _, method = rest.rpartition("/")
    return (service or "unknown", method or "unknown")


def _code_name(context: grpc.aio.ServicerContext[Any, Any], raised: BaseException | None) -> str:
    code: grpc.StatusCode | None = None
    try:
        code = context.code()
    except Exception:  # an old or fake context without code(): fall back below
        code = None
    if code is None:
        # A handler that raised without setting a code is reported to the client as UNKNOWN by grpcio;
        # a cancelled task means the client went away (or the server is draining).
        if raised is None:
            return "OK"
        return "CANCELLED" if isinstance(raised, asyncio.CancelledError) else "UNKNOWN"
    if isinstance(code, grpc.StatusCode):
        return code.name
    # grpcio's aio context may return the raw integer value of the code.
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return "UNKNOWN"


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts every RPC by service, method and final status code (the grpc-ecosystem metric shape).

    Wraps the handler's behaviour; async generators stay async generators so streaming services keep their
    back-pressure. Cost on the unary hot path: one dict lookup per label set and two counter increments.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self.wrap(handler_call_details.method, handler)

    def wrap(
        self, full_method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """`handler` counted as `full_method` (``/package.Service/Method``): what the interceptor does per
        call, for wrapping once at registration (`svidgate.grpcutil.WrappingServer`)."""
        service, method = _split_method(full_method)
        started = self._metrics.grpc_started.labels(service=service, method=method)
        handled = self._metrics.grpc_handled

        def done(context: grpc.aio.ServicerContext[Any, Any], raised: BaseException | None) -> None:
            handled.labels(service=service, method=method, code=_code_name(context, raised)).inc()

        recorder = self._metrics.authz.recorder
        ok = handled.labels(service=service, method=method, code="OK")
        return wrap_handler(
            handler,
            lambda behavior: _wrap_unary_lean(behavior, recorder, started, ok, done),
            lambda behavior: _wrap_streaming(behavior, started, done),
        )


_Done = Callable[["grpc.aio.ServicerContext[Any, Any]", "BaseException | None"], None]


def _wrap_unary_lean(
    behavior: Callable[..., Any], recorder: CheckRecorder, started: Any, ok: Any, done: _Done
) -> Callable[..., Any]:
    """`_wrap_unary` for wrapping once at registration: the label children are looked up once, the counts
    go through the recorder's per-thread cells (flushed at scrape time, as the threaded Check server counts),
    and the status is read only when the handler set one. Measured with bench/check_bench_callgrind.py (Check
    on listen.grpc, log off): ~50k fewer instructions per call than the per-call interceptor."""
    if not inspect.iscoroutinefunction(behavior):
        return _wrap_unary(behavior, started, done)

    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        recorder.count(started)
        try:
            result = await behavior(request, context)
        except BaseException as raised:
            done(context, raised)
            raise
        code: object = context.code()  # grpcio's aio context may answer the raw integer
        if code is None or code == grpc.StatusCode.OK or code == 0:
            recorder.count(ok)
        else:
            done(context, None)
        return result

    return wrapper


def _wrap_unary(behavior: Callable[..., Any], started: Any, done: _Done) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started.inc()
        try:
            result = behavior(request, context)
            if inspect.isawaitable(result):
                result = await result
        except BaseException as raised:
            done(context, raised)
            raise
        done(context, None)
        return result

    return wrapper


def _wrap_streaming(behavior: Callable[..., Any], started: Any, done: _Done) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior) or inspect.isgeneratorfunction(behavior):

        async def generator(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started.inc()
            try:
                produced = behavior(request, context)
                if inspect.isasyncgen(produced):
                    async for response in produced:
                        yield response
                else:
                    for response in _as_iter(produced):
                        yield response
            except BaseException as raised:
                done(context, raised)
                raise
            done(context, None)

        return generator

    # A coroutine handler that answers with `await context.write(...)`: counted like a unary call.
    return _wrap_unary(behavior, started, done)


def _as_iter(produced: Any) -> Iterator[Any]:
    yield from produced
