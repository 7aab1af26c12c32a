"""`WorkloadApiServicer`: the five RPCs of the SPIFFE Workload API on grpc.aio.

Behaviour follows SPIFFE_Workload_API.md, SPIFFE_Workload_Endpoint.md and, where the standard leaves room,
SPIRE's agent (pkg/agent/endpoints/workload/handler.go):

- Every request must carry the metadata ``workload.spiffe.io: true``; without it the call fails with
  InvalidArgument (Endpoint 3 and 6), before anything else is looked at.
- The caller is identified by the kernel-verified credentials the peercred front recorded for its connection
  (`PeerRegistry.lookup(context.peer())`), never by anything the caller says. Its entitlement is
  `entitled_ids(workloads, caller)`, in configuration order; the first identity is the default (API 5.3).
- A caller entitled to nothing gets PermissionDenied ("no identity issued", as SPIRE words it): the X.509 and
  JWT-SVID RPCs by API 5.2.1/6.2.1, and the bundle streams too, as SPIRE does unless
  `allow_unauthenticated_verifiers` is set. A stream whose caller loses its last identity ends the same way
  (API 5.2.1: "returns a PermissionDenied ... the client SHOULD cease using the redacted SVIDs").
  ValidateJWTSVID needs an identified caller but no entitlement: validating reveals nothing (SPIRE agrees).
- A templated workload's SVID is held (`TemplatedSvids.acquire`, minted by the source on the first hold) while
  a FetchX509SVID stream serves it and while a FetchJWTSVID call mints for it; its ID is filled from the
  caller's attested pod. An ID whose values would not make a valid SPIFFE ID is not issued (logged, counted).
- Streams send the current state at once (API 4.3) and then a complete message whenever the snapshot or the
  workloads change; a message byte-identical to the previous one is not sent again.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import grpc
import grpc.aio

from svidgate._gen import workload_pb2, workload_pb2_grpc
from svidgate.changes import ChangeSignal
from svidgate.errors import SourceError, SpiffeIdError, SvidgateError
from svidgate.identity.clock import Clock, system_clock
from svidgate.identity.entitlement import CallerInfo, Entitlement, entitle
from svidgate.identity.jwtsvid import JwtSvid, validate_jwt_svid
from svidgate.identity.spiffe_id import SpiffeId
from svidgate.workloadapi import SECURITY_HEADER
from svidgate.workloadapi.messages import (
    Identity,
    claims_struct,
    jwt_bundles_response,
    unique_hints,
    x509_bundles_response,
    x509_svid_response,
)

if TYPE_CHECKING:
    from svidgate.identity.entitlement import Workload
    from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
    from svidgate.peercred import PeerRegistry
    from svidgate.sources.base import TemplatedSvids
    from svidgate.workloadapi.metrics import WorkloadApiMetrics

__all__ = ["MintJwtSvid", "WorkloadApiServicer"]

log = logging.getLogger(__name__)

#: Mints a JWT-SVID for one identity and audience: `IdentitySource.mint_jwt_svid`, or an async equivalent
#: (`SpireSource.fetch_jwt_svid`) so that a source which asks an upstream agent does not block the loop.
MintJwtSvid: TypeAlias = Callable[[SpiffeId, Sequence[str]], "JwtSvid | Awaitable[JwtSvid]"]

_Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

_NO_IDENTITY = "no identity issued"


class _RpcFailure(Exception):
    """Ends an RPC with a status; raised inside the handlers, turned into `context.abort` in one place."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.reason = reason


def _fail(code: grpc.StatusCode, details: str, reason: str) -> NoReturn:
    raise _RpcFailure(code, details, reason)


def _streaming_rpc(
    method: str, responses: str, doc: str
) -> Callable[[WorkloadApiServicer, Any, _Context], AsyncGenerator[Any, None]]:
    """A server-streaming RPC of `WorkloadApiServicer`: `_serve_stream(method)` over its `responses` method.

    The RPC must stay an async generator function: grpc.aio and the server's interceptors tell a streaming
    handler by that.

    Args:
        method: the RPC's name (for logs and metrics).
        responses: the name of the servicer method that builds a message from (caller, snapshot).
        doc: the RPC's docstring.
    """

    async def rpc(self: WorkloadApiServicer, request: Any, context: _Context) -> AsyncGenerator[Any, None]:
        # aclosing: when the client goes away or the server drains, the inner generator's cleanup (metrics,
        # logs) runs now rather than whenever the garbage collector finalises it.
        async with contextlib.aclosing(
            self._serve_stream(method, context, getattr(self, responses))
        ) as stream:
            async for response in stream:
                yield response

    rpc.__name__ = method
    rpc.__qualname__ = f"WorkloadApiServicer.{method}"
    rpc.__doc__ = doc
    return rpc


