"""Inject mode: an egress Envoy's Check adds a fresh JWT-SVID to the outgoing request.

Pure apart from locks and the injected minter (the runtime passes its identity source's `mint_jwt_svid`).

Trust model. Envoy's CheckRequest names neither the calling Envoy nor its node, so the identity to inject for
is not taken from the request: the *policy* names it (``inject_spiffe_id``, validated by the config loader
against ``workloads[]``), and the route picks the policy (``match``, e.g. ``context_extensions: {policy:
egress}``). Everything else in a CheckRequest -- host, path, ``context_extensions`` including ``node_id``,
``cluster`` and ``audience`` -- is whatever the caller sends: a process that can reach the Check endpoint
directly can claim any of it. So:

- The caller must be known to the kernel. A Check that arrives over the unix socket through the
  peer-credential front carries a kernel-verified uid/gid/pid; together with the claimed ``node_id`` and
  ``cluster`` (as SDS takes them from the node) it must *entitle* the caller to the policy's identity through
  ``workloads[].selectors``, or the request is denied (``not_entitled``). A Check with no verified peer
  (TCP, or a unix socket without the front) is denied (``unverified_caller``) unless the policy sets
  ``inject_allow_unverified_callers: true`` -- then every client of that endpoint can obtain tokens for the
  policy's identity, which is only acceptable where the network itself is the authentication.
- The audience is the route's ``context_extensions["audience"]`` when set (one egress policy can serve several
  destinations), else the policy's ``inject_audience``. A requested audience must be listed in the policy's
  ``audiences`` (or be its ``inject_audience``): otherwise a caller could mint a token for any service that
  trusts this identity (``audience_not_allowed``).

Tokens are minted once per (SPIFFE ID, audience) and re-used until half their lifetime has passed or 30 s
before expiry, whichever comes first -- never one signature per request, and never a token that could expire
in flight. Concurrent requests for the same missing token wait for one mint (single flight); requests for
other tokens do not wait for it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

from svidgate.errors import SvidgateError
from svidgate.identity.clock import Clock, system_clock
from svidgate.identity.entitlement import CallerInfo, entitled_ids

if TYPE_CHECKING:
    from svidgate.changes import ChangeSignal
    from svidgate.config import Policy
    from svidgate.identity.entitlement import Workload
    from svidgate.identity.jwtsvid import JwtSvid
    from svidgate.identity.spiffe_id import SpiffeId

__all__ = [
    "AUDIENCE_NOT_ALLOWED",
    "MINT_FAILED",
    "NOT_ENTITLED",
    "NO_AUDIENCE",
    "NO_IDENTITY",
    "UNVERIFIED_CALLER",
    "InjectError",
    "Minter",
    "TokenInjector",
    "allowed_audiences",
    "caller_from_extensions",
    "is_verified",
]

#: Mints a JWT-SVID for a SPIFFE ID and audiences (`IdentitySource.mint_jwt_svid`); raises SvidgateError.
Minter = Callable[["SpiffeId", Sequence[str]], "JwtSvid"]

NOT_ENTITLED: Final = "not_entitled"
NO_IDENTITY: Final = "no_identity"
NO_AUDIENCE: Final = "no_audience"
MINT_FAILED: Final = "mint_failed"
UNVERIFIED_CALLER: Final = "unverified_caller"
AUDIENCE_NOT_ALLOWED: Final = "audience_not_allowed"

#: Re-mint this long before expiry at the latest: covers Envoy's queueing, the upstream hop and clock skew.
REFRESH_BEFORE_EXPIRY: Final = 30.0
#: Distinct (SPIFFE ID, audience) pairs kept; audiences come from the policies: a safety bound only.
MAX_CACHED: Final = 4096


class InjectError(SvidgateError):
    """No token can be injected for this request.

    Attributes:
        reason: ``unverified_caller``, ``not_entitled``, ``audience_not_allowed``, ``no_identity``,
            ``no_audience`` or ``mint_failed``.
        detail: a human-readable explanation (never a token).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def caller_from_extensions(
    peer: CallerInfo | None, context_extensions: Mapping[str, str]
) -> CallerInfo | None:
    """Combine kernel-verified peer credentials with the node the route claims.

    Args:
        peer: what the peer-credential front knows about the connection, or None (TCP: nothing verified).
        context_extensions: the route's context extensions (``node_id``, ``cluster``: claims, as in SDS).

    Returns:
        The caller, or None when nothing at all is known about it. A caller built from claims alone is not
        verified (`is_verified`): it is kept for log lines, never trusted.
    """
    node_id = context_extensions.get("node_id")
    cluster = context_extensions.get("cluster")
    if peer is None:
        return CallerInfo(node_id=node_id, cluster=cluster) if node_id or cluster else None
    return peer.with_node(node_id, cluster)


