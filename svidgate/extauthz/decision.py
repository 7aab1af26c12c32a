"""The decision: request attributes, the selected policy and the token's validation outcome -> allow or deny.

Pure: no gRPC, no clock, no I/O; the servicer turns a `Decision` into a `CheckResponse` and `explain` into
text. Every path through `decide` is a table-driven unit test.

Status codes follow RFC 6750 3.1: a request whose token is missing, malformed, expired, for another audience
or signed by no key svidgate trusts gets **401** with ``WWW-Authenticate: Bearer error="invalid_token"`` (a
request that carries no credentials at all gets a bare ``Bearer`` challenge: the RFC says the error code
SHOULD NOT be included then); a valid token whose subject the policy does not allow gets **403**; a request no
policy matches (with ``authz.default: deny``) and an internal fault get 403 too, the status Envoy itself uses
when an authorization service fails closed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from svidgate.errors import JwtSvidError, SvidgateError
from svidgate.extauthz.token import MISSING_TOKEN, TokenError

if TYPE_CHECKING:
    from svidgate.extauthz.policy import CompiledAuthz, CompiledPolicy
    from svidgate.identity.jwtsvid import JwtSvid

__all__ = [
    "ALLOWED",
    "DEFAULT_ALLOW",
    "INJECTED",
    "INTERNAL_ERROR",
    "NO_MATCHING_POLICY",
    "NO_TOKEN_REQUIRED",
    "SPIFFE_ID_HEADER",
    "SUBJECT_NOT_ALLOWED",
    "Decision",
    "decide",
    "deny",
    "inject_decision",
    "internal_error",
]

#: The request header that carries the authenticated caller's SPIFFE ID upstream.
SPIFFE_ID_HEADER: Final = "x-spiffe-id"

# Allow reasons.
ALLOWED: Final = "allowed"
NO_TOKEN_REQUIRED: Final = "no_token_required"  # noqa: S105 -- a reason code
DEFAULT_ALLOW: Final = "default_allow"
INJECTED: Final = "injected"
# Deny reasons of our own (token and JWT-SVID reasons come from `token` and `identity.jwtsvid`).
NO_MATCHING_POLICY: Final = "no_matching_policy"
SUBJECT_NOT_ALLOWED: Final = "subject_not_allowed"
INTERNAL_ERROR: Final = "internal_error"

_ERROR_BY_STATUS: Final = {401: "unauthorized", 403: "forbidden"}


@dataclass(frozen=True, slots=True)
class Decision:
    """What svidgate answers for one Check, and why.

    Attributes:
        allowed: what Envoy is told (True also for a dry-run policy's denial).
        status: the HTTP status of a denial; 200 when allowed; for a dry-run denial, the would-be status.
        reason: a stable code (`ALLOWED`, ``expired``, `SUBJECT_NOT_ALLOWED`...); for a dry-run denial, the
            reason the request *would* have been denied.
        policy: the name of the policy that decided; None when none matched.
        spiffe_id: the authenticated caller (validate mode) or the injected identity (inject mode).
        dry_run: the policy is in dry-run mode and denied; the request passes anyway.
        headers_to_set: request headers to set upstream, replacing any copy the client sent.
        headers_to_remove: request headers to remove before the request goes upstream.
        response_headers: headers of the deny response sent to the client.
        body: the deny response body (a short JSON object).
    """

    allowed: bool
    status: int
    reason: str
    policy: str | None = None
    spiffe_id: str | None = None
    dry_run: bool = False
    headers_to_set: tuple[tuple[str, str], ...] = ()
    headers_to_remove: tuple[str, ...] = ()
    response_headers: tuple[tuple[str, str], ...] = ()
    body: str = ""

    @property
    def verdict(self) -> str:
        """``allow`` or ``deny``: the policy's verdict (``deny`` for a dry-run denial let through)."""
        return "deny" if self.dry_run or not self.allowed else "allow"


def deny(
    status: int,
    reason: str,
    *,
    policy: str | None = None,
    spiffe_id: str | None = None,
    hide_details: bool = False,
) -> Decision:
    """A denial with the RFC 6750 challenge (for 401) and a short JSON body.

    Args:
        status: 401 or 403.
        reason: the stable reason code.
        policy: the policy that denied, if any.
        spiffe_id: the authenticated subject, if any (403).
        hide_details: leave the reason out of the body (it stays in logs, metrics and dynamic metadata).

    Returns:
        The denial.
    """
    error = _ERROR_BY_STATUS.get(status, "forbidden")
    body: dict[str, str] = {"error": error}
    if not hide_details:
        body["reason"] = reason
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    if status == 401:
        challenge = "Bearer" if reason == MISSING_TOKEN else 'Bearer error="invalid_token"'
        headers = (("www-authenticate", challenge), *headers)
    return Decision(
        allowed=False,
        status=status,
        reason=reason,
        policy=policy,
        spiffe_id=spiffe_id,
        response_headers=headers,
        body=json.dumps(body, separators=(",", ":")),
    )


def internal_error() -> Decision:
    """The decision for a fault inside svidgate: a denial, never an allow (fail closed)."""
    return deny(403, INTERNAL_ERROR)


def _anonymous_allow(reason: str, policy: str | None) -> Decision:
    # No authenticated subject: a client-sent x-spiffe-id must not reach the upstream looking authentic.
    return Decision(
        allowed=True,
        status=200,
        reason=reason,
        policy=policy,
        headers_to_remove=(SPIFFE_ID_HEADER,),
    )


def decide(
    authz: CompiledAuthz,
    policy: CompiledPolicy | None,
    outcome: JwtSvid | SvidgateError | None,
) -> Decision:
    """Decide one request in validate mode.

    Args:
        authz: the compiled ``authz`` configuration (default, token header, hide_details).
        policy: the first matching policy, or None.
        outcome: the validated token, the error that stopped extraction/validation (`TokenError`,
            `JwtSvidError`), or None when nothing was extracted (no token required, or no policy matched).

    Returns:
        The decision, a pure function of the arguments (the servicer memoises it per policy and subject).
        A dry-run policy's denial comes back allowed with `dry_run` set and the would-be reason.
    """
    hide = authz.config.hide_details
    if policy is None:
        if authz.default_allow:
            return _anonymous_allow(DEFAULT_ALLOW, None)
        return deny(403, NO_MATCHING_POLICY, hide_details=hide)
    name = policy.name
    if not policy.policy.require_token:
        return _anonymous_allow(NO_TOKEN_REQUIRED, name)
    if isinstance(outcome, (TokenError, JwtSvidError)):
        result = deny(401, outcome.reason, policy=name, hide_details=hide)
    elif outcome is None or isinstance(outcome, SvidgateError):
        result = deny(
            401,
            MISSING_TOKEN if outcome is None else INTERNAL_ERROR,
            policy=name,
            hide_details=hide,
        )
    else:
        subject = str(outcome.spiffe_id)
        if policy.subjects.allows(subject):
            return Decision(
                allowed=True,
                status=200,
                reason=ALLOWED,
                policy=name,
                spiffe_id=subject,
                headers_to_set=((SPIFFE_ID_HEADER, subject),),
                headers_to_remove=() if policy.policy.keep_token else (authz.token_header,),
            )
        result = deny(403, SUBJECT_NOT_ALLOWED, policy=name, spiffe_id=subject, hide_details=hide)
    if policy.policy.dry_run:
        # Decide, log and count, but let the request through untouched (except that an unauthenticated request
        # never carries a client-made x-spiffe-id upstream).
        return Decision(
            allowed=True,
            status=result.status,
            reason=result.reason,
            policy=name,
            spiffe_id=result.spiffe_id,
            dry_run=True,
            headers_to_remove=(SPIFFE_ID_HEADER,),
        )
    return result


def inject_decision(authz: CompiledAuthz, policy: CompiledPolicy, svid: JwtSvid) -> Decision:
    """Allow an egress request with a freshly minted JWT-SVID set as its token header.

    Args:
        authz: the compiled configuration (token header and prefix, the same ones the ingress side reads).
        policy: the inject-mode policy.
        svid: the JWT-SVID to send.

    Returns:
        An allow that overwrites the token header (a token the application sent is replaced, never forwarded
        alongside ours).
    """
    return Decision(
        allowed=True,
        status=200,
        reason=INJECTED,
        policy=policy.name,
        spiffe_id=str(svid.spiffe_id),
        headers_to_set=((authz.token_header, f"{authz.token_prefix}{svid.token}"),),
    )
