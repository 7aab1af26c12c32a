"""The grpc.aio servicer of Envoy's SecretDiscoveryService: StreamSecrets, DeltaSecrets, FetchSecrets.

Thin on purpose: it identifies the caller (Envoy node from the first request, unix peer credentials through
the `PeerRegistry`), feeds requests and snapshots into the pure state machines of `svidgate.sds.stream`,
writes what they plan, and logs and counts what they report. Building secrets is `svidgate.sds.resources`.

Per stream: the handler coroutine reads requests; one task waits on the `SnapshotFeed` and pushes what
changed. A per-stream lock serialises planning and writing, so responses leave in the order their nonces were
issued.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from svidgate.identity.clock import Clock, system_clock
from svidgate.identity.entitlement import CallerInfo, entitled_ids
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
    Nack,
    Rejected,
    Removed,
    SotwResponse,
    SotwStream,
    StaleNonce,
    Step,
    state_version,
)

if TYPE_CHECKING:
    from svidgate.config import SdsConfig, Workload
    from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
    from svidgate.identity.spiffe_id import TrustDomain
    from svidgate.metrics import Metrics
    from svidgate.peercred import PeerRegistry

log = logging.getLogger(__name__)

# grpc-stubs does not declare grpc.aio.EOF (the sentinel `context.read()` returns at the end of a stream).
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009

#: Longest `error_detail.message` we log (Envoy's messages are short; this bounds a hostile client).
MAX_ERROR_LOG = 1000

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

_R = TypeVar("_R")

SERVICE_NAME = "envoy.service.secret.v3.SecretDiscoveryService"
#: Encoded response bodies kept for sharing between streams.
MAX_ENCODED = 4096


def _serialize(message: Any) -> bytes:
    # Streams hand pre-encoded bytes (see `_encode_sotw`); FetchSecrets hands a message.
    return message if type(message) is bytes else message.SerializeToString()


def naming_from_config(sds: SdsConfig, trust_domain: TrustDomain) -> Naming:
    """The `Naming` rules from the `sds:` config section and the own trust domain."""
    return Naming(
        trust_domain=trust_domain,
        default_svid_name=sds.default_svid_name,
        own_bundle_name=sds.own_bundle_name,
        all_bundles_name=sds.all_bundles_name,
        validation=sds.validation,
        istio_compat=sds.istio_compat,
    )


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
    """

    def __init__(
        self,
        feed: SnapshotFeed,
        workloads: Sequence[Workload],
        sds: SdsConfig,
        trust_domain: TrustDomain,
        peers: PeerRegistry | None = None,
        metrics: Metrics | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self._feed = feed
        self._workloads = tuple(workloads)
        self._naming = naming_from_config(sds, trust_domain)
        self._peers = peers
        self._metrics = metrics
        self._clock = clock
        self._resolver: SecretResolver | None = None
        self._encoded: dict[tuple[str, ...], bytes] = {}

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
        # Keys are content hashes, so entries never go stale; the bound only limits memory (distinct
        # subscriptions x snapshots). Clearing whole is fine: a miss costs one serialisation.
        if len(self._encoded) >= MAX_ENCODED:
            self._encoded.clear()
        self._encoded[key] = body

    def update_workloads(self, workloads: Sequence[Workload]) -> None:
        """Swap the entitlement rules (config reload). New streams use them; open streams keep theirs until
        Envoy reconnects, as Envoy's node does not change within a stream either."""
        self._workloads = tuple(workloads)

    # -- shared ----------------------------------------------------------------------------------------------

    def resolver_for(self, snapshot: IdentitySnapshot) -> SecretResolver:
        """The resolver of `snapshot`, shared by every stream (each secret is built once per snapshot)."""
        resolver = self._resolver
        if resolver is None or resolver.snapshot is not snapshot:
            resolver = self._resolver = SecretResolver(snapshot, self._naming)
        return resolver

    def _caller(self, node: Any, context: grpc.aio.ServicerContext[Any, Any]) -> CallerInfo:
        caller = None
        if self._peers is not None:
            caller = self._peers.lookup(context.peer())
        return (caller or CallerInfo()).with_node(node.id, node.cluster)

    def _subscriber(self, node: Any, caller: CallerInfo) -> Subscriber:
        entitled = entitled_ids(self._workloads, caller)
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
        return Subscriber(entitled, parse_validation(requested, self._naming.validation))

    def _report(self, events: Sequence[Event], caller: CallerInfo, api: str) -> None:
        metrics = self._metrics
        for event in events:
            if isinstance(event, Ack):
                log.debug(
                    "sds.ack", extra={"fields": {**caller.describe(), "api": api, "nonce": event.nonce}}
                )
                if metrics is not None:
                    for name, _ in event.resources:
                        metrics.sds_acks.labels(resource=name).inc()
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
                        metrics.sds_nacks.labels(resource=name).inc()
            elif isinstance(event, StaleNonce):
                log.debug(
                    "sds.stale_nonce",
                    extra={"fields": {**caller.describe(), "nonce": event.nonce, "expected": event.expected}},
                )
            elif isinstance(event, Rejected):
                rejection = event.rejection
                log.warning(
                    "sds.resource_rejected",
                    extra={
                        "fields": {
                            **caller.describe(),
                            "api": api,
                            "resource": rejection.name,
                            "reason": rejection.reason,
                            "detail": rejection.detail,
                            "previously_served": event.previously_served,
                            "effect": "not sent; Envoy keeps waiting for it (listeners/clusters using it "
                            "stay warming until initial_fetch_timeout) and keeps any copy it already has",
                        }
                    },
                )
                if metrics is not None:
                    metrics.sds_rejected_names.labels(reason=rejection.reason).inc()
            elif isinstance(event, Removed):
                log.info(
                    "sds.resource_removed",
                    extra={"fields": {**caller.describe(), "api": api, "resource": event.name}},
                )

    def _log_push(
        self, caller: CallerInfo, api: str, nonce: str, resources: Sequence[SecretResource]
    ) -> None:
        if self._metrics is not None:
            for resource in resources:
                self._metrics.sds_pushes.labels(resource=resource.name).inc()
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

    async def _watch(
        self,
        version: int,
        plan: Callable[[SecretResolver], Step[_R]],
        send: Callable[[Step[_R]], Any],
        lock: asyncio.Lock,
    ) -> None:
        """Push what changed whenever a newer snapshot is published (until cancelled)."""
        while True:
            snapshot = await self._feed.wait_newer(version)
            version = snapshot.version
            async with lock:
                await send(plan(self.resolver_for(self._feed.current())))

    # -- StreamSecrets (state of the world) ------------------------------------------------------------------

    async def StreamSecrets(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse],
    ) -> None:
        first = await context.read()
        if first is _EOF:
            return
        caller = self._caller(first.node, context)
        state = SotwStream(self._subscriber(first.node, caller))
        lock = asyncio.Lock()

        async def send(step: Step[SotwResponse]) -> None:
            if step.events:
                self._report(step.events, caller, "sotw")
            response = step.response
            if response is None:
                return
            self._log_push(caller, "sotw", response.nonce, response.resources)
            await context.write(self._encode_sotw(response))

        def on_snapshot(resolver: SecretResolver) -> Step[SotwResponse]:
            return state.on_snapshot(resolver)

        self._stream_opened("sotw", caller)
        watcher: asyncio.Task[None] | None = None
        try:
            request: Any = first
            while request is not _EOF:
                if request.type_url and request.type_url != SECRET_TYPE_URL:
                    log.warning(
                        "sds.wrong_type_url",
                        extra={"fields": {**caller.describe(), "type_url": request.type_url[:200]}},
                    )
                else:
                    async with lock:
                        snapshot = self._feed.current()
                        step = state.on_request(
                            list(request.resource_names),
                            request.version_info,
                            request.response_nonce,
                            _error_of(request),
                            self.resolver_for(snapshot),
                        )
                        await send(step)
                    if watcher is None:
                        watcher = asyncio.create_task(self._watch(snapshot.version, on_snapshot, send, lock))
                request = await context.read()
        finally:
            if watcher is not None:
                watcher.cancel()
            self._stream_closed("sotw", caller)

    # -- DeltaSecrets (incremental) --------------------------------------------------------------------------

    async def DeltaSecrets(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[
            discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse
        ],
    ) -> None:
        first = await context.read()
        if first is _EOF:
            return
        caller = self._caller(first.node, context)
        state = DeltaStream(self._subscriber(first.node, caller))
        lock = asyncio.Lock()

        async def send(step: Step[DeltaResponse]) -> None:
            if step.events:
                self._report(step.events, caller, "delta")
            response = step.response
            if response is None:
                return
            self._log_push(caller, "delta", response.nonce, response.resources)
            await context.write(self._encode_delta(response))

        def on_snapshot(resolver: SecretResolver) -> Step[DeltaResponse]:
            return state.on_snapshot(resolver)

        self._stream_opened("delta", caller)
        watcher: asyncio.Task[None] | None = None
        try:
            request: Any = first
            while request is not _EOF:
                if request.type_url and request.type_url != SECRET_TYPE_URL:
                    log.warning(
                        "sds.wrong_type_url",
                        extra={"fields": {**caller.describe(), "type_url": request.type_url[:200]}},
                    )
                else:
                    async with lock:
                        snapshot = self._feed.current()
                        step = state.on_request(
                            list(request.resource_names_subscribe),
                            list(request.resource_names_unsubscribe),
                            dict(request.initial_resource_versions),
                            request.response_nonce,
                            _error_of(request),
                            self.resolver_for(snapshot),
                        )
                        await send(step)
                    if watcher is None:
                        watcher = asyncio.create_task(self._watch(snapshot.version, on_snapshot, send, lock))
                request = await context.read()
        finally:
            if watcher is not None:
                watcher.cancel()
            self._stream_closed("delta", caller)

    # -- FetchSecrets (unary) --------------------------------------------------------------------------------

    async def FetchSecrets(
        self,
        request: discovery_pb2.DiscoveryRequest,
        context: grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse],
    ) -> discovery_pb2.DiscoveryResponse:
        caller = self._caller(request.node, context)
        subscriber = self._subscriber(request.node, caller)
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
        self._report(events, caller, "fetch")
        return discovery_pb2.DiscoveryResponse(
            version_info=state_version((r.name, r.version) for r in resources),
            resources=_any_resources(resources),
            type_url=SECRET_TYPE_URL,
        )

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def _stream_opened(self, api: str, caller: CallerInfo) -> None:
        if self._metrics is not None:
            self._metrics.sds_streams.labels(api=api).inc()
        log.info("sds.stream_opened", extra={"fields": {**caller.describe(), "api": api}})

    def _stream_closed(self, api: str, caller: CallerInfo) -> None:
        if self._metrics is not None:
            self._metrics.sds_streams.labels(api=api).dec()
        log.info("sds.stream_closed", extra={"fields": {**caller.describe(), "api": api}})
