"""`envoy.service.auth.v3.Authorization/Check`: the thin gRPC edge around the pure decision.

The core is one plain, synchronous method, `AuthorizationServicer.check(request) -> CheckResponse`, so that
the same code is served by the ``grpc.aio`` servers of ``listen.grpc`` and ``listen.workload_api``
(`add_to_server`) and by a threaded ``grpc.server`` on ``listen.check`` (`add_to_sync_server`,
`new_sync_check_server`). Every gRPC listener svidgate opens answers Check with the same decision (see
`svidgate.runtime.wiring.Services.register`); ``listen.check`` is the fast path: measured here, the threaded
server answers the same Check with about a fifth fewer instructions and less CPU than ``grpc.aio``
(bench/check_bench.py, bench/check_bench_callgrind.py).

Fail closed, always with a response: a denial is a normal `CheckResponse` with a non-OK status and never an
RPC error, because Envoy with ``failure_mode_allow: true`` lets a request through when the RPC fails. Any
exception inside `check` becomes a denial with reason ``internal_error`` (logged), never an allow.

Why one module (over 600 lines): Check's hot path is here end to end (pre-encoded response parts, the decision
fast path, the unknown-key refresh, sampling of the decision log) so that its cost can be read and measured
in one place (bench/check_bench_callgrind.py). The response encoding and the decision log are the seams
along which it splits when it stops being one hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import itertools
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from typing import TYPE_CHECKING, Any, Final

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2

from svidgate.bounded import BoundedDict
from svidgate.errors import JwtSvidError
from svidgate.extauthz.cache import TokenCache
from svidgate.extauthz.decision import Decision, decide, deny, inject_decision, internal_error
from svidgate.extauthz.inject import InjectError, TokenInjector
from svidgate.extauthz.token import (
    MISSING_TOKEN,
    TokenError,
    candidate_token,
    extract_token_raw,
    require_compact,
)
from svidgate.identity.clock import Clock, system_clock
from svidgate.identity.jwtsvid import UNKNOWN_KEY, JwtSvid, parse_jwt_svid_insecure

if TYPE_CHECKING:
    import grpc.aio

    from svidgate.extauthz.metrics import AuthzMetrics
    from svidgate.extauthz.policy import CompiledAuthz, CompiledPolicy
    from svidgate.extauthz.reload import PolicyHolder
    from svidgate.identity.bundle import Bundle
    from svidgate.identity.entitlement import CallerInfo
    from svidgate.identity.snapshot import SnapshotFeed
    from svidgate.identity.spiffe_id import TrustDomain
    from svidgate.sources.federation import BundleRefresher

__all__ = [
    "MISSING_SECURITY_HEADER",
    "AuthorizationServicer",
    "DecisionLog",
    "PeerResolver",
    "new_sync_check_server",
    "to_check_response",
]

log = logging.getLogger(__name__)


class UnknownKey(enum.Enum):
    """What `AuthorizationServicer.check_wire` does when a token's ``kid`` is not in its bundle."""

    WAIT = "wait"
    RAISE = "raise"
    IGNORE = "ignore"


class RefreshPending(Exception):
    """A bundle fetch for an unknown key is running; the grpc.aio handler awaits it and decides again."""

    def __init__(self, fetch: futures.Future[bool], wait: float) -> None:
        super().__init__("bundle fetch pending")
        self.fetch = fetch
        self.wait = wait


#: Maps a gRPC peer string (``context.peer()``) to what the peer-credential front verified about it.
PeerResolver = Callable[[str], "CallerInfo | None"]

_OVERWRITE: Final = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# google.rpc.Code: Envoy only looks at OK vs not OK, but the right code helps anyone reading a capture.
_RPC_CODE_BY_STATUS: Final = {401: 16, 403: 7}  # UNAUTHENTICATED, PERMISSION_DENIED
_INJECT_UNAVAILABLE: Final = "inject_unavailable"
#: Memoised (policy, subject) decisions kept per configuration; a bound against unbounded subject sets.
_MEMO_LIMIT: Final = 10_000
_SERVICE: Final = "envoy.service.auth.v3.Authorization"
#: The reason of a Check refused on the Workload API socket for lack of its security header.
MISSING_SECURITY_HEADER: Final = "missing_security_header"
# Decision IDs are 16 hex digits: a random prefix per process (IDs of two processes, or of a restart, do not
# collide in one log store) and a counter, instead of os.urandom per Check.
_ID_PREFIX: Final = os.urandom(4).hex()


