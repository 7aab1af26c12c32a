"""Inject mode: an egress Envoy's Check adds a fresh JWT-SVID to the outgoing request.

Pure apart from a lock and the injected minter (the runtime passes its identity source's `mint_jwt_svid`).

Trust model. Envoy's CheckRequest names neither the calling Envoy nor its node, so the identity to inject for
is not taken from the request: the *policy* names it (``inject_spiffe_id``, validated by the config loader
against ``workloads[]``), and the route picks the policy (``match``, e.g. ``context_extensions: {policy:
egress}``). Whoever can reach the Check endpoint and match an inject policy therefore receives tokens for that
policy's identity -- the same trust the operator already places in every Envoy that can reach svidgate's SDS
socket with a claimed node ID. Where svidgate knows more, it checks more: when the Check arrives over the unix
socket through the peer-credential front, the kernel-verified uid/gid/pid (plus the claimed
``node_id``/``cluster`` from the route's ``context_extensions``, as SDS takes them from the node) must
*entitle* the caller to that identity through ``workloads[].selectors``, or the request is denied
(``not_entitled``). Serve Check on a unix socket (mode 0660, the Envoy's group) for egress, and never expose
an inject-mode Check on a routable address.

The audience is the route's ``context_extensions["audience"]`` when set (one egress policy can serve several
destinations), else the policy's ``inject_audience``.

Tokens are minted once per (SPIFFE ID, audience) and re-used until half their lifetime has passed or 30 s
before expiry, whichever comes first -- never one signature per request, and never a token that could expire
in flight.
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
    from svidgate.config import Workload
    from svidgate.identity.jwtsvid import JwtSvid
    from svidgate.identity.spiffe_id import SpiffeId

__all__ = [
    "MINT_FAILED",
    "NOT_ENTITLED",
    "NO_AUDIENCE",
    "NO_IDENTITY",
    "InjectError",
    "Minter",
    "TokenInjector",
    "caller_from_extensions",
]

#: Mints a JWT-SVID for a SPIFFE ID and audiences (`IdentitySource.mint_jwt_svid`); raises SvidgateError.
Minter = Callable[["SpiffeId", Sequence[str]], "JwtSvid"]

NOT_ENTITLED: Final = "not_entitled"
NO_IDENTITY: Final = "no_identity"
NO_AUDIENCE: Final = "no_audience"
MINT_FAILED: Final = "mint_failed"

#: Re-mint this long before expiry at the latest: covers Envoy's queueing, the upstream hop and clock skew.
REFRESH_BEFORE_EXPIRY: Final = 30.0
#: Distinct (SPIFFE ID, audience) pairs kept; audiences come from Envoy config: a safety bound only.
MAX_CACHED: Final = 4096


class InjectError(SvidgateError):
    """No token can be injected for this request.

    Attributes:
        reason: ``not_entitled``, ``no_identity``, ``no_audience`` or ``mint_failed``.
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
        The caller, or None when nothing at all is known about it (then no entitlement check is possible).
    """
    node_id = context_extensions.get("node_id")
    cluster = context_extensions.get("cluster")
    if peer is None:
        return CallerInfo(node_id=node_id, cluster=cluster) if node_id or cluster else None
    return peer.with_node(node_id, cluster)


class TokenInjector:
    """Mints (and re-uses) the JWT-SVIDs that inject-mode policies add to requests.

    Args:
        minter: mints a JWT-SVID (the identity source's `mint_jwt_svid`).
        workloads: ``workloads[]``, for the entitlement check of callers svidgate knows something about.
        clock: the time source.
    """

    def __init__(
        self, minter: Minter, workloads: Sequence[Workload] = (), clock: Clock = system_clock
    ) -> None:
        self._minter = minter
        self._workloads: tuple[Workload, ...] = tuple(workloads)
        self._clock = clock
        self._tokens: OrderedDict[tuple[SpiffeId, str], tuple[JwtSvid, float]] = OrderedDict()
        # One lock for lookups and mints: a mint costs ~100 us and happens once per token lifetime, so
        # serialising it also means concurrent requests for a new audience mint once, not once each.
        self._lock = threading.Lock()

    def swap_workloads(self, workloads: Sequence[Workload]) -> None:
        """Replace the workloads after a config reload (one reference assignment)."""
        self._workloads = tuple(workloads)

    def check_entitled(self, spiffe_id: SpiffeId, caller: CallerInfo | None) -> None:
        """Refuse a caller that svidgate can identify but that is not entitled to `spiffe_id`.

        Args:
            spiffe_id: the identity the policy injects.
            caller: what is known about the caller; None skips the check (see the module's trust model).

        Raises:
            InjectError: ``not_entitled``.
        """
        if caller is None or not self._workloads:
            return
        if spiffe_id not in entitled_ids(self._workloads, caller):
            raise InjectError(NOT_ENTITLED, f"caller {caller.describe()} is not entitled to {spiffe_id}")

    def token(self, spiffe_id: SpiffeId, audience: str) -> JwtSvid:
        """A JWT-SVID for `spiffe_id` and `audience`, from the cache while it is fresh enough.

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
        now = self._clock()
        with self._lock:
            cached = self._tokens.get(key)
            if cached is not None and now < cached[1]:
                self._tokens.move_to_end(key)
                return cached[0]
            try:
                svid = self._minter(spiffe_id, (audience,))
            except SvidgateError as err:
                raise InjectError(MINT_FAILED, f"cannot mint a JWT-SVID for {spiffe_id}: {err}") from None
            issued = svid.issued_at if svid.issued_at is not None else now
            refresh_at = min(issued + (svid.expiry - issued) / 2, svid.expiry - REFRESH_BEFORE_EXPIRY)
            self._tokens[key] = (svid, refresh_at)
            self._tokens.move_to_end(key)
            while len(self._tokens) > MAX_CACHED:
                self._tokens.popitem(last=False)
            return svid
