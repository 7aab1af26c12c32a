"""Prometheus metrics of svidgate: one `Metrics` object per process, on an injected registry.

Every service receives `metrics: Metrics | None` and records only when it is not None, so tests and tools run
without a registry. Names follow Prometheus conventions (`svidgate_` prefix, base units, `_total` for
counters, `_seconds` for time). Scrape-time values (seconds until each SVID expires, bundle sequence and age)
are read from the identity snapshot when Prometheus scrapes, so they are never stale and cost nothing between
scrapes. The gRPC interceptor counts every handled RPC by service, method and status code.

This module must not import the services (`svidgate.sds`, `svidgate.extauthz`, `svidgate.workloadapi`): they
import it.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import inspect
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from svidgate import __version__
from svidgate.grpcutil import wrap_handler
from svidgate.identity.clock import Clock, system_clock

if TYPE_CHECKING:
    from svidgate.identity.bundle import Bundle
    from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
    from svidgate.identity.spiffe_id import TrustDomain
    from svidgate.sources.base import SourceStatus

__all__ = ["CHECK_BUCKETS", "CheckRecorder", "Metrics", "MetricsInterceptor"]

#: Check latency buckets, 50 µs .. 100 ms: a cache hit answers in well under a millisecond and an ES256
#: verification costs ~160 µs, so resolution is spent below 1 ms; Envoy's default ext_authz timeout is 200 ms.
CHECK_BUCKETS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)


class _Cell:
    """One thread's running totals; written only by its own thread, read by `CheckRecorder.flush`."""

    __slots__ = ("buckets", "counts", "hits", "misses", "seconds")

    def __init__(self) -> None:
        self.counts: dict[Any, int] = {}  # decisions counter child -> Checks
        self.buckets = [0] * (len(CHECK_BUCKETS) + 1)  # the last one is +Inf
        self.seconds = 0.0
        self.hits = 0
        self.misses = 0


class CheckRecorder:
    """Lock-free recording of the per-Check series (decisions, latency, token cache hits and misses).

    Why: a Prometheus ``Counter.inc``/``Histogram.observe`` takes a lock and runs several Python calls (the
    histogram walks its buckets in Python); measured with callgrind, the four updates of one Check cost
    ~19k instructions, a fifth of a cached Check's own work. Here every thread adds to its own `_Cell`
    (plain attribute and dict updates: one writer per cell, so no update is lost and no lock is needed), and
    `flush` folds the growth of every cell into the Prometheus collectors. The collectors of `Metrics`
    call `flush` before they are collected, so every scrape (and `get_sample_value`) sees every Check
    recorded before it: names, labels and values are exactly those of direct recording.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._cells: list[_Cell] = []
        self._flushed: dict[int, _Cell] = {}  # id(cell) -> the totals already folded in
        self._lock = threading.Lock()
        self._histogram: Any = None
        self._hits: Any = None
        self._misses: Any = None

    def bind(self, histogram: Histogram, hits: Counter, misses: Counter) -> None:
        """Name the collectors to fold into (`Metrics` does this once)."""
        self._histogram, self._hits, self._misses = histogram, hits, misses

    def cell(self) -> _Cell:
        """The calling thread's cell."""
        try:
            cell: _Cell = self._local.cell
        except AttributeError:
            cell = self._local.cell = _Cell()
            with self._lock:
                self._cells.append(cell)
                self._flushed[id(cell)] = _Cell()
        return cell

    def check(self, decision_counter: Any, seconds: float) -> None:
        """Count one Check: its decisions counter child (``authz_decisions.labels(...)``) and duration."""
        cell = self.cell()
        counts = cell.counts
        counts[decision_counter] = counts.get(decision_counter, 0) + 1
        # bisect_left: the first bucket whose upper bound is >= seconds, Prometheus's `le` rule.
        cell.buckets[bisect.bisect_left(CHECK_BUCKETS, seconds)] += 1
        cell.seconds += seconds

    def count(self, counter_child: Any) -> None:
        """Count one event on a counter child (``Counter.labels(...)``), folded in at the next flush."""
        counts = self.cell().counts
        counts[counter_child] = counts.get(counter_child, 0) + 1

    def cache_hit(self) -> None:
        """Count one validated-token cache hit."""
        self.cell().hits += 1

    def cache_miss(self) -> None:
        """Count one validated-token cache miss."""
        self.cell().misses += 1

    def flush(self) -> None:
        """Fold everything recorded since the last flush into the Prometheus collectors."""
        histogram = self._histogram
        if histogram is None:
            return
        with self._lock:
            for cell in self._cells:
                done = self._flushed[id(cell)]
                # Copies first (one C-level step each under the GIL), then the differences.
                counts = dict(cell.counts)
                buckets = list(cell.buckets)
                seconds, hits, misses = cell.seconds, cell.hits, cell.misses
                for child, total in counts.items():
                    grown = total - done.counts.get(child, 0)
                    if grown:
                        child.inc(grown)
                for i, total in enumerate(buckets):
                    grown = total - done.buckets[i]
                    if grown:
                        # prometheus_client has no public "add n observations"; a test pins these names.
                        histogram._buckets[i].inc(grown)
                if seconds != done.seconds:
                    histogram._sum.inc(seconds - done.seconds)
                if hits != done.hits:
                    self._hits.inc(hits - done.hits)
                if misses != done.misses:
                    self._misses.inc(misses - done.misses)
                done.counts, done.buckets = counts, buckets
                done.seconds, done.hits, done.misses = seconds, hits, misses


class _FlushingCounter(Counter):
    """A Counter that runs `before_collect` (the recorder's flush) when collected."""

    before_collect: Callable[[], None] | None = None

    def collect(self) -> Iterable[Metric]:
        if self.before_collect is not None:
            self.before_collect()
        return super().collect()