class WorkloadApiServicer:
    """The SPIFFE Workload API (`SpiffeWorkloadAPI`) served from an identity snapshot feed.

    Args:
        feed: the identity source's feed; SVIDs and bundles are read from its current snapshot.
        workloads: `Config.workloads`, who may receive which identity (replace with `set_workloads`).
        peers: the peercred front's registry of connections. None only where no front exists (tests, or a
            deliberately open socket): every caller then has no credentials and only `any` selectors match.
        mint_jwt_svid: mints a JWT-SVID for (SPIFFE ID, audience); may return the `JwtSvid` or an awaitable.
            `SvidgateError` from it becomes Unavailable.
        metrics: when given, records `svidgate_workload_api_streams` (calls by status code are the gRPC
            interceptor's `svidgate_grpc_server_handled_total`).
        clock: the time JWT-SVIDs are validated at.
        leeway: clock skew tolerated when validating JWT-SVIDs, seconds.
        allow_unauthenticated_verifiers: serve the bundle streams to callers entitled to no identity (SPIRE's
            option of the same name); off by default.
        templated: mints the SVIDs of templated workloads on demand (the built-in source), or None.
        changes: the rules in force and the wake-up of every stream (`svidgate.changes.ChangeSignal`),
            shared with SDS by the runtime; given it, `workloads` is not used. Default: a signal of its own.
    """

    def __init__(
        self,
        feed: SnapshotFeed,
        workloads: Sequence[Workload],
        peers: PeerRegistry | None,
        mint_jwt_svid: MintJwtSvid,
        metrics: WorkloadApiMetrics | None = None,
        clock: Clock = system_clock,
        *,
        leeway: float = 30.0,
        allow_unauthenticated_verifiers: bool = False,
        templated: TemplatedSvids | None = None,
        changes: ChangeSignal | None = None,
    ) -> None:
        self._feed = feed
        self._templated = templated
        self._peers = peers
        self._mint = mint_jwt_svid
        self._metrics = metrics
        self._clock = clock
        self._leeway = leeway
        self._allow_unauthenticated_verifiers = allow_unauthenticated_verifiers
        # The workloads in force, and woken whenever the snapshot or the workloads change (the same mechanism,
        # and with the runtime the same signal, as SDS).
        self._changes = changes if changes is not None else ChangeSignal(feed, workloads)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the service on `server` under its standard name (paths ``/SpiffeWorkloadAPI/...``)."""
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(self, server)

    def set_workloads(self, workloads: Sequence[Workload]) -> None:
        """Swap the workloads (config reload); open streams re-evaluate their caller's entitlement at once."""
        self._changes.swap_rules(workloads)

    @property
    def _workloads(self) -> tuple[Workload, ...]:
        return self._changes.rules.workloads

    # -- the five RPCs ---------------------------------------------------------------------------------------

    FetchX509SVID = _streaming_rpc(
        "FetchX509SVID",
        "_x509_svid_responses",
        "Stream the caller's X.509-SVIDs (default first), their bundles and the federated bundles.",
    )
    FetchX509Bundles = _streaming_rpc(
        "FetchX509Bundles",
        "_x509_bundles_responses",
        "Stream the X.509 bundles of every trust domain (own and federated).",
    )
    FetchJWTBundles = _streaming_rpc(
        "FetchJWTBundles",
        "_jwt_bundles_responses",
        "Stream the JWT bundles (one JWKS per trust domain).",
    )

    async def FetchJWTSVID(self, request: Any, context: _Context) -> Any:
        """Mint JWT-SVIDs for the requested audience: for every entitled identity, or the one requested."""
        return await self._serve_unary("FetchJWTSVID", context, request, self._fetch_jwt_svid)

    async def ValidateJWTSVID(self, request: Any, context: _Context) -> Any:
        """Validate a JWT-SVID for an audience against every known bundle; answer its SPIFFE ID and claims."""
        return await self._serve_unary("ValidateJWTSVID", context, request, self._validate_jwt_svid)

    # -- plumbing shared by the RPCs -------------------------------------------------------------------------

    def _caller(self, context: _Context) -> CallerInfo:
        # Endpoint 3: exactly one value, exactly "true" (case-sensitive), or InvalidArgument -- checked before
        # anything else, so an SSRF'd request learns nothing.
        key, expected = SECURITY_HEADER
        values = [value for name, value in (context.invocation_metadata() or ()) if name == key]
        if values != [expected]:
            _fail(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request", "missing_header")
        if self._peers is None:
            return CallerInfo()
        caller = self._peers.lookup(context.peer())
        if caller is None:
            # Not through the peercred front (the inner socket, or a connection the front already forgot):
            # there is nothing kernel-verified to entitle, so refuse rather than guess.
            _fail(grpc.StatusCode.PERMISSION_DENIED, "caller could not be identified", "unknown_peer")
        return caller

    def _identities(self, caller: CallerInfo, entitlement: Entitlement | None = None) -> tuple[Identity, ...]:
        workloads = self._workloads
        if entitlement is None:
            entitlement = entitle(workloads, caller)
        hints = {w.spiffe_id: w.hint for w in reversed(workloads)}  # reversed: the first workload's hint wins
        return unique_hints(
            Identity(
                spiffe_id,
                entitlement.templated[spiffe_id].hint
                if spiffe_id in entitlement.templated
                else hints.get(spiffe_id, ""),
            )
            for spiffe_id in entitlement.ids
        )

    def _entitle(self, caller: CallerInfo, refused_logged: set[tuple[str, str]] | None = None) -> Entitlement:
        """`entitle` for the current workloads; logs and counts templated IDs it refuses (once per stream)."""
        entitlement = entitle(self._workloads, caller)
        for refusal in entitlement.refused:
            if refused_logged is not None:
                if refusal in refused_logged:
                    continue
                refused_logged.add(refusal)
            log.warning(
                "workloadapi.templated_id_refused",
                extra={"fields": {**caller.describe(), "template": refusal[0], "error": refusal[1]}},
            )
            if self._metrics is not None:
                self._metrics.templated_ids_refused.inc()
        return entitlement

    async def _hold(self, held: set[SpiffeId], entitlement: Entitlement, caller: CallerInfo) -> None:
        """Hold the templated SVIDs `entitlement` grants that `held` lacks; release the ones it dropped."""
        templated = self._templated
        if templated is None:
            return
        for spiffe_id in [i for i in held if i not in entitlement.templated]:
            held.discard(spiffe_id)
            templated.release(spiffe_id)
        for spiffe_id, workload in entitlement.templated.items():
            if spiffe_id not in held:
                held.add(spiffe_id)
                try:
                    await templated.acquire(spiffe_id, workload)
                except SourceError as exc:
                    log.error(
                        "workloadapi.templated_svid_failed",
                        extra={
                            "fields": {**caller.describe(), "spiffe_id": str(spiffe_id), "error": str(exc)}
                        },
                    )

    def _release(self, held: set[SpiffeId]) -> None:
        if self._templated is not None:
            for spiffe_id in held:
                self._templated.release(spiffe_id)
        held.clear()

    def _require_entitlement(self, caller: CallerInfo) -> tuple[Identity, ...]:
        identities = self._identities(caller)
        if not identities and not self._allow_unauthenticated_verifiers:
            _fail(grpc.StatusCode.PERMISSION_DENIED, _NO_IDENTITY, "not_entitled")
        return identities

    async def _serve_stream(
        self,
        method: str,
        context: _Context,
        responses: Callable[[CallerInfo, IdentitySnapshot], Any | None],
    ) -> AsyncGenerator[Any, None]:
        """Send `responses(caller, snapshot)` now and after every change, skipping repeats and None."""
        gauge = self._metrics.streams.labels(method=method) if self._metrics else None
        if gauge is not None:
            gauge.inc()
        caller: CallerInfo | None = None
        held: set[SpiffeId] = set()
        refused_logged: set[tuple[str, str]] = set()
        watching = False
        try:
            caller = self._caller(context)
            log.info("workloadapi.stream.open", extra={"fields": {"method": method, **caller.describe()}})
            last_sent: bytes | None = None
            self._changes.watch_started()
            watching = True
            while True:
                wake = self._changes.current()  # taken before looking: any later change sets it
                snapshot = self._feed.current()
                if method == "FetchX509SVID":
                    await self._hold(held, self._entitle(caller, refused_logged), caller)
                    snapshot = self._feed.current()
                response = responses(caller, snapshot)
                if response is not None:
                    encoded = response.SerializeToString(deterministic=True)
                    if encoded != last_sent:
                        last_sent = encoded
                        yield response
                await wake.wait()
        except _RpcFailure as failure:
            self._log_failure(method, caller, failure)
            await context.abort(failure.code, failure.details)
        finally:
            if watching:
                self._changes.watch_stopped()
            self._release(held)
            if gauge is not None:
                gauge.dec()

    async def _serve_unary(
        self,
        method: str,
        context: _Context,
        request: Any,
        handler: Callable[[CallerInfo, Any], Awaitable[Any]],
    ) -> Any:
        caller: CallerInfo | None = None
        try:
            caller = self._caller(context)
            return await handler(caller, request)
        except _RpcFailure as failure:
            self._log_failure(method, caller, failure)
            await context.abort(failure.code, failure.details)

    @staticmethod
    def _log_failure(method: str, caller: CallerInfo | None, failure: _RpcFailure) -> None:
        fields: dict[str, object] = {"method": method, "code": failure.code.name, "reason": failure.reason}
        if caller is not None:
            fields.update(caller.describe())
        log.info("workloadapi.denied", extra={"fields": fields})

    # -- what each RPC answers -------------------------------------------------------------------------------

    def _x509_svid_responses(self, caller: CallerInfo, snapshot: IdentitySnapshot) -> Any:
        response = x509_svid_response(snapshot, self._identities(caller))
        if response is None:
            # Entitled to nothing, or to identities the source has not issued (yet): Endpoint 6 says
            # PermissionDenied and "retry with a backoff" for exactly this.
            _fail(grpc.StatusCode.PERMISSION_DENIED, _NO_IDENTITY, "no_identity")
        return response

    def _x509_bundles_responses(self, caller: CallerInfo, snapshot: IdentitySnapshot) -> Any | None:
        self._require_entitlement(caller)
        response = x509_bundles_response(snapshot)
        # API 5.2.2: the message MUST hold at least our own bundle; before the source has one, say nothing.
        return response if response.bundles else None

    def _jwt_bundles_responses(self, caller: CallerInfo, snapshot: IdentitySnapshot) -> Any | None:
        self._require_entitlement(caller)
        try:
            response = jwt_bundles_response(snapshot)
        except SvidgateError as exc:
            log.error("workloadapi.jwt_bundles_failed", extra={"fields": {"error": str(exc)}})
            _fail(grpc.StatusCode.UNAVAILABLE, "could not encode the JWT bundles", "encode_failed")
        return response if response.bundles else None

    async def _fetch_jwt_svid(self, caller: CallerInfo, request: Any) -> Any:
        # API 4.5: a mandatory field at its default value is InvalidArgument (checked before entitlement,
        # as SPIRE does, so a broken client learns about its bug first).
        audience = tuple(str(a) for a in request.audience)
        if not audience or any(not a for a in audience):
            _fail(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified", "missing_audience")
        entitlement = self._entitle(caller)
        identities = self._identities(caller, entitlement)
        if request.spiffe_id:
            try:
                wanted = SpiffeId.parse(str(request.spiffe_id))
            except SpiffeIdError as exc:
                _fail(grpc.StatusCode.INVALID_ARGUMENT, f"invalid spiffe_id: {exc}", "bad_spiffe_id")
            identities = tuple(i for i in identities if i.spiffe_id == wanted)
        if not identities:
            _fail(grpc.StatusCode.PERMISSION_DENIED, _NO_IDENTITY, "not_entitled")
        held: set[SpiffeId] = set()
        try:
            # The source mints JWT-SVIDs only for IDs it holds; held for the call (then idle, then dropped).
            wanted_ids = {i.spiffe_id for i in identities}
            await self._hold(
                held,
                Entitlement(
                    entitlement.ids, {k: v for k, v in entitlement.templated.items() if k in wanted_ids}
                ),
                caller,
            )
            return await self._mint_jwt_svids(identities, audience)
        finally:
            self._release(held)

    async def _mint_jwt_svids(self, identities: Sequence[Identity], audience: tuple[str, ...]) -> Any:
        response = workload_pb2.JWTSVIDResponse()
        for identity in identities:
            try:
                minted = self._mint(identity.spiffe_id, audience)
                svid = await minted if inspect.isawaitable(minted) else minted
            except SvidgateError as exc:
                log.warning(
                    "workloadapi.jwt_svid_failed",
                    extra={"fields": {"spiffe_id": str(identity.spiffe_id), "error": str(exc)}},
                )
                _fail(
                    grpc.StatusCode.UNAVAILABLE,
                    f"could not mint a JWT-SVID for {identity.spiffe_id}",
                    "mint_failed",
                )
            response.svids.append(
                workload_pb2.JWTSVID(spiffe_id=str(svid.spiffe_id), svid=svid.token, hint=identity.hint)
            )
        log.info(
            "workloadapi.jwt_svid",
            extra={
                "fields": {"spiffe_ids": [str(i.spiffe_id) for i in identities], "audience": list(audience)}
            },
        )
        return response

    async def _validate_jwt_svid(self, caller: CallerInfo, request: Any) -> Any:
        if not request.audience:
            _fail(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified", "missing_audience")
        if not request.svid:
            _fail(grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified", "missing_svid")
        try:
            svid = validate_jwt_svid(
                str(request.svid),
                self._feed.current().bundles,
                (str(request.audience),),
                now=self._clock(),
                leeway=self._leeway,
            )
        except SvidgateError as exc:
            # InvalidArgument, as SPIRE answers a token that does not validate; the detail names the rule
            # (JwtSvidError never carries the token itself).
            _fail(grpc.StatusCode.INVALID_ARGUMENT, str(exc), getattr(exc, "reason", "invalid"))
        return workload_pb2.ValidateJWTSVIDResponse(
            spiffe_id=str(svid.spiffe_id), claims=claims_struct(svid.claims)
        )