def _static_internal_error() -> external_auth_pb2.CheckResponse:
    # Built once at import: the last resort when even building a response fails must not be able to fail.
    response = external_auth_pb2.CheckResponse()
    response.status.code = 7
    response.denied_response.status.code = 403
    response.denied_response.body = '{"error":"forbidden","reason":"internal_error"}'
    return response


_LAST_RESORT: Final = _static_internal_error()
_LAST_RESORT_BYTES: Final[bytes] = _LAST_RESORT.SerializeToString()


#: Response header of a denial naming the decision, so that a client can quote it to an operator.
DECISION_ID_HEADER: Final = "x-svidgate-decision-id"


def to_check_response(decision: Decision, decision_id: str) -> external_auth_pb2.CheckResponse:
    """Translate a `Decision` into Envoy's `CheckResponse`.

    Headers to set use ``OVERWRITE_IF_EXISTS_OR_ADD``: a copy of ``x-spiffe-id`` (or, in inject mode, of the
    token header) sent by the client is replaced, never forwarded next to ours.

    Args:
        decision: the decision.
        decision_id: this Check's unique ID (dynamic metadata, and the deny response's
            ``x-svidgate-decision-id`` header).

    Returns:
        The response, with `spiffe_id`, `policy`, `reason`, `decision_id` (and `dry_run`) in dynamic metadata.
    """
    response = _response_template(decision)
    _stamp(response, decision, decision_id)
    return response


def _response_template(decision: Decision) -> external_auth_pb2.CheckResponse:
    """Everything of the response except the per-Check decision ID."""
    response = external_auth_pb2.CheckResponse()
    if decision.allowed:
        ok = response.ok_response
        ok.SetInParent()
        for key, value in decision.headers_to_set:
            option = ok.headers.add()
            option.header.key = key
            option.header.value = value
            option.append_action = _OVERWRITE
        ok.headers_to_remove.extend(decision.headers_to_remove)
    else:
        response.status.code = _RPC_CODE_BY_STATUS.get(decision.status, 7)
        denied = response.denied_response
        denied.status.code = decision.status
        for key, value in decision.response_headers:
            option = denied.headers.add()
            option.header.key = key
            option.header.value = value
            option.append_action = _OVERWRITE
        denied.body = decision.body
    fields = response.dynamic_metadata.fields
    fields["reason"].string_value = decision.reason
    if decision.policy is not None:
        fields["policy"].string_value = decision.policy
    if decision.spiffe_id is not None:
        fields["spiffe_id"].string_value = decision.spiffe_id
    if decision.dry_run:
        fields["dry_run"].bool_value = True
    return response


def _stamp(response: external_auth_pb2.CheckResponse, decision: Decision, decision_id: str) -> None:
    _stamp_id(response, decision.allowed, decision_id)


def _stamp_id(response: external_auth_pb2.CheckResponse, allowed: bool, decision_id: str) -> None:
    response.dynamic_metadata.fields["decision_id"].string_value = decision_id
    if not allowed:
        option = response.denied_response.headers.add()
        option.header.key = DECISION_ID_HEADER
        option.header.value = decision_id
        option.append_action = _OVERWRITE


# The per-Check part of a response on the wire. Protobuf messages may be concatenated: a sub-message that
# occurs twice is merged (map entries added, repeated fields appended), so `template + tail` parses to exactly
# the message `to_check_response` builds, and the template -- the same for every Check with the same
# (configuration, policy, subject or reason) -- is encoded once. The tail is derived from protobuf itself with
# a placeholder of the decision ID's length (16 hex digits), never hand-encoded.
_ID_PLACEHOLDER: Final = "svidgate-decided"


def _tail_parts(allowed: bool) -> tuple[bytes, ...]:
    response = external_auth_pb2.CheckResponse()
    _stamp_id(response, allowed, _ID_PLACEHOLDER)
    return tuple(response.SerializeToString().split(_ID_PLACEHOLDER.encode("ascii")))


_ALLOW_TAIL: Final = _tail_parts(True)
_DENY_TAIL: Final = _tail_parts(False)


def _require_compact(header: str, token: str) -> None:
    require_compact(token, header)