class _FlushingHistogram(Histogram):
    """A Histogram that runs `before_collect` (the recorder's flush) when collected."""

    before_collect: Callable[[], None] | None = None

    def collect(self) -> Iterable[Metric]:
        if self.before_collect is not None:
            self.before_collect()
        return super().collect()


class Metrics:
    """All collectors of one svidgate process, registered on `registry`.

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

        # --- SDS
        self.sds_streams = Gauge(
            "svidgate_sds_streams",
            "SDS streams currently open.",
            ["api"],
            registry=registry,
        )
        self.sds_pushes = Counter(
            "svidgate_sds_pushes_total",
            "SDS responses sent, per resource name in the response.",
            ["resource"],
            registry=registry,
        )
        self.sds_acks = Counter(
            "svidgate_sds_acks_total",
            "SDS ACKs received, per resource name.",
            ["resource"],
            registry=registry,
        )
        self.sds_nacks = Counter(
            "svidgate_sds_nacks_total",
            "SDS NACKs received (a request with error_detail), per resource name.",
            ["resource"],
            registry=registry,
        )
        self.sds_rejected_names = Counter(
            "svidgate_sds_rejected_resource_names_total",
            "Requested SDS resource names that were not served.",
            ["reason"],
            registry=registry,
        )

        # --- ext_authz
        # The per-Check series are recorded through `authz_recorder` (lock-free, per thread) and folded into
        # these collectors whenever one of them is collected; direct `.inc()`/`.observe()` still work.
        self.authz_recorder = CheckRecorder()
        flush = self.authz_recorder.flush
        self.authz_decisions = _FlushingCounter(
            "svidgate_authz_decisions_total",
            "ext_authz Check decisions.",
            ["policy", "result", "reason", "dry_run"],
            registry=registry,
        )
        self.authz_check_seconds = _FlushingHistogram(
            "svidgate_authz_check_duration_seconds",
            "Time to decide one ext_authz Check, from request parsed to response built.",
            buckets=CHECK_BUCKETS,
            registry=registry,
        )
        self.authz_token_cache_hits = _FlushingCounter(
            "svidgate_authz_token_cache_hits_total",
            "Validated-token cache hits (no signature work).",
            registry=registry,
        )
        self.authz_token_cache_misses = _FlushingCounter(
            "svidgate_authz_token_cache_misses_total",
            "Validated-token cache misses.",
            registry=registry,
        )
        self.authz_recorder.bind(
            self.authz_check_seconds, self.authz_token_cache_hits, self.authz_token_cache_misses
        )
        for flushing in (
            self.authz_decisions,
            self.authz_check_seconds,
            self.authz_token_cache_hits,
            self.authz_token_cache_misses,
        ):
            flushing.before_collect = flush
        self.authz_token_cache_entries = Gauge(
            "svidgate_authz_token_cache_entries",
            "Entries in the validated-token cache.",
            registry=registry,
        )
        self.authz_tokens_injected = Counter(
            "svidgate_authz_tokens_injected_total",
            "JWT-SVIDs added to requests by policies in inject mode.",
            ["policy"],
            registry=registry,
        )

        # --- Workload API
        self.workload_api_streams = Gauge(
            "svidgate_workload_api_streams",
            "Workload API streams currently open.",
            ["method"],
            registry=registry,
        )
        self.workload_api_requests = Counter(
            "svidgate_workload_api_requests_total",
            "Workload API calls, by method and gRPC status code.",
            ["method", "code"],
            registry=registry,
        )

        # --- gRPC (every service, through `MetricsInterceptor`)
        # Flushing: the threaded Check server counts its calls through `authz_recorder`.
        self.grpc_handled = _FlushingCounter(
            "svidgate_grpc_server_handled_total",
            "gRPC calls completed on the server, by service, method and status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.grpc_started = _FlushingCounter(
            "svidgate_grpc_server_started_total",
            "gRPC calls started on the server, by service and method.",
            ["service", "method"],
            registry=registry,
        )
        self.grpc_handled.before_collect = self.grpc_started.before_collect = self.authz_recorder.flush

        # --- process lifecycle (server.py)
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
        self.k8s_attestations = Counter(
            "svidgate_k8s_attestations_total",
            "Kubernetes attestations of unix-socket callers, by result: attested, or why not (not_in_pod, "
            "pod_not_listed, container_not_listed, kubelet_unreachable, kubelet_error, pid_reused, ...).",
            ["result"],
            registry=registry,
        )
        self.k8s_pod_list_fetches = Counter(
            "svidgate_k8s_pod_list_fetches_total",
            "Pod list fetches from the kubelet, by result (ok, or the failure reason).",
            ["result"],
            registry=registry,
        )
        self.templated_ids_refused = Counter(
            "svidgate_templated_spiffe_ids_refused_total",
            "Templated SPIFFE IDs not issued because the caller's values do not make a valid SPIFFE ID, by "
            "service.",
            ["service"],
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
        service, method = _split_method(handler_call_details.method)
        started = self._metrics.grpc_started.labels(service=service, method=method)
        handled = self._metrics.grpc_handled

        def done(context: grpc.aio.ServicerContext[Any, Any], raised: BaseException | None) -> None:
            handled.labels(service=service, method=method, code=_code_name(context, raised)).inc()

        return wrap_handler(
            handler,
            lambda behavior: _wrap_unary(behavior, started, done),
            lambda behavior: _wrap_streaming(behavior, started, done),
        )


_Done = Callable[["grpc.aio.ServicerContext[Any, Any]", "BaseException | None"], None]


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


def monotonic() -> float:
    """The clock for latency measurements (`authz_check_seconds`): monotonic, never the wall clock."""
    return time.perf_counter()