def is_verified(caller: CallerInfo | None) -> bool:
    """Whether the caller's credentials come from the kernel (SO_PEERCRED), not from the request.

    The peer-credential front always records the uid; ``node_id``/``cluster`` are claims anyone can send.
    """
    return caller is not None and caller.uid is not None


def allowed_audiences(policy: Policy) -> frozenset[str]:
    """The audiences an inject-mode policy may mint for: its ``audiences`` plus its ``inject_audience``."""
    extra = () if policy.inject_audience is None else (policy.inject_audience,)
    return frozenset((*policy.audiences, *extra))


class _Flight:
    """One mint in progress; followers wait on `done` and read the leader's outcome."""

    __slots__ = ("done", "error", "svid")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.svid: JwtSvid | None = None
        self.error: InjectError | None = None


class TokenInjector:
    """Mints (and re-uses) the JWT-SVIDs that inject-mode policies add to requests.

    Args:
        minter: mints a JWT-SVID (the identity source's `mint_jwt_svid`).
        workloads: ``workloads[]``, for the entitlement check of verified callers.
        clock: the time source.
        rules: the rules in force, shared with SDS and the Workload API (`svidgate.changes.ChangeSignal`);
            given it, `workloads` is not used.
    """

    def __init__(
        self,
        minter: Minter,
        workloads: Sequence[Workload] = (),
        clock: Clock = system_clock,
        *,
        rules: ChangeSignal | None = None,
    ) -> None:
        self._minter = minter
        self._own: tuple[Workload, ...] = tuple(workloads)
        self._rules = rules
        self._clock = clock
        self._tokens: OrderedDict[tuple[SpiffeId, str], tuple[JwtSvid, float]] = OrderedDict()
        # Guards `_tokens` and `_flights` only, never held while minting: a mint (a signature, or a round trip
        # to a SPIRE agent) for one (identity, audience) must not hold up Checks that hit the cache or mint
        # another pair. `_flights` makes concurrent misses for the same pair share one mint.
        self._lock = threading.Lock()
        self._flights: dict[tuple[SpiffeId, str], _Flight] = {}

    def swap_workloads(self, workloads: Sequence[Workload]) -> None:
        """Replace the workloads after a config reload (one reference assignment; with shared `rules`, the
        runtime swaps those instead)."""
        if self._rules is not None:
            self._rules.swap_rules(workloads)
        else:
            self._own = tuple(workloads)

    @property
    def _workloads(self) -> tuple[Workload, ...]:
        # Read on Check's threads: one attribute read of an immutable value, no lock.
        return self._rules.rules.workloads if self._rules is not None else self._own

    def inject(
        self, policy: Policy, peer: CallerInfo | None, context_extensions: Mapping[str, str]
    ) -> JwtSvid:
        """Everything an inject-mode Check needs: who may get which token, then the token.

        Args:
            policy: the inject-mode policy the request matched.
            peer: the kernel-verified peer credentials of the connection (the peer-credential front's
                registry), or None when the Check did not come through it (TCP).
            context_extensions: the route's context extensions (``audience``, ``node_id``, ``cluster``).

        Returns:
            The JWT-SVID to add to the request.

        Raises:
            InjectError: ``no_identity``, ``unverified_caller``, ``not_entitled``, ``audience_not_allowed``,
                ``no_audience`` or ``mint_failed``.
        """
        spiffe_id = policy.inject_spiffe_id
        if spiffe_id is None:
            raise InjectError(NO_IDENTITY, f"policy {policy.name!r} names no inject_spiffe_id")
        self.check_entitled(
            spiffe_id,
            caller_from_extensions(peer, context_extensions),
            allow_unverified=policy.inject_allow_unverified_callers,
        )
        requested = context_extensions.get("audience")
        if requested:
            if requested not in allowed_audiences(policy):
                raise InjectError(
                    AUDIENCE_NOT_ALLOWED,
                    f"audience {requested!r} is not in the audiences of policy {policy.name!r}",
                )
            audience = requested
        else:
            audience = policy.inject_audience or ""
        return self.token(spiffe_id, audience)

    def check_entitled(
        self, spiffe_id: SpiffeId, caller: CallerInfo | None, *, allow_unverified: bool = False
    ) -> None:
        """Refuse a caller that is not verified, or verified but not entitled to `spiffe_id`.

        Args:
            spiffe_id: the identity the policy injects.
            caller: what is known about the caller (`caller_from_extensions`).
            allow_unverified: the policy's ``inject_allow_unverified_callers``: let a caller without
                kernel-verified credentials through on the policy's word alone.

        Raises:
            InjectError: ``unverified_caller`` or ``not_entitled``.
        """
        if caller is None or caller.uid is None:  # `is_verified`, spelled out for the type checker
            if allow_unverified:
                return
            raise InjectError(
                UNVERIFIED_CALLER,
                "the Check did not arrive over svidgate's unix socket, so the caller has no verified "
                "credentials (set inject_allow_unverified_callers on the policy to accept that)",
            )
        if not self._workloads:
            return  # no selectors to check against: an upstream SPIRE decides who gets what
        if spiffe_id not in entitled_ids(self._workloads, caller):
            raise InjectError(NOT_ENTITLED, f"caller {caller.describe()} is not entitled to {spiffe_id}")

    def token(self, spiffe_id: SpiffeId, audience: str) -> JwtSvid:
        """A JWT-SVID for `spiffe_id` and `audience`, from the cache while it is fresh enough.

        Callers authorise first (`inject` does): this only mints.

        Args:
            spiffe_id: the identity.
            audience: the single audience of the token.

        Returns:
            The JWT-SVID.

        Raises:
            InjectError: ``no_audience`` (empty audience) or ``mint_failed`` (the source could not mint).
        """
        if not audience:
            raise InjectError(NO_AUDIENCE, "no audience for the injected token")
        key = (spiffe_id, audience)
        with self._lock:
            cached = self._tokens.get(key)
            if cached is not None and self._clock() < cached[1]:
                self._tokens.move_to_end(key)
                return cached[0]
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.svid is None:
                raise flight.error or InjectError(MINT_FAILED, f"cannot mint a JWT-SVID for {spiffe_id}")
            return flight.svid
        try:
            flight.svid = self._mint(key)
        except InjectError as err:
            flight.error = err
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()
        return flight.svid

    def _mint(self, key: tuple[SpiffeId, str]) -> JwtSvid:
        spiffe_id, audience = key
        try:
            svid = self._minter(spiffe_id, (audience,))
        except SvidgateError as err:
            raise InjectError(MINT_FAILED, f"cannot mint a JWT-SVID for {spiffe_id}: {err}") from None
        now = self._clock()
        issued = svid.issued_at if svid.issued_at is not None else now
        refresh_at = min(issued + (svid.expiry - issued) / 2, svid.expiry - REFRESH_BEFORE_EXPIRY)
        with self._lock:
            self._tokens[key] = (svid, refresh_at)
            self._tokens.move_to_end(key)
            while len(self._tokens) > MAX_CACHED:
                self._tokens.popitem(last=False)
        return svid
