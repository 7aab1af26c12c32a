"""``svidgate explain``: the decision svidgate would make for a request, and why, computed offline.

Runs exactly the code a Check runs (`policy.CompiledPolicy.mismatch`, `token.extract_token`,
`identity.jwtsvid.validate_jwt_svid`, `decision.decide`), minus the cache and gRPC, and says in plain text
which policies did not match and why, what the token claims, and what Envoy would be told. The token itself is
never printed (only its claims), so the output can be pasted into a ticket.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import TYPE_CHECKING

from svidgate.errors import JwtSvidError, SvidgateError
from svidgate.extauthz.decision import Decision, decide
from svidgate.extauthz.policy import canonical_host, compile_authz, normalize_path
from svidgate.extauthz.token import TokenError, extract_token
from svidgate.identity.jwtsvid import JwtSvid, parse_jwt_svid_insecure, validate_jwt_svid

if TYPE_CHECKING:
    from svidgate.config import AuthzConfig
    from svidgate.identity.bundle import Bundle
    from svidgate.identity.spiffe_id import TrustDomain

__all__ = ["explain"]

_EXPLANATIONS = {
    "missing_token": "the request carries no token",
    "duplicate_token": "the token header was sent more than once",
    "malformed_token": "the token header does not hold a compact JWS after the expected scheme",
    "expired": "the token has expired (beyond the leeway)",
    "audience_mismatch": "the token's aud has none of the policy's audiences",
    "unknown_trust_domain": "svidgate holds no bundle for the token's trust domain",
    "unknown_key": "the bundle of the token's trust domain has no key with the token's kid",
    "bad_signature": "the signature does not verify with the bundle's key",
    "subject_not_allowed": "the token is valid but the policy's allow rules do not name its subject",
    "no_matching_policy": "no policy matches and authz.default is deny",
    "no_token_required": "the policy says require_token: false",
    "default_allow": "no policy matches and authz.default is allow",
    "allowed": "the token is valid and its subject is allowed",
}


def _when(epoch: float, now: float) -> str:
    stamp = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    delta = int(epoch - now)
    return f"{stamp} ({'in ' + str(delta) + 's' if delta >= 0 else str(-delta) + 's ago'})"


def explain(
    authz: AuthzConfig,
    bundles: Mapping[TrustDomain, Bundle],
    *,
    token: str | None,
    host: str,
    path: str,
    method: str = "GET",
    now: float,
    headers: Mapping[str, str] | None = None,
    context_extensions: Mapping[str, str] | None = None,
) -> str:
    """Decide a request offline and explain the decision.

    Args:
        authz: the ``authz`` configuration.
        bundles: the trust bundles svidgate would hold (its own and federated).
        token: the JWT-SVID (with or without the configured scheme prefix), or None for a request without one.
        host: the request's host (port allowed).
        path: the request path (query allowed; it is ignored for matching).
        method: the request method.
        now: the time to decide at (seconds since the epoch).
        headers: further request headers (lower-case names), e.g. to try a custom token header.
        context_extensions: the route's context extensions.

    Returns:
        A multi-line, human-readable explanation that starts with ``decision: ALLOW`` or ``decision: DENY``.

    Raises:
        ConfigError: the ``authz`` configuration cannot be compiled.
    """
    compiled = compile_authz(authz)
    extensions = dict(context_extensions or {})
    request_headers = {k.lower(): v for k, v in (headers or {}).items()}
    if token is not None:
        prefix = compiled.token_prefix
        has_prefix = prefix and token[: len(prefix.strip())].lower() == prefix.strip().lower()
        request_headers[compiled.token_header] = token if has_prefix or not prefix else f"{prefix}{token}"
    lines: list[str] = []
    # The same canonical forms the live Check matches on (`CompiledAuthz.select`).
    n_host, n_path = canonical_host(host), normalize_path(path)
    policy = None
    if n_host is None or n_path is None:
        policy = compiled.ambiguous
        what = "host" if n_host is None else "path"
        lines.append(
            f"policy:   {policy.name!r}: the {what} has no single safe reading, so the request is denied "
            "whatever authz.default says"
        )
    else:
        for index, candidate in enumerate(compiled.policies):
            why_not = candidate.mismatch(n_host, n_path, method, extensions)
            if why_not is None:
                policy = candidate
                lines.append(f"policy:   {candidate.name!r} (authz.policies[{index}]) matches")
                break
            lines.append(f"skipped:  {candidate.name!r} (authz.policies[{index}]): {why_not}")
    if policy is None:
        lines.append(f"policy:   none matches; authz.default is {authz.default}")

    outcome: JwtSvid | SvidgateError | None = None
    raw: str | None = None
    if policy is not None and policy.policy.mode == "inject":
        audience = extensions.get("audience") or policy.policy.inject_audience
        lines.append(
            f"inject:   would add a JWT-SVID for {policy.policy.inject_spiffe_id} with audience {audience!r} "
            f"as {compiled.token_header!r} (minted by the running server, not offline)"
        )
        decision: Decision = Decision(True, 200, "injected", policy.name)
    else:
        if policy is not None and policy.policy.require_token:
            try:
                raw = extract_token(request_headers, compiled.token_header, compiled.token_prefix)
                outcome = validate_jwt_svid(raw, bundles, policy.audiences, now, authz.leeway)
            except (TokenError, JwtSvidError) as err:
                outcome = err
        decision = decide(compiled, policy, outcome)

    if raw is not None:
        try:
            claims = parse_jwt_svid_insecure(raw)
            lines.append(
                f"token:    sub={claims.spiffe_id} aud={list(claims.audience)} "
                f"exp={_when(claims.expiry, now)}"
                + (f" iat={_when(claims.issued_at, now)}" if claims.issued_at is not None else "")
            )
        except JwtSvidError as err:
            lines.append(f"token:    unreadable ({err.reason}: {err.detail})")
    if policy is not None and policy.policy.mode != "inject" and policy.policy.require_token:
        lines.append(
            f"needs:    aud one of {sorted(policy.audiences)}; subject allowed by "
            f"{[str(r) for r in policy.policy.allow]}"
        )
    if isinstance(outcome, (TokenError, JwtSvidError)):
        lines.append(f"why:      {outcome.reason}: {outcome.detail}")
    else:
        lines.append(f"why:      {decision.reason}: {_EXPLANATIONS.get(decision.reason, decision.reason)}")

    verdict = "ALLOW" if decision.allowed else "DENY"
    head = f"decision: {verdict} {decision.status} (reason: {decision.reason})"
    if decision.dry_run:
        head = (
            f"decision: ALLOW (dry run: the policy would DENY {decision.status}, reason: {decision.reason})"
        )
    out = [head, *lines]
    if decision.allowed:
        for key, value in decision.headers_to_set:
            shown = value if key != compiled.token_header else "<token>"
            out.append(f"upstream: set {key}: {shown}")
        for key in decision.headers_to_remove:
            out.append(f"upstream: remove {key}")
    else:
        for key, value in decision.response_headers:
            out.append(f"response: {key}: {value}")
        out.append(f"response: body {decision.body}")
    return "\n".join(out)
