"""The grpc.aio servicer of Envoy's SecretDiscoveryService: StreamSecrets, DeltaSecrets, FetchSecrets.

Thin on purpose: it identifies the caller (Envoy node from the first request, unix peer credentials through
the `PeerRegistry`), feeds requests and snapshots into the pure state machines of `svidgate.sds.stream`,
writes what they plan, and logs and counts what they report. Building secrets is `svidgate.sds.resources`.

Per stream: the handler coroutine reads requests, and nothing else runs for it while it is idle. Two things
change under an open stream: the identity snapshot (`SnapshotFeed`) and, on a config reload, the entitlement
rules (`workloads[]`, an immutable `svidgate.changes.Rules` replaced whole on a reload). Both wake one
servicer-wide fan-out task through the `svidgate.changes.ChangeSignal` (shared with the Workload API); it
queues the open streams (a registry of `_Stream` records) that are behind, and a bounded pool of pusher tasks
re-plans each against whichever of the two changed and writes. A per-stream lock serialises planning and
writing, so responses leave in the order their nonces were issued. An idle stream costs its gRPC call, its
handler task and its record, no watcher task: measured with bench/sds_streams.py at 10k streams, 36.0 ->
28.1-28.5 KiB per idle stream (with the metrics and drain wrapping of `svidgate serve`).

Every stream shares one event loop with the other services (ext_authz Check among them), so a request whose
size alone would hold that loop is refused whole before any work: more than `stream.MAX_RESOURCE_NAMES`
names, or a `node.id`/`node.cluster` longer than `MAX_NODE_FIELD_LENGTH`, ends the stream (or the fetch)
with INVALID_ARGUMENT and one `sds.request_refused` warning. Names that cannot be served are reported once per
request in one `sds.resource_rejected` line (a count and the first few names), never one line per name.

A templated workload's SVID (``spiffe://td/ns/{k8s:ns}/...``) exists only while someone uses it: a stream
entitled to one holds it through `TemplatedSvids.acquire` (the source mints it on the first hold) before it
answers, and releases it when the stream ends or a reload takes the entitlement away.

Why one module (over 600 lines): the three RPCs share one per-stream life (identify the caller, hold and
release templated SVIDs, re-evaluate the entitlement on a reload, refuse oversized requests, report once)
and the wake-up they wait on; what can be pure already lives in `stream` and `resources`. What is left is
the gRPC edge of one protocol, read top to bottom.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from svidgate.bounded import BoundedDict
from svidgate.changes import ChangeSignal, Rules
from svidgate.errors import SourceError
from svidgate.identity.clock import Clock, system_clock
from svidgate.identity.entitlement import CallerInfo, Entitlement, entitle
from svidgate.sds.resources import (
    SECRET_TYPE_URL,
    VALIDATION_METADATA_KEY,
    Naming,
    Rejection,
    SecretResolver,
    SecretResource,
    Subscriber,
    parse_validation,
)
from svidgate.sds.stream import (
    Ack,
    DeltaResponse,
    DeltaStream,
    Event,
    InvalidRequestError,
    Nack,
    Rejected,
    Removed,
    SotwResponse,
    SotwStream,
    StaleNonce,
    Step,
    StreamState,
    Withdrawn,
    check_resource_names,
    state_version,
)

if TYPE_CHECKING:
    from svidgate.identity.entitlement import Workload
    from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
    from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
    from svidgate.peercred import PeerRegistry
    from svidgate.sds.metrics import SdsMetrics
    from svidgate.sds.resources import Validation
    from svidgate.sources.base import TemplatedSvids

log = logging.getLogger(__name__)

# grpc-stubs does not declare grpc.aio.EOF (the sentinel `context.read()` returns at the end of a stream).
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009

#: Longest `error_detail.message` we log (Envoy's messages are short; this bounds a hostile client).
MAX_ERROR_LOG = 1000

#: Longest `node.id` and `node.cluster` accepted, in characters. Both go into every log line of the stream and
#: are matched against `envoy:` selectors; real ones are host, pod or service names (Kubernetes caps names at
#: 253), so 1 KiB is generous, and a hostile multi-megabyte node id is refused at once instead of being copied
#: into every log line. Longer -> INVALID_ARGUMENT.
MAX_NODE_FIELD_LENGTH = 1024

#: A `sds.resource_rejected` line names at most this many of the request's rejected names (each cut to
#: `MAX_NAME_LOG` characters) and counts the rest: one line per request, whatever the request holds.
MAX_NAMES_LOGGED = 5
MAX_NAME_LOG = 100

#: Server options that let a reconnect storm in. grpc-core queues calls that arrived before the application
#: asked for them ("pending requests"); past `grpc.server.max_pending_requests` (default 1000) it refuses new
#: calls at random (RESOURCE_EXHAUSTED), past `grpc.server.max_pending_requests_hard_limit` (default 3000) all
#: of them. grpc.aio asks for calls one at a time from its event loop, so a burst of thousands of streams
#: queues up there: with the defaults 1,847 of 5,000 streams opened at once were refused.
#: `grpc.max_concurrent_streams` is the HTTP/2 per-connection limit (one Envoy multiplexes all its SDS
#: subscriptions on one connection).
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 200_000),
    ("grpc.max_concurrent_streams", 100_000),
    # Unrequested calls older than this are cancelled by grpc-core; a storm of 10k must have time to drain.
    ("grpc.server_max_unrequested_time_in_server", 120),
)

_R = TypeVar("_R", bound="SotwResponse | DeltaResponse")
_S = TypeVar("_S", bound="StreamState[Any]")

SERVICE_NAME = "envoy.service.secret.v3.SecretDiscoveryService"
#: Encoded response bodies kept for sharing between streams.
MAX_ENCODED = 4096
#: Push tasks a rotation runs at most at once (each works through the streams that are behind, one at a time).
MAX_PUSHERS = 1024
#: Callers whose entitlement is remembered under the current rules (a reload re-evaluates every open stream;
#: streams of one Envoy node share a caller, so this turns 10k evaluations into a few hundred).
MAX_ENTITLED = 4096


class _Stream:
    """One open SDS stream, as the fan-out sees it: what it was last planned against, and how to reach it.

    Mutable on purpose and touched only from the event loop; slotted because 10k of them stay alive.
    """

    __slots__ = (
        "api",
        "caller",
        "context",
        "encode",
        "ending",
        "handler",
        "held",
        "lock",
        "pushing",
        "rules",
        "state",
        "version",
    )

    def __init__(
        self,
        api: str,
        caller: CallerInfo,
        context: grpc.aio.ServicerContext[Any, Any],
        state: StreamState[Any],
        encode: Callable[[Any], bytes],
        rules: Rules,
        handler: asyncio.Task[Any] | None,
        held: set[SpiffeId],
    ) -> None:
        self.api = api
        self.caller = caller
        self.context = context
        self.state = state
        self.encode = encode
        self.rules = rules
        self.handler = handler
        #: The templated SVIDs this stream holds (minted on demand, released when it closes).
        self.held = held
        self.lock = asyncio.Lock()
        #: Snapshot version the stream was last planned against by the fan-out (-1: before registration).
        self.version = -1
        #: A push task is running for this stream (at most one: it loops until the stream is current).
        self.pushing = False
        #: The state machine planned the end of the stream; the handler returns OK.
        self.ending = False


def _serialize(message: Any) -> bytes:
    # Streams hand pre-encoded bytes (see `_encode_sotw`); FetchSecrets hands a message.
    return message if type(message) is bytes else message.SerializeToString()


class SdsSettings(Protocol):
    """What the SDS servicer reads of its settings (the ``sds:`` section, `svidgate.config.SdsConfig`)."""

    @property
    def default_svid_name(self) -> str: ...
    @property
    def own_bundle_name(self) -> str: ...
    @property
    def all_bundles_name(self) -> str: ...
    @property
    def validation(self) -> Validation: ...
    @property
    def istio_compat(self) -> bool: ...
    @property
    def pool_trust_domain_roots_unsafe(self) -> bool: ...


def naming_from_config(sds: SdsSettings, trust_domain: TrustDomain) -> Naming:
    """The `Naming` rules from the SDS settings (the ``sds:`` section) and the own trust domain."""
    return Naming(
        trust_domain=trust_domain,
        default_svid_name=sds.default_svid_name,
        own_bundle_name=sds.own_bundle_name,
        all_bundles_name=sds.all_bundles_name,
        validation=sds.validation,
        istio_compat=sds.istio_compat,
        pool_trust_domain_roots=sds.pool_trust_domain_roots_unsafe,
    )


def check_node(node: Any) -> None:
    """Refuse an Envoy `Node` whose id or cluster is longer than `MAX_NODE_FIELD_LENGTH`.

    Args:
        node: the request's `config.core.v3.Node` (an unset node is empty and passes).

    Raises:
        InvalidRequestError: `node.id` or `node.cluster` is too long.
    """
    for field, value in (("node.id", node.id), ("node.cluster", node.cluster)):
        if len(value) > MAX_NODE_FIELD_LENGTH:
            raise InvalidRequestError(
                f"{field} is {len(value)} characters long; at most {MAX_NODE_FIELD_LENGTH} are allowed"
            )


def _shown(name: str) -> str:
    return name if len(name) <= MAX_NAME_LOG else name[: MAX_NAME_LOG - 3] + "..."


def _error_of(
    request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest,
) -> tuple[int, str] | None:
    if not request.HasField("error_detail"):
        return None
    return request.error_detail.code, request.error_detail.message[:MAX_ERROR_LOG]


def _any_resources(resources: Sequence[SecretResource]) -> list[Any]:
    return [r.resource for r in resources]


class SecretDiscoveryServicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """SDS for Envoy.

    Args:
        feed: the identity snapshots to serve.
        workloads: `Config.workloads` (who is entitled to which SPIFFE ID).
        sds: `Config.sds` (resource names, validation flavour, Istio compatibility).
        trust_domain: the own trust domain (`Config.trust_domain`; the ``ROOTCA`` bundle).
        peers: the peer-credentials registry of the unix-socket front, or None (TCP only / no front).
        metrics: collectors, or None to record nothing.
        clock: the time source (kept for expiry-aware logging; SDS decisions never depend on time).
        templated: mints the SVIDs of templated workloads on demand (the built-in source), or None when
            the configuration has none.
        changes: the rules in force and the wake-up of every stream (`svidgate.changes.ChangeSignal` of
            `feed`), shared with the Workload API by the runtime; given it, `workloads` is not used (the
            signal holds them). Default: a signal of its own over `workloads`.
    """

    def __init__(
        self,
        feed: SnapshotFeed,
        workloads: Sequence[Workload],
        sds: SdsSettings,
        trust_domain: TrustDomain,
        peers: PeerRegistry | None = None,
        metrics: SdsMetrics | None = None,
        clock: Clock = system_clock,
        templated: TemplatedSvids | None = None,
        changes: ChangeSignal | None = None,
    ) -> None:
        self._feed = feed
        self._templated = templated
        # The rules in force, and woken whenever the snapshot or the rules change; see the module docstring.
        self._changes = changes if changes is not None else ChangeSignal(feed, workloads)
        # Entitlements remembered under one `Rules` object: new rules start a new memo.
        self._entitled: tuple[Rules | None, BoundedDict[CallerInfo, Entitlement]] = (
            None,
            BoundedDict(MAX_ENTITLED),
        )
        self._naming = naming_from_config(sds, trust_domain)
        self._peers = peers
        self._metrics = metrics
        self._clock = clock
        self._resolver: SecretResolver | None = None
        # Keys are content hashes, so entries never go stale; the bound only limits memory (distinct
        # subscriptions x snapshots). Starting afresh when full is fine: a miss costs one serialisation.
        self._encoded: BoundedDict[tuple[str, ...], bytes] = BoundedDict(MAX_ENCODED)
        # The open streams the fan-out keeps current; the one task that follows the changes while any is open.
        self._streams: set[_Stream] = set()
        self._fanout: asyncio.Task[None] | None = None
        # Streams waiting for a push, and the pusher tasks working through them.
        self._behind: deque[_Stream] = deque()
        self._pushers: set[asyncio.Task[None]] = set()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register this servicer on `server` (create the server with `SERVER_OPTIONS`).

        Registered by hand rather than with the generated `add_..._to_server` so that responses may be
        pre-encoded bytes (see `_encode_sotw`).
        """
        handlers = {
            "StreamSecrets": grpc.stream_stream_rpc_method_handler(
                self.StreamSecrets,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_serialize,
            ),
            "DeltaSecrets": grpc.stream_stream_rpc_method_handler(
                self.DeltaSecrets,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_serialize,
            ),
            "FetchSecrets": grpc.unary_unary_rpc_method_handler(
                self.FetchSecrets,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_serialize,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]

    def _encode_sotw(self, response: SotwResponse) -> bytes:
        """The wire bytes of a `DiscoveryResponse`, sharing the expensive part between streams.

        A rotation sends the same few secrets to thousands of streams that differ only in `version_info` and
        `nonce`. Protobuf messages may be concatenated (fields merge; a scalar field set once is simply set),
        so the `resources` + `type_url` part is encoded once per distinct content and each stream appends its
        own two small fields. Measured on 10k streams: this halves the server CPU of a rotation's fan-out.
        The per-stream rest (`state_version` and this tail) is left unshared on purpose: measured at ~2.6 us
        per stream (5k streams under cProfile: ~1-2% of a rotation's fan-out, which is the gRPC writes and
        the event loop), less than a cache keyed by the stream's (name, version) pairs would cost to look up.
        """
        key = ("sotw", *(r.version + r.name for r in response.resources))
        body = self._encoded.get(key)
        if body is None:
            body = discovery_pb2.DiscoveryResponse(
                resources=_any_resources(response.resources), type_url=SECRET_TYPE_URL
            ).SerializeToString()
            assert isinstance(body, bytes)
            self._remember(key, body)
        tail: bytes = discovery_pb2.DiscoveryResponse(
            version_info=response.version_info, nonce=response.nonce
        ).SerializeToString()
        return body + tail

    def _encode_delta(self, response: DeltaResponse) -> bytes:
        """The wire bytes of a `DeltaDiscoveryResponse` (shared part cached as in `_encode_sotw`)."""
        key = ("delta", *(r.version + r.name for r in response.resources), "", *response.removed)
        body = self._encoded.get(key)
        if body is None:
            body = discovery_pb2.DeltaDiscoveryResponse(
                resources=[
                    discovery_pb2.Resource(name=r.name, version=r.version, resource=r.resource)
                    for r in response.resources
                ],
                removed_resources=response.removed,
                type_url=SECRET_TYPE_URL,
            ).SerializeToString()
            assert isinstance(body, bytes)
            self._remember(key, body)
        tail: bytes = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=response.system_version_info, nonce=response.nonce
        ).SerializeToString()
        return body + tail

    def _remember(self, key: tuple[str, ...], body: bytes) -> None:
        self._encoded.put(key, body)

    def update_workloads(self, workloads: Sequence[Workload]) -> None:
        """Swap the entitlement rules (config reload); every open stream re-evaluates its caller against them.

        A stream pushes what the new rules grant and withdraws what they take away (delta: removed_resources;
        SotW: the stream ends with OK, see `svidgate.sds.stream`). Must be called from the event loop.

        Args:
            workloads: `Config.workloads` of the new configuration.
        """
        self._changes.swap_rules(workloads)

    @property
    def _rules(self) -> Rules:
        return self._changes.rules

    # -- change notification ---------------------------------------------------------------------------------

    async def _follow_changes(self) -> None:
        """The fan-out loop: on every snapshot publication and reload, bring each open stream up to date."""
        changes = self._changes
        changes.watch_started()  # relays snapshot publications into the signal
        try:
            while True:
                wake = changes.current()  # taken before looking: any later change sets it
                self._push_all()
                await wake.wait()
        finally:
            changes.watch_stopped()

    def _push_all(self) -> None:
        rules = self._rules
        version = self._feed.current().version
        for stream in self._streams:
            if not stream.pushing and (stream.version != version or stream.rules is not rules):
                self._start_push(stream)

    def _start_push(self, stream: _Stream) -> None:
        stream.pushing = True
        self._behind.append(stream)
        if len(self._pushers) < MAX_PUSHERS:
            pusher = asyncio.create_task(self._work_through())
            self._pushers.add(pusher)
            pusher.add_done_callback(self._pushers.discard)

    async def _work_through(self) -> None:
        # A bounded pool rather than a task per stream: a rotation reaching 10k streams then allocates a few
        # hundred tasks, not 10k (their garbage alone cost ~0.2 s of collections per rotation, measured with
        # bench/sds_streams.py), while enough writes stay in flight to keep grpc-core busy.
        behind = self._behind
        while behind:
            await self._push(behind.popleft())

    async def _push(self, stream: _Stream) -> None:
        """Re-plan `stream` against the current snapshot and rules and write what changed, until it is
        current (a publication while it writes is picked up by the next round here, not by another task)."""
        try:
            async with stream.lock:
                while not stream.ending and stream in self._streams:
                    rules = self._rules
                    if rules is not stream.rules:
                        # May mint a templated SVID the new rules grant (a new snapshot): before reading it.
                        await self._hold(stream.held, self._entitlement(rules, stream.caller), stream.caller)
                    snapshot = self._feed.current()
                    if snapshot.version == stream.version and rules is stream.rules:
                        return
                    resolver = self.resolver_for(snapshot)
                    if rules is stream.rules:
                        step = stream.state.on_snapshot(resolver)
                    else:
                        subscriber = self._reevaluated(
                            rules, stream.caller, stream.api, stream.state.subscriber
                        )
                        step = stream.state.on_entitlement(subscriber, resolver)
                        stream.rules = rules
                    stream.version = snapshot.version
                    if await self._send(stream, step):
                        # The handler is waiting for Envoy's next request (it cannot be writing: this task
                        # holds the lock): cancel that wait and let it return normally, which grpc.aio turns
                        # into status OK.
                        stream.ending = True
                        if stream.handler is not None:
                            stream.handler.cancel()
                        return
        except Exception as err:
            # A write to a call the client just cancelled: its handler sees the end and closes the stream.
            log.debug("sds.push_failed", extra={"fields": {**stream.caller.describe(), "error": repr(err)}})
        finally:
            stream.pushing = False

    def _register(self, stream: _Stream, version: int) -> None:
        stream.version = version
        self._streams.add(stream)
        if self._fanout is None:
            self._fanout = asyncio.create_task(self._follow_changes())
        if self._feed.current().version != version or self._rules is not stream.rules:
            self._start_push(stream)  # changed while the stream's first answer was being written

    def _unregister(self, stream: _Stream) -> None:
        self._streams.discard(stream)
        if not self._streams and self._fanout is not None:
            self._fanout.cancel()
            self._fanout = None

    # -- shared ----------------------------------------------------------------------------------------------

    def resolver_for(self, snapshot: IdentitySnapshot) -> SecretResolver:
        """The resolver of `snapshot`, shared by every stream (each secret is built once per snapshot)."""
        resolver = self._resolver
        if resolver is None or resolver.snapshot is not snapshot:
            resolver = self._resolver = SecretResolver(snapshot, self._naming)
        return resolver

    def _caller(self, node: Any, context: grpc.aio.ServicerContext[Any, Any]) -> CallerInfo:
        """The caller: peer credentials from the front (if any), and the Envoy node unless `node` is None."""
        caller = None
        if self._peers is not None:
            caller = self._peers.lookup(context.peer())
        caller = caller or CallerInfo()
        return caller if node is None else caller.with_node(node.id, node.cluster)

    def _validation(self, node: Any, caller: CallerInfo) -> Validation:
        requested = None
        field = node.metadata.fields.get(VALIDATION_METADATA_KEY) if node.HasField("metadata") else None
        if field is not None:
            requested = field.string_value
            if requested not in ("spiffe", "trusted_ca"):
                log.warning(
                    "sds.bad_node_metadata",
                    extra={
                        "fields": {
                            **caller.describe(),
                            "key": VALIDATION_METADATA_KEY,
                            "value": requested[:100],
                            "using": self._naming.validation,
                        }
                    },
                )
        return parse_validation(requested, self._naming.validation)

    def _entitlement(self, rules: Rules, caller: CallerInfo) -> Entitlement:
        if rules is not self._rules:  # superseded while the caller waited: not worth remembering
            entitlement = entitle(rules.workloads, caller)
        else:
            owner, memo = self._entitled
            if owner is not rules:
                memo = BoundedDict(MAX_ENTITLED)
                self._entitled = (rules, memo)
            cached = memo.get(caller)
            if cached is not None:
                return cached
            entitlement = entitle(rules.workloads, caller)
            memo.put(caller, entitlement)
        for template, reason in entitlement.refused:
            # Logged when computed (once per caller and rules), not on every request.
            log.warning(
                "sds.templated_id_refused",
                extra={"fields": {**caller.describe(), "template": template, "error": reason}},
            )
            if self._metrics is not None:
                self._metrics.templated_ids_refused.inc()
        return entitlement

    async def _hold(self, held: set[SpiffeId], entitlement: Entitlement, caller: CallerInfo) -> None:
        """Hold the templated SVIDs of `entitlement` that `held` does not hold yet, and release those it no
        longer grants."""
        templated = self._templated
        if templated is None:
            return
        for spiffe_id in [i for i in held if i not in entitlement.templated]:
            held.discard(spiffe_id)
            templated.release(spiffe_id)
        for spiffe_id, workload in entitlement.templated.items():
            if spiffe_id in held:
                continue
            held.add(spiffe_id)
            try:
                await templated.acquire(spiffe_id, workload)
            except SourceError as exc:
                # Held anyway: the source retries at its next step and the stream pushes it then.
                log.error(
                    "sds.templated_svid_failed",
                    extra={"fields": {**caller.describe(), "spiffe_id": str(spiffe_id), "error": str(exc)}},
                )

    def _release(self, held: set[SpiffeId]) -> None:
        if self._templated is not None:
            for spiffe_id in held:
                self._templated.release(spiffe_id)
        held.clear()

    def _subscriber(self, rules: Rules, caller: CallerInfo, validation: Validation) -> Subscriber:
        entitled = self._entitlement(rules, caller).ids
        if not entitled:
            log.warning(
                "sds.caller_not_entitled",
                extra={
                    "fields": {
                        **caller.describe(),
                        "detail": "no workloads[] entry matches this caller: it gets bundles but no SVID",
                    }
                },
            )
        return Subscriber(entitled, validation)

    def _reevaluated(self, rules: Rules, caller: CallerInfo, api: str, old: Subscriber) -> Subscriber:
        entitled = self._entitlement(rules, caller).ids
        if entitled == old.entitled:
            return old
        log.info(
            "sds.entitlement_changed",
            extra={
                "fields": {
                    **caller.describe(),
                    "api": api,
                    "before": [str(i) for i in old.entitled],
                    "after": [str(i) for i in entitled],
                }
            },
        )
        return Subscriber(entitled, old.validation)

    def _report(self, events: Sequence[Event], caller: CallerInfo, api: str) -> None:
        metrics = self._metrics
        rejected = [event for event in events if isinstance(event, Rejected)]
        if rejected:
            self._report_rejected(rejected, caller, api)
        for event in events:
            if isinstance(event, Ack):
                log.debug(
                    "sds.ack", extra={"fields": {**caller.describe(), "api": api, "nonce": event.nonce}}
                )
                if metrics is not None:
                    for name, _ in event.resources:
                        metrics.acks.labels(resource=name).inc()
            elif isinstance(event, Nack):
                # The NACKed content is remembered by the stream and not pushed again until it changes.
                log.warning(
                    "sds.nack",
                    extra={
                        "fields": {
                            **caller.describe(),
                            "api": api,
                            "nonce": event.nonce,
                            "resources": {name: version for name, version in event.resources},
                            "code": event.code,
                            "error": event.message,
                        }
                    },
                )
                if metrics is not None:
                    for name, _ in event.resources:
                        metrics.nacks.labels(resource=name).inc()
            elif isinstance(event, StaleNonce):
                log.debug(
                    "sds.stale_nonce",
                    extra={"fields": {**caller.describe(), "nonce": event.nonce, "expected": event.expected}},
                )
            elif isinstance(event, Rejected):
                pass  # summarised below: one line per request, not one per name
            elif isinstance(event, Removed):
                log.info(
                    "sds.resource_removed",
                    extra={"fields": {**caller.describe(), "api": api, "resource": event.name}},
                )
            elif isinstance(event, Withdrawn):
                log.warning(
                    "sds.stream_ended_withdrawn",
                    extra={
                        "fields": {
                            **caller.describe(),
                            "api": api,
                            "resources": {r.name: r.reason for r in event.rejections},
                            "effect": "stream closed with OK (SotW cannot withdraw a secret): Envoy "
                            "reconnects and these names are refused from now on; the copy Envoy holds is "
                            "never rotated again and stops working when it expires",
                        }
                    },
                )

    def _report_rejected(self, rejected: Sequence[Rejected], caller: CallerInfo, api: str) -> None:
        """One warning for all the names of one request (or one re-plan) that cannot be served.

        A request may carry up to `MAX_RESOURCE_NAMES` junk names: one line each would let a client flood the
        log and hold the event loop (the security review measured a 150k-name request writing 150k lines).
        """
        reasons = Counter(event.rejection.reason for event in rejected)
        shown = rejected[:MAX_NAMES_LOGGED]
        fields: dict[str, object] = {
            **caller.describe(),
            "api": api,
            "count": len(rejected),
            "reasons": dict(reasons),
            "resources": {_shown(e.rejection.name): e.rejection.reason for e in shown},
            "details": {_shown(e.rejection.name): e.rejection.detail for e in shown},
            "previously_served": [_shown(e.rejection.name) for e in shown if e.previously_served],
            "effect": "not sent; Envoy keeps waiting for it (listeners/clusters using it stay warming until "
            "initial_fetch_timeout) and keeps any copy it already has",
        }
        if len(rejected) > len(shown):
            fields["not_shown"] = len(rejected) - len(shown)
        log.warning("sds.resource_rejected", extra={"fields": fields})
        if self._metrics is not None:
            for reason, count in reasons.items():
                self._metrics.rejected_names.labels(reason=reason).inc(count)

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        caller: CallerInfo,
        api: str,
        error: InvalidRequestError,
    ) -> NoReturn:
        """End the call with INVALID_ARGUMENT for a request refused whole (too many names, oversized node).

        Raises:
            grpc.aio.AbortError: always (`context.abort`); grpc.aio turns it into the status.
        """
        log.warning(
            "sds.request_refused",
            extra={
                "fields": {
                    **caller.describe(),
                    "api": api,
                    "peer": context.peer(),
                    "error": str(error),
                    "effect": "the call ends with INVALID_ARGUMENT (a stream is closed)",
                }
            },
        )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    def _log_push(
        self, caller: CallerInfo, api: str, nonce: str, resources: Sequence[SecretResource]
    ) -> None:
        if self._metrics is not None:
            for resource in resources:
                self._metrics.pushes.labels(resource=resource.name).inc()
        if log.isEnabledFor(logging.INFO):
            log.info(
                "sds.push",
                extra={
                    "fields": {
                        **caller.describe(),
                        "api": api,
                        "nonce": nonce,
                        "resources": {r.name: r.version for r in resources},
                        "sources": {r.name: r.source for r in resources},
                    }
                },
            )

    # -- the stream driver (both flavours) -------------------------------------------------------------------

    async def _serve(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        api: str,
        new_state: Callable[[Subscriber], _S],
        on_request: Callable[[_S, Any, SecretResolver], Step[_R]],
        encode: Callable[[_R], bytes],
    ) -> None:
        """Run one SDS stream: `new_state` builds its state machine, `on_request` feeds it one request,
        `encode` turns a planned response into wire bytes. Returns when the client is done, or (with OK) when
        the state machine plans the stream's end."""
        first = await context.read()
        if first is _EOF:
            return
        try:
            check_node(first.node)
        except InvalidRequestError as err:
            # Not logged with the node: it is what is too long.
            await self._refuse(context, self._caller(None, context), api, err)
        caller = self._caller(first.node, context)
        rules = self._rules
        held: set[SpiffeId] = set()
        try:
            await self._hold(held, self._entitlement(rules, caller), caller)
        except BaseException:
            self._release(held)
            raise
        state = new_state(self._subscriber(rules, caller, self._validation(first.node, caller)))
        stream = _Stream(api, caller, context, state, encode, rules, asyncio.current_task(), held)
        request: Any = first
        del first  # `request` holds the latest request; an idle stream keeps no older one alive
        self._stream_opened(api, caller)
        registered = False
        try:
            while request is not _EOF:
                if request.type_url and request.type_url != SECRET_TYPE_URL:
                    log.warning(
                        "sds.wrong_type_url",
                        extra={"fields": {**caller.describe(), "type_url": request.type_url[:200]}},
                    )
                else:
                    version = await self._answer(stream, request, on_request)
                    if version is None:
                        return
                    if not registered:
                        registered = True
                        self._register(stream, version)
                request = await context.read()
        except asyncio.CancelledError:
            if not stream.ending:
                raise  # the client went away or the server is stopping
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            if registered:
                self._unregister(stream)
            self._release(held)
            self._stream_closed(api, caller)

    async def _answer(
        self, stream: _Stream, request: Any, on_request: Callable[[Any, Any, SecretResolver], Step[Any]]
    ) -> int | None:
        """Plan and write the answer to one request. Returns the snapshot version it was planned against, or
        None when the stream must end. (A method of its own so that the planned response is not kept alive by
        the handler's frame while the stream idles.)"""
        async with stream.lock:
            if stream.ending:
                return None
            snapshot = self._feed.current()
            try:
                check_node(request.node)  # Envoy may repeat the node on every request
                step = on_request(stream.state, request, self.resolver_for(snapshot))
            except InvalidRequestError as err:
                await self._refuse(stream.context, stream.caller, stream.api, err)
            if await self._send(stream, step):
                return None
            return snapshot.version

    async def _send(self, stream: _Stream, step: Step[Any]) -> bool:
        """Report and write `step`; True when the stream must end."""
        if step.events:
            self._report(step.events, stream.caller, stream.api)
        if step.end_stream:
            return True
        response = step.response
        if response is not None:
            self._log_push(stream.caller, stream.api, response.nonce, response.resources)
            await stream.context.write(stream.encode(response))
        return False

    # -- StreamSecrets (state of the world) ------------------------------------------------------------------

    async def StreamSecrets(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse],
    ) -> None:
        await self._serve(context, "sotw", SotwStream, _sotw_request, self._encode_sotw)

    # -- DeltaSecrets (incremental) --------------------------------------------------------------------------

    async def DeltaSecrets(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[
            discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse
        ],
    ) -> None:
        await self._serve(context, "delta", DeltaStream, _delta_request, self._encode_delta)

    # -- FetchSecrets (unary) --------------------------------------------------------------------------------

    async def FetchSecrets(
        self,
        request: discovery_pb2.DiscoveryRequest,
        context: grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse],
    ) -> discovery_pb2.DiscoveryResponse:
        try:
            check_node(request.node)
        except InvalidRequestError as err:
            await self._refuse(context, self._caller(None, context), "fetch", err)
        caller = self._caller(request.node, context)
        try:
            check_resource_names("resource_names", len(request.resource_names))
        except InvalidRequestError as err:
            await self._refuse(context, caller, "fetch", err)
        held: set[SpiffeId] = set()
        try:
            # Held only for the answer: the SVID then stays `TEMPLATED_IDLE` for the next fetch.
            await self._hold(held, self._entitlement(self._rules, caller), caller)
            subscriber = self._subscriber(self._rules, caller, self._validation(request.node, caller))
            resolver = self.resolver_for(self._feed.current())
            names = list(dict.fromkeys(request.resource_names)) or list(resolver.wildcard_names(subscriber))
            resources: list[SecretResource] = []
            events: list[Event] = []
            for name in names:
                resolved = resolver.resolve(name, subscriber)
                if isinstance(resolved, Rejection):
                    events.append(Rejected(resolved, False))
                else:
                    resources.append(resolved)
        finally:
            self._release(held)
        self._report(events, caller, "fetch")
        return discovery_pb2.DiscoveryResponse(
            version_info=state_version((r.name, r.version) for r in resources),
            resources=_any_resources(resources),
            type_url=SECRET_TYPE_URL,
        )

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def _stream_opened(self, api: str, caller: CallerInfo) -> None:
        if self._metrics is not None:
            self._metrics.streams.labels(api=api).inc()
        log.info("sds.stream_opened", extra={"fields": {**caller.describe(), "api": api}})

    def _stream_closed(self, api: str, caller: CallerInfo) -> None:
        if self._metrics is not None:
            self._metrics.streams.labels(api=api).dec()
        log.info("sds.stream_closed", extra={"fields": {**caller.describe(), "api": api}})


def _sotw_request(
    state: SotwStream, request: discovery_pb2.DiscoveryRequest, resolver: SecretResolver
) -> Step[SotwResponse]:
    # The repeated fields are passed as they are (they are sequences): copying them would cost time in
    # proportion to a request the stream may be about to refuse.
    return state.on_request(
        request.resource_names,
        request.version_info,
        request.response_nonce,
        _error_of(request),
        resolver,
    )


def _delta_request(
    state: DeltaStream, request: discovery_pb2.DeltaDiscoveryRequest, resolver: SecretResolver
) -> Step[DeltaResponse]:
    return state.on_request(
        request.resource_names_subscribe,
        request.resource_names_unsubscribe,
        request.initial_resource_versions,
        request.response_nonce,
        _error_of(request),
        resolver,
    )
