"""`SpireSource`: identities streamed from an upstream SPIRE agent's Workload API.

svidgate is then one workload of the agent: whatever X.509-SVIDs the agent issues to svidgate's process (its
registration entries select svidgate's uid, for instance) become the snapshot's SVIDs, and the agent's X.509
and JWT bundles (its own trust domain and every federated one) become the snapshot's bundles. JWT-SVIDs are
minted by the agent (FetchJWTSVID), never by svidgate, which holds no JWT signing key in this mode.

Two streams feed the snapshot: FetchX509SVID (SVIDs, own X.509 bundle, federated X.509 bundles) and
FetchJWTBundles (JWT authorities per trust domain). When the agent goes away (restart, upgrade), each stream
reconnects with capped exponential backoff and jitter, on a fresh channel so that gRPC's own reconnect
backoff (up to two minutes) never adds to ours; the last snapshot stays in force meanwhile, as
SPIFFE_Workload_API.md 4.2 expects of a client.

The agent's bundles pass the acceptance rules of every other source (svidgate.identity.bundle): authorities
that can never be trust anchors are left out, and an update that would leave a trust domain without a usable
authority for a use it had is reported and the last good bundle of that trust domain kept.

Health (`statuses()`): the source is up while both streams are delivering; its last success is "now" while
they are, and the moment one was lost once it is not. A lost agent therefore shows in
`svidgate_source_up{source="spire"}` at once, and in `/readyz` once the SVIDs it left behind run low (see
`svidgate.server`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from cryptography.hazmat.primitives import serialization

from svidgate._gen import workload_pb2
from svidgate.errors import SourceError, SvidgateError
from svidgate.identity.bundle import (
    Bundle,
    BundleRejectionSink,
    bundle_update_rejection,
    report_bundle_rejection,
    report_rejected_authorities,
)
from svidgate.identity.clock import Clock, system_clock
from svidgate.identity.jwtsvid import JwtSvid, parse_jwt_svid_insecure
from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import X509Svid
from svidgate.sources.base import SourceStatus
from svidgate.workloadapi import SECURITY_HEADER, SERVICE_NAME
from svidgate.workloadapi.client import WorkloadApiClient, WorkloadApiError, grpc_target
from svidgate.workloadapi.messages import X509Context

__all__ = ["SpireSource"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: JWT-SVIDs from the agent are re-used until this fraction of their lifetime has passed (SPIRE's agent
#: itself refreshes its cached JWT-SVIDs at half-life).
_JWT_REUSE_FRACTION = 0.5
_JWT_CACHE_MAX = 1024


@dataclass(frozen=True, slots=True)
class _Backoff:
    initial: float
    maximum: float

    def delays(self) -> Callable[[bool], float]:
        """A stateful delay function: call with reset=True after a success, False after a failure."""
        state = {"next": self.initial}

        def delay(reset: bool) -> float:
            if reset:
                state["next"] = self.initial
                return 0.0
            current = state["next"]
            state["next"] = min(current * 2, self.maximum)
            # Full jitter on the upper half, so that many svidgates behind one restarted agent spread out.
            return current * (0.5 + random.random() / 2)  # noqa: S311 -- jitter, not security

        return delay


def _x509_fingerprint(context: X509Context) -> tuple[object, ...]:
    # The key is left out: a new key always comes with a new certificate.
    svids = tuple((str(s.spiffe_id), s.cert_chain_der(), s.hint) for s in context.svids)
    return svids, _bundles_fingerprint(context.bundles)


def _bundles_fingerprint(bundles: Mapping[TrustDomain, Bundle]) -> tuple[object, ...]:
    def spki(key: Any) -> bytes:
        return bytes(
            key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    return tuple(
        (
            td.name,
            tuple(c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities),
            tuple((kid, spki(key)) for kid, key in sorted(bundle.jwt_authorities.items())),
        )
        for td, bundle in sorted(bundles.items(), key=lambda item: item[0].name)
    )


class SpireSource:
    """An `IdentitySource` backed by a SPIRE agent (or any SPIFFE Workload API endpoint).

    Create it with `await SpireSource.connect(...)`, which returns once the first snapshot is published (the
    `IdentitySource` contract); then run `run()` as a background task.

    Args:
        endpoint: the agent's socket: a path, ``unix:///path`` or ``tcp://host:port``.
        clock: decides when a cached JWT-SVID is too old to hand out again.
        backoff_initial: first reconnect delay, seconds (doubles per failure, jittered).
        backoff_max: longest reconnect delay, seconds.
        timeout: deadline of each FetchJWTSVID call to the agent, seconds.
        trust_domain: the own trust domain, for the health label (None: taken from the agent's first SVID).
        on_bundle_rejected: told of every rejected bundle update (the runtime counts them).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        clock: Clock = system_clock,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        timeout: float = 5.0,
        trust_domain: TrustDomain | None = None,
        on_bundle_rejected: BundleRejectionSink | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._target = grpc_target(endpoint)
        self._clock = clock
        self._backoff = _Backoff(backoff_initial, backoff_max)
        self._timeout = timeout
        self.feed = SnapshotFeed()
        self._x509: X509Context | None = None
        self._jwt_bundles: Mapping[TrustDomain, Bundle] = {}
        self._x509_print: tuple[object, ...] | None = None
        self._jwt_print: tuple[object, ...] | None = None
        self._jwt_cache: dict[tuple[SpiffeId, tuple[str, ...]], JwtSvid] = {}
        self._sync_channel: grpc.Channel | None = None
        self._client: WorkloadApiClient | None = None
        self._last_error = "not tried"
        self._on_bundle_rejected = on_bundle_rejected
        # What was last reported per trust domain (a rejected update, authorities left out), so that an agent
        # message that only rotates an SVID does not report the same bundle again.
        self._reported: dict[TrustDomain, tuple[object, ...]] = {}
        #: Whether each upstream stream is currently delivering (for readiness checks and logs).
        self.connected = {"FetchX509SVID": False, "FetchJWTBundles": False}
        self._trust_domain = trust_domain
        self._last_success: float | None = None
        self._streams_lost = 0

    @classmethod
    async def connect(
        cls,
        endpoint: str,
        *,
        ready_timeout: float = 30.0,
        clock: Clock = system_clock,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        timeout: float = 5.0,
        trust_domain: TrustDomain | None = None,
        on_bundle_rejected: BundleRejectionSink | None = None,
    ) -> SpireSource:
        """Create a source and wait (retrying with backoff) until the agent has given it its X.509-SVIDs.

        The JWT bundles are fetched too; an agent that refuses them only logs a warning (`run()` retries).

        Args:
            endpoint: as for the constructor.
            ready_timeout: give up after this many seconds.
            clock, backoff_initial, backoff_max, timeout, trust_domain, on_bundle_rejected: as for the
                constructor.

        Returns:
            The source, its first snapshot published.

        Raises:
            SourceError: no X.509-SVID from the agent within `ready_timeout` (the message has the last error).
        """
        source = cls(
            endpoint,
            clock=clock,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            timeout=timeout,
            trust_domain=trust_domain,
            on_bundle_rejected=on_bundle_rejected,
        )
        try:
            await asyncio.wait_for(source._first_snapshot(), ready_timeout)
        except TimeoutError:
            raise SourceError(
                f"SPIRE agent at {endpoint}: no X.509-SVID within {ready_timeout:g}s ({source._last_error})"
            ) from None
        return source

    async def _first_snapshot(self) -> None:
        delay = self._backoff.delays()
        while True:
            try:
                async with WorkloadApiClient(self.endpoint) as client:
                    self._on_x509(await client.fetch_x509_context())
                    self._last_success = self._clock()
                    try:
                        self._on_jwt_bundles(await client.fetch_jwt_bundles())
                    except SvidgateError as exc:
                        log.warning("spire_source.jwt_bundles_failed", extra={"fields": {"error": str(exc)}})
                return
            except SvidgateError as exc:
                self._last_error = str(exc)
                pause = delay(False)
                log.warning(
                    "spire_source.connect_failed",
                    extra={
                        "fields": {"endpoint": self.endpoint, "error": str(exc), "retry_in": round(pause, 3)}
                    },
                )
                await asyncio.sleep(pause)

    # -- IdentitySource --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the agent's FetchX509SVID and FetchJWTBundles streams until cancelled; reconnect forever."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    self._follow("FetchX509SVID", WorkloadApiClient.watch_x509_context, self._on_x509)
                )
                group.create_task(
                    self._follow("FetchJWTBundles", WorkloadApiClient.watch_jwt_bundles, self._on_jwt_bundles)
                )
        finally:
            await self.close()

    def refresh(self) -> bool:
        """Nothing to poll: the agent pushes every change on the streams `run()` follows. Always False."""
        return False

    def statuses(self) -> list[SourceStatus]:
        """The agent's health: up while both streams deliver. (The agent brings federated bundles itself.)"""
        up = all(self.connected.values())
        trust_domain = self._trust_domain
        if trust_domain is None and self._x509 is not None and self._x509.svids:
            trust_domain = self._x509.svids[0].spiffe_id.trust_domain
        return [
            SourceStatus(
                "spire",
                trust_domain.name if trust_domain is not None else "",
                up,
                # A connected stream is the agent saying "nothing changed": it is fresh now.
                self._clock() if up else self._last_success,
                "" if up else self._last_error,
                {"stream_lost": self._streams_lost} if self._streams_lost else {},
            )
        ]

    def mint_jwt_svid(self, spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        """A JWT-SVID from the agent (FetchJWTSVID), re-used until half its lifetime has passed.

        Blocks the calling thread for the RPC on a cache miss; from a coroutine use `fetch_jwt_svid`.

        Raises:
            SourceError: the agent refused (not entitled, unavailable) or answered something unusable.
        """
        key = (spiffe_id, tuple(audience))
        cached = self._cached_jwt(key)
        if cached is not None:
            return cached
        if self._sync_channel is None:
            self._sync_channel = grpc.insecure_channel(self._target)
        call = self._sync_channel.unary_unary(
            f"/{SERVICE_NAME}/FetchJWTSVID",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=workload_pb2.JWTSVIDResponse.FromString,
        )
        request = workload_pb2.JWTSVIDRequest(audience=list(audience), spiffe_id=str(spiffe_id))
        try:
            response = call(request, metadata=(SECURITY_HEADER,), timeout=self._timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise WorkloadApiError(
                f"FetchJWTSVID for {spiffe_id}: {getattr(code, 'name', code)}: {details}", code
            ) from None
        return self._remember(key, self._jwt_from_response(spiffe_id, response))

    async def fetch_jwt_svid(self, spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        """`mint_jwt_svid` without blocking the event loop (what the Workload API servicer should call).

        Raises:
            SourceError: the agent refused or answered something unusable.
        """
        key = (spiffe_id, tuple(audience))
        cached = self._cached_jwt(key)
        if cached is not None:
            return cached
        if self._client is None:
            self._client = WorkloadApiClient(self.endpoint, timeout=self._timeout)
        svids = await self._client.fetch_jwt_svids(audience, spiffe_id)
        return self._remember(key, self._check_subject(spiffe_id, svids[0]))

    async def close(self) -> None:
        """Close the channels JWT-SVID requests use (the stream channels close with `run()`)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
        if self._sync_channel is not None:
            channel, self._sync_channel = self._sync_channel, None
            channel.close()

    # -- internals -------------------------------------------------------------------------------------------

    async def _follow(
        self,
        method: str,
        watch: Callable[[WorkloadApiClient], AsyncIterator[_T]],
        on_update: Callable[[_T], None],
    ) -> None:
        delay = self._backoff.delays()
        while True:
            error = "the stream ended"
            try:
                # A fresh channel per attempt: grpc's channel-level reconnect backoff would otherwise keep us
                # away from a restarted agent for up to 120 s after it is back.
                async with WorkloadApiClient(self.endpoint) as client:
                    async for update in watch(client):
                        on_update(update)
                        if not self.connected[method]:
                            self.connected[method] = True
                            log.info("spire_source.connected", extra={"fields": {"method": method}})
                        delay(True)
            except SvidgateError as exc:
                error = str(exc)
            if self.connected[method]:
                self._streams_lost += 1
                self._last_success = self._clock()  # it was delivering until now
            self.connected[method] = False
            self._last_error = f"{method}: {error}"
            pause = delay(False)
            log.warning(
                "spire_source.stream_lost",
                extra={"fields": {"method": method, "error": error, "retry_in": round(pause, 3)}},
            )
            await asyncio.sleep(pause)

    def _on_x509(self, context: X509Context) -> None:
        fingerprint = _x509_fingerprint(context)
        if fingerprint == self._x509_print:
            return
        self._x509, self._x509_print = context, fingerprint
        self._publish()

    def _on_jwt_bundles(self, bundles: Mapping[TrustDomain, Bundle]) -> None:
        fingerprint = _bundles_fingerprint(bundles)
        if fingerprint == self._jwt_print:
            return
        self._jwt_bundles, self._jwt_print = dict(bundles), fingerprint
        self._publish()

    def _publish(self) -> None:
        if self._x509 is None:
            return  # nothing to serve until the agent has issued our SVIDs
        svids: dict[SpiffeId, X509Svid] = {}
        for svid in self._x509.svids:
            svids.setdefault(svid.spiffe_id, svid)  # the agent's first (default) SVID wins on duplicates
        x509_bundles, jwt_bundles = self._x509.bundles, self._jwt_bundles
        held = self.feed.current().bundles
        bundles: dict[TrustDomain, Bundle] = {}
        # A trust domain the agent no longer lists is dropped (federation ended), not "rejected".
        for td in sorted({*x509_bundles, *jwt_bundles}, key=lambda td: td.name):
            x509_part, jwt_part = x509_bundles.get(td), jwt_bundles.get(td)
            candidate = Bundle(
                td,
                x509_authorities=x509_part.x509_authorities if x509_part is not None else (),
                jwt_authorities=jwt_part.jwt_authorities if jwt_part is not None else {},
                rejected_authorities=(
                    (x509_part.rejected_authorities if x509_part is not None else ())
                    + (jwt_part.rejected_authorities if jwt_part is not None else ())
                ),
            )
            bundle = self._accept(held.get(td), candidate)
            if bundle is not None:
                bundles[td] = bundle
        snapshot = IdentitySnapshot(svids, bundles, self.feed.current().version + 1)
        self.feed.publish(snapshot)
        log.info(
            "spire_source.snapshot",
            extra={
                "fields": {
                    "version": snapshot.version,
                    "spiffe_ids": [str(i) for i in svids],
                    "trust_domains": sorted(td.name for td in bundles),
                }
            },
        )

    def _accept(self, current: Bundle | None, candidate: Bundle) -> Bundle | None:
        """The bundle to serve for `candidate`'s trust domain: the candidate, or the last good one."""
        td = candidate.trust_domain
        print_ = (_bundles_fingerprint({td: candidate}), candidate.rejected_authorities)
        first_time = self._reported.get(td) != print_
        self._reported[td] = print_
        rejection = bundle_update_rejection(current, candidate)
        if rejection is not None:
            if first_time:
                report_bundle_rejection(
                    td, rejection, "SPIRE agent", kept_last=current is not None, sink=self._on_bundle_rejected
                )
            return current
        if first_time:
            report_rejected_authorities(candidate, "SPIRE agent")
        return candidate

    def _cached_jwt(self, key: tuple[SpiffeId, tuple[str, ...]]) -> JwtSvid | None:
        svid = self._jwt_cache.get(key)
        if svid is None:
            return None
        issued = svid.issued_at if svid.issued_at is not None else svid.expiry
        if self._clock() < issued + (svid.expiry - issued) * _JWT_REUSE_FRACTION:
            return svid
        del self._jwt_cache[key]
        return None

    def _remember(self, key: tuple[SpiffeId, tuple[str, ...]], svid: JwtSvid) -> JwtSvid:
        if len(self._jwt_cache) >= _JWT_CACHE_MAX:
            now = self._clock()
            self._jwt_cache = {k: v for k, v in self._jwt_cache.items() if v.expiry > now}
            if len(self._jwt_cache) >= _JWT_CACHE_MAX:
                self._jwt_cache.clear()
        self._jwt_cache[key] = svid
        return svid

    def _jwt_from_response(self, spiffe_id: SpiffeId, response: Any) -> JwtSvid:
        if not response.svids:
            raise WorkloadApiError(f"FetchJWTSVID for {spiffe_id}: the response has no SVID")
        try:
            svid = parse_jwt_svid_insecure(str(response.svids[0].svid))
        except SvidgateError as exc:
            raise WorkloadApiError(f"FetchJWTSVID for {spiffe_id}: unusable token: {exc}") from None
        return self._check_subject(spiffe_id, svid)

    @staticmethod
    def _check_subject(spiffe_id: SpiffeId, svid: JwtSvid) -> JwtSvid:
        if svid.spiffe_id != spiffe_id:
            raise WorkloadApiError(
                f"FetchJWTSVID for {spiffe_id}: the agent returned a token for {svid.spiffe_id}"
            )
        return svid