class _Prepared:
    """A decision with its response template encoded once, and its decisions counter once resolved."""

    __slots__ = ("counter", "decision", "tail", "template")

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.template = _response_template(decision).SerializeToString()
        self.tail = _ALLOW_TAIL if decision.allowed else _DENY_TAIL
        self.counter: Any = None

    def wire(self, decision_id: bytes) -> bytes:
        """The response's bytes for one Check."""
        wire: bytes = self.template + decision_id.join(self.tail)
        return wire


class _Decided:
    """A decided Check on the fast path: valid while its configuration, its bundles and its token are."""

    __slots__ = ("authz", "bundles", "prepared", "token_hit", "valid_until")

    def __init__(
        self,
        prepared: _Prepared,
        authz: CompiledAuthz,
        bundles: Mapping[TrustDomain, Bundle],
        valid_until: float,
        token_hit: bool,
    ) -> None:
        self.prepared = prepared
        self.authz = authz
        self.bundles = bundles
        self.valid_until = valid_until
        self.token_hit = token_hit


class DecisionLog:
    """One structured log line per decision, sampled and rate-limited (a token bucket).

    Lines that the limit drops are counted and reported as ``suppressed`` on the next line that passes, so a
    flood is visible without flooding. Thread-safe.

    Args:
        clock: a monotonic clock (injectable for tests).
        rng: returns a float in [0, 1) for sampling (injectable for tests).
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, rng: Callable[[], float] = random.random
    ) -> None:
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self._tokens = -1.0  # < 0: fill the bucket on first use
        self._last = 0.0
        self._suppressed = 0

    def admit(self, sample_rate: float, max_per_second: float) -> int | None:
        """Whether to write this line.

        Args:
            sample_rate: the fraction of decisions to log (``authz.decision_log.sample_rate``).
            max_per_second: the rate limit (``authz.decision_log.max_per_second``); the burst is one second's
                worth.

        Returns:
            None to drop the line, else the number of lines suppressed since the last one written.
        """
        if sample_rate < 1.0 and self._rng() >= sample_rate:
            return None
        with self._lock:
            now = self._clock()
            burst = max(1.0, max_per_second)
            if self._tokens < 0:
                self._tokens = burst
            else:
                self._tokens = min(burst, self._tokens + (now - self._last) * max_per_second)
            self._last = now
            if self._tokens < 1.0:
                self._suppressed += 1
                return None
            self._tokens -= 1.0
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed


class AuthorizationServicer:
    """The Check service.

    Args:
        feed: the identity feed; bundles for validation come from ``feed.current().bundles`` on every Check.
        policies: holds the ``authz`` configuration in force (`PolicyHolder.swap` on reload).
        metrics: records decisions, latency, cache and injection counters when given.
        clock: the time source for token validation.
        injector: mints tokens for inject-mode policies; without it, inject-mode policies deny
            (``inject_unavailable``).
        peers: maps ``context.peer()`` to kernel-verified credentials (the peer-credential front's registry)
            for the inject-mode entitlement check; None when Check is served over TCP only.
        refresh_bundle: asks for an out-of-schedule fetch of a federated trust domain's bundle when a token
            names a key its bundle lacks (`FederatedBundles.request_fetch`); None: never.
    """

    def __init__(
        self,
        feed: SnapshotFeed,
        policies: PolicyHolder,
        metrics: AuthzMetrics | None = None,
        clock: Clock = system_clock,
        injector: TokenInjector | None = None,
        peers: PeerResolver | None = None,
        refresh_bundle: BundleRefresher | None = None,
    ) -> None:
        self._feed = feed
        self._policies = policies
        self._metrics = metrics
        self._clock = clock
        self._injector = injector
        self._peers = peers
        self._refresh_bundle = refresh_bundle
        self.cache = TokenCache(policies.current.config.cache_size, metrics)
        self.decision_log = DecisionLog()
        self._errors_log = DecisionLog()
        self._require_compact: dict[str, Callable[[str], object]] = {}
        self._decision_counters: dict[tuple[str, str, str, bool], Any] = {}
        self._memo: tuple[CompiledAuthz | None, BoundedDict[tuple[object, ...], _Prepared]] = (
            None,
            BoundedDict(_MEMO_LIMIT),
        )
        # The decision fast path: Checks decided before, by what the decision depends on (see `_decide`).
        self._decided: BoundedDict[tuple[object, ...], _Decided] = BoundedDict(
            policies.current.config.cache_size
        )
        self._ids = itertools.count()

    # -- the core: plain and synchronous, served by both the aio and the threaded server ---------------------

    def check(
        self, request: external_auth_pb2.CheckRequest, peer: Callable[[], str] | None = None
    ) -> external_auth_pb2.CheckResponse:
        """Decide one Check request; never raises.

        Args:
            request: Envoy's CheckRequest.
            peer: returns the gRPC peer string (``context.peer``); called only for inject-mode policies.

        Returns:
            The CheckResponse (a denial on any internal fault).
        """
        return external_auth_pb2.CheckResponse.FromString(self.check_wire(request, peer))

    def check_wire(
        self,
        request: external_auth_pb2.CheckRequest,
        peer: Callable[[], str] | None = None,
        *,
        unknown_key: UnknownKey = UnknownKey.WAIT,
    ) -> bytes:
        """`check`, answering the encoded CheckResponse (what the gRPC handlers send as is); never raises.

        Everything, metrics and the decision log included, runs inside the fail-closed guard: an exception
        anywhere becomes a denial (``internal_error``), never an RPC error that Envoy's ``failure_mode_allow``
        would turn into an allow.

        A token whose ``kid`` its federated trust domain's bundle lacks asks for one fetch of that bundle
        (rate-limited per trust domain by the source) and is validated again against the result before the
        deny is final: `unknown_key` says how to wait for it.

        Args:
            request: Envoy's CheckRequest.
            peer: returns the gRPC peer string (``context.peer``); called only for inject-mode policies.
            unknown_key: ``WAIT`` blocks this thread for at most ``authz.unknown_key_wait`` (the threaded
                server); ``RAISE`` raises `RefreshPending` for the caller to await (grpc.aio: the fetch
                publishes on the event loop, which must not block); ``IGNORE`` denies at once.

        Returns:
            The serialized CheckResponse.

        Raises:
            RefreshPending: only with ``unknown_key=RAISE``.
        """
        started = time.perf_counter()
        decision_id = f"{_ID_PREFIX}{next(self._ids) & 0xFFFFFFFF:08x}"
        try:
            prepared = self._decide(request, peer, unknown_key)
            wire = prepared.wire(decision_id.encode("ascii"))
            self._record(prepared, decision_id, request, started)
            return wire
        except RefreshPending:
            raise
        except Exception as err:
            return self._fail_closed(err, decision_id, started)

    def _decide(
        self,
        request: external_auth_pb2.CheckRequest,
        peer: Callable[[], str] | None,
        unknown_key: UnknownKey = UnknownKey.WAIT,
    ) -> _Prepared:
        authz = self._policies.current
        attributes = request.attributes
        http = attributes.request.http
        extensions = attributes.context_extensions
        headers = http.headers
        token_value = headers.get(authz.token_header)
        bundles = self._feed.current().bundles
        # The fast path. A decision depends on the request's token header, host, path, method and context
        # extensions, on the configuration, on the bundles and on the time only through the token's expiry:
        # a Check that repeats all of them (Envoy sends the same token to the same route over and over) gets
        # the same prepared response without selecting a policy or looking the token up. Entries are made only
        # by the slow path below, so a hit was exactly as strict once, and stays valid only while the
        # configuration and bundle objects are the ones it was decided with (a reload or a new snapshot
        # replaces them) and the token has not expired. Requests with raw header maps (encode_raw_headers)
        # and inject-mode policies (a fresh token per Check) never take it.
        raw_headers = token_value is None and not headers and len(http.header_map.headers) > 0
        key: tuple[object, ...] | None = None
        if not raw_headers:
            key = (
                token_value,
                http.host,
                http.path,
                http.method,
                tuple(sorted(extensions.items())) if extensions else (),
            )
            decided = self._decided.get(key)
            if (
                decided is not None
                and decided.authz is authz
                and decided.bundles is bundles
                and (decided.valid_until == math.inf or self._clock() < decided.valid_until)
            ):
                if decided.token_hit and self._metrics is not None:
                    self._metrics.recorder.cell().hits += 1
                return decided.prepared
        owner, memo = self._memo
        if owner is not authz:
            # The memo belongs to one CompiledAuthz: a reload starts a new one, and a thread still deciding
            # with the old configuration only ever writes into the old configuration's memo.
            memo = BoundedDict(_MEMO_LIMIT)
            self._memo = (authz, memo)
            # A reload may change authz.cache_size too; the caches shrink on their next store.
            self.cache.max_entries = authz.config.cache_size
            self._decided.limit = authz.config.cache_size
        policy = authz.select(http.host, http.path, http.method, extensions)
        memo_key: tuple[object, ...]
        valid_until = math.inf
        if policy is None or not policy.policy.require_token:
            memo_key = (None if policy is None else policy.name,)
            outcome: JwtSvid | TokenError | JwtSvidError | None = None
        elif policy.policy.mode == "inject":
            # A fresh token per Check: nothing to share.
            return _Prepared(self._inject(authz, policy, extensions, peer))
        else:
            outcome = self._validate(authz, policy, http, bundles, unknown_key)
            if isinstance(outcome, JwtSvid):
                # With a valid token the decision depends only on (configuration, policy, subject).
                memo_key = (policy.name, outcome.spiffe_id)
                valid_until = outcome.expiry
            else:
                memo_key = (policy.name, "error", outcome.reason)
                # Of the failures only a missing token is the same whatever the time: others (an expired
                # token, an unknown key that a bundle refresh may bring) are decided afresh every time.
                if outcome.reason != MISSING_TOKEN:
                    key = None
        prepared = memo.get(memo_key)
        if prepared is None:
            prepared = _Prepared(decide(authz, policy, outcome))
            memo.put(memo_key, prepared)
        if key is not None:
            self._decided.put(
                key, _Decided(prepared, authz, bundles, valid_until, isinstance(outcome, JwtSvid))
            )
        return prepared

    def _fail_closed(self, err: Exception, decision_id: str, started: float) -> bytes:
        try:
            if self._errors_log.admit(1.0, 10.0) is not None:
                log.error(
                    "authz.internal_error",
                    extra={"fields": {"decision_id": decision_id, "error": type(err).__name__}},
                    exc_info=True,
                )
            prepared = _Prepared(internal_error())
            wire = prepared.wire(decision_id.encode("ascii"))
        except Exception:
            return _LAST_RESORT_BYTES
        # When recording is what failed, this Check is a denial already; a second failure changes nothing.
        with contextlib.suppress(Exception):
            self._record(prepared, decision_id, None, started)
        return wire

    def _validate(
        self,
        authz: CompiledAuthz,
        policy: CompiledPolicy,
        http: Any,
        bundles: Mapping[TrustDomain, Bundle],
        unknown_key: UnknownKey,
    ) -> JwtSvid | TokenError | JwtSvidError:
        try:
            header = authz.token_header
            headers = http.headers
            # One map lookup for the one header we need (reading the whole upb map costs far more).
            value = headers.get(header)
            if value is not None:
                token = candidate_token(value, header, authz.token_prefix)
                precheck: Callable[[str], object] | None = self._require_compact.get(header)
                if precheck is None:
                    precheck = self._require_compact[header] = functools.partial(_require_compact, header)
            elif headers or not http.header_map.headers:
                raise TokenError(MISSING_TOKEN, f"no {header!r} header")
            else:
                # encode_raw_headers: true -- repeated headers arrive as separate entries.
                raw = ((h.key, h.raw_value.decode("latin-1")) for h in http.header_map.headers)
                token = extract_token_raw(raw, header, authz.token_prefix)
                precheck = None
            try:
                return self.cache.validate(
                    token, bundles, policy.audiences, self._clock(), authz.config.leeway, precheck
                )
            except JwtSvidError as err:
                if err.reason != UNKNOWN_KEY or not self._await_bundle(token, authz, unknown_key):
                    raise
            # The fetch changed the bundle: validate once more against what it published. (The fast path's
            # entry for this Check keeps the older bundles object, so it is never reused: decided afresh.)
            fetched = self._feed.current().bundles
            return self.cache.validate(token, fetched, policy.audiences, self._clock(), authz.config.leeway)
        except (TokenError, JwtSvidError) as err:
            return err

    def _await_bundle(self, token: str, authz: CompiledAuthz, unknown_key: UnknownKey) -> bool:
        """Ask for a fetch of the token's trust domain's bundle; True when a changed one was published."""
        if self._refresh_bundle is None or unknown_key is UnknownKey.IGNORE:
            return False
        # The token already parsed (the key lookup is what failed), so this cannot raise for it.
        trust_domain = parse_jwt_svid_insecure(token).spiffe_id.trust_domain
        fetch = self._refresh_bundle(trust_domain)
        if fetch is None:
            return False  # no endpoint, or fetched for an unknown key moments ago
        if unknown_key is UnknownKey.RAISE:
            raise RefreshPending(fetch, authz.config.unknown_key_wait)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # a Check thread: it may wait
        else:
            # Called on an event loop (a caller that should have asked for RAISE): blocking here would stall
            # the loop that publishes the fetch's result. Deny now; the fetch still runs for later Checks.
            return False
        try:
            return fetch.result(timeout=authz.config.unknown_key_wait)
        except futures.TimeoutError:
            return False

    def _inject(
        self,
        authz: CompiledAuthz,
        policy: CompiledPolicy,
        extensions: Mapping[str, str],
        peer: Callable[[], str] | None,
    ) -> Decision:
        hide = authz.config.hide_details
        if self._injector is None:
            return deny(403, _INJECT_UNAVAILABLE, policy=policy.name, hide_details=hide)
        try:
            verified = self._peers(peer()) if self._peers is not None and peer is not None else None
            svid = self._injector.inject(policy.policy, verified, extensions)
        except InjectError as err:
            return deny(403, err.reason, policy=policy.name, hide_details=hide)
        if self._metrics is not None:
            self._metrics.tokens_injected.labels(policy.name).inc()
        return inject_decision(authz, policy, svid)

    def _record(
        self,
        prepared: _Prepared,
        decision_id: str,
        request: external_auth_pb2.CheckRequest | None,
        started: float,
    ) -> None:
        elapsed = time.perf_counter() - started
        decision = prepared.decision
        metrics = self._metrics
        if metrics is not None:
            counter = prepared.counter
            if counter is None:
                key = (decision.policy or "", decision.verdict, decision.reason, decision.dry_run)
                counter = self._decision_counters.get(key)
                if counter is None:
                    counter = metrics.decisions.labels(key[0], key[1], key[2], "true" if key[3] else "false")
                    self._decision_counters[key] = counter
                prepared.counter = counter
            metrics.recorder.check(counter, elapsed)
        if not log.isEnabledFor(logging.INFO):
            # Decide about the line before anything is gathered for it: a logger that drops INFO would
            # discard it after the rate limiter's lock, six request fields and the logging call.
            return
        settings = self._policies.current.config.decision_log
        suppressed = self.decision_log.admit(settings.sample_rate, settings.max_per_second)
        if suppressed is None:
            return
        fields: dict[str, object] = {
            "decision_id": decision_id,
            "result": decision.verdict,
            "allowed": decision.allowed,
            "status": decision.status,
            "reason": decision.reason,
            "policy": decision.policy,
            "spiffe_id": decision.spiffe_id,
            "dry_run": decision.dry_run,
            "duration_us": round(elapsed * 1e6),
        }
        if request is not None:
            attributes = request.attributes
            http = attributes.request.http
            # The path without its query: query strings carry secrets often enough (tokens, signatures).
            path = http.path
            cut = path.find("?")
            fields.update(
                request_id=http.id,
                method=http.method,
                host=http.host,
                path=path if cut < 0 else path[:cut],
                source_address=attributes.source.address.socket_address.address,
                source_principal=attributes.source.principal or None,
            )
        if suppressed:
            fields["suppressed"] = suppressed
        log.info("authz.decision", extra={"fields": fields})

    # -- gRPC adapters ---------------------------------------------------------------------------------------

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """`Authorization/Check` on a ``grpc.aio`` server (answers the encoded response, see `_register`).

        An unknown key's bundle fetch publishes on this event loop, so it is awaited here, not blocked on.
        """
        try:
            return self.check_wire(request, context.peer, unknown_key=UnknownKey.RAISE)
        except RefreshPending as pending:
            fetched = asyncio.wrap_future(pending.fetch)
            # shield: a timeout here must not cancel the fetch other Checks share.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(fetched), pending.wait)
            return self.check_wire(request, context.peer, unknown_key=UnknownKey.IGNORE)

    def refuse_wire(self, reason: str) -> bytes:
        """A 403 denial that no policy decides: the listener refuses the call; never raises.

        Recorded like every decision (``svidgate_authz_decisions_total``, the decision log), so that an Envoy
        pointed at the wrong listener shows up as a stream of denials with `reason`, never as allows.

        Args:
            reason: the stable reason code (e.g. ``missing_security_header``).

        Returns:
            The serialized CheckResponse.
        """
        started = time.perf_counter()
        decision_id = f"{_ID_PREFIX}{next(self._ids) & 0xFFFFFFFF:08x}"
        try:
            hide = self._policies.current.config.hide_details
            prepared = _Prepared(deny(403, reason, hide_details=hide))
            wire = prepared.wire(decision_id.encode("ascii"))
            self._record(prepared, decision_id, None, started)
            return wire
        except Exception as err:
            return self._fail_closed(err, decision_id, started)

    def add_to_server(
        self, server: grpc.aio.Server, *, required_metadata: tuple[str, str] | None = None
    ) -> None:
        """Register Check on a ``grpc.aio`` server (``listen.grpc``, ``listen.workload_api``).

        Args:
            server: the server.
            required_metadata: a ``(key, value)`` every call must carry exactly once (the Workload Endpoint's
                ``workload.spiffe.io: true``); a call without it is refused with a 403 CheckResponse
                (`MISSING_SECURITY_HEADER`) -- a denial, not the InvalidArgument RPC error the Workload API
                answers, because Envoy's ``failure_mode_allow`` turns an RPC error into an allow.
        """
        if required_metadata is None:
            _register(server, self.Check)
            return
        key, expected = required_metadata
        decide, refuse_wire = self.Check, self.refuse_wire

        async def check(
            request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
        ) -> bytes:
            values = [value for name, value in (context.invocation_metadata() or ()) if name == key]
            if values != [expected]:
                return refuse_wire(MISSING_SECURITY_HEADER)
            return await decide(request, context)

        _register(server, check)

    def add_to_sync_server(self, server: grpc.Server) -> None:
        """Register Check on a threaded ``grpc.server`` (the ``listen.check`` listener)."""
        check_wire = self.check_wire
        metrics = self._metrics
        if metrics is None:

            def check(request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext) -> bytes:
                return check_wire(request, context.peer)

        else:
            # The grpc.aio interceptor counts calls on listen.grpc; the threaded server has none: count here.
            # Check never fails the RPC (denials and internal errors are CheckResponses): the code is OK.
            recorder = metrics.recorder
            started = metrics.grpc_started.labels(service=_SERVICE, method="Check")
            handled = metrics.grpc_handled.labels(service=_SERVICE, method="Check", code="OK")

            def check(request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext) -> bytes:
                recorder.count(started)
                wire = check_wire(request, context.peer)
                recorder.count(handled)
                return wire

        _register(server, check)


def _register(server: grpc.Server | grpc.aio.Server, behavior: Callable[..., Any]) -> None:
    # By hand rather than with the generated add_AuthorizationServicer_to_server: without a response
    # serializer grpcio sends the handler's bytes as they are, and the handler answers pre-encoded bytes
    # (`_Prepared.wire`), as the SDS servicer does.
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=external_auth_pb2.CheckRequest.FromString,
            response_serializer=None,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_registered_method_handlers(_SERVICE, handlers)  # type: ignore[union-attr]


def new_sync_check_server(
    servicer: AuthorizationServicer,
    max_workers: int = 4,
    *,
    options: Sequence[tuple[str, int]] = (("grpc.so_reuseport", 0),),
) -> grpc.Server:
    """A threaded gRPC server with Check registered, not yet bound or started: the one way svidgate builds
    it (``listen.check``, tests and bench/ alike).

    Args:
        servicer: the Check service (shared with the aio server: same cache, policies and metrics).
        max_workers: worker threads (svidgate serve uses `server.check_workers`, default 4: threads stay
            free while a Check waits for an unknown key's bundle fetch).
        options: the server's channel options (`svidgate serve` passes `grpc_server_options()`).

    Returns:
        The server; the caller adds ports (``add_insecure_port``) and starts and stops it.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="svidgate-check"),
        options=list(options),
    )
    servicer.add_to_sync_server(server)
    return server
