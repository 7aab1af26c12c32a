"""The pure decision (svidgate.extauthz.decision): every path, table-driven where it can be."""

from __future__ import annotations

import json

import pytest

from svidgate.config import AllowRule, AuthzConfig, Policy, PolicyMatch
from svidgate.errors import JwtSvidError
from svidgate.extauthz.decision import (
    ALLOWED,
    DEFAULT_ALLOW,
    NO_MATCHING_POLICY,
    NO_TOKEN_REQUIRED,
    SUBJECT_NOT_ALLOWED,
    decide,
    inject_decision,
    internal_error,
)
from svidgate.extauthz.policy import CompiledAuthz, compile_authz
from svidgate.extauthz.token import MISSING_TOKEN, TokenError
from svidgate.identity.jwtsvid import JwtSvid
from svidgate.identity.spiffe_id import SpiffeId

WEB = "spiffe://example.org/web"


def _svid(subject: str = WEB) -> JwtSvid:
    return JwtSvid("a.b.c", SpiffeId.parse(subject), ("api",), 2_000_000_000, None, {})


def _authz(**policy: object) -> CompiledAuthz:
    defaults: dict[str, object] = {
        "name": "api",
        "match": PolicyMatch(),
        "audiences": ("api",),
        "allow": (AllowRule.parse(WEB),),
    }
    defaults.update(policy)
    hide = bool(defaults.pop("hide_details", False))
    return compile_authz(AuthzConfig(policies=(Policy(**defaults),), hide_details=hide))  # type: ignore[arg-type]


def test_allow_sets_spiffe_id_and_removes_token() -> None:
    authz = _authz()
    d = decide(authz, authz.policies[0], _svid())
    assert (d.allowed, d.status, d.reason, d.policy, d.spiffe_id) == (True, 200, ALLOWED, "api", WEB)
    assert d.headers_to_set == (("x-spiffe-id", WEB),)
    assert d.headers_to_remove == ("authorization",)
    assert d.verdict == "allow"


def test_keep_token() -> None:
    authz = _authz(keep_token=True)
    assert decide(authz, authz.policies[0], _svid()).headers_to_remove == ()


def test_subject_not_allowed_is_403_without_challenge() -> None:
    authz = _authz()
    d = decide(authz, authz.policies[0], _svid("spiffe://example.org/other"))
    assert (d.allowed, d.status, d.reason) == (False, 403, SUBJECT_NOT_ALLOWED)
    assert "www-authenticate" not in dict(d.response_headers)
    assert json.loads(d.body) == {"error": "forbidden", "reason": SUBJECT_NOT_ALLOWED}


@pytest.mark.parametrize(
    ("error", "challenge"),
    [
        (TokenError(MISSING_TOKEN, "no header"), "Bearer"),
        (TokenError("malformed_token", "x"), 'Bearer error="invalid_token"'),
        (TokenError("duplicate_token", "x"), 'Bearer error="invalid_token"'),
        (JwtSvidError("expired", "x"), 'Bearer error="invalid_token"'),
        (JwtSvidError("audience_mismatch", "x"), 'Bearer error="invalid_token"'),
        (JwtSvidError("unknown_trust_domain", "x"), 'Bearer error="invalid_token"'),
        (JwtSvidError("bad_signature", "x"), 'Bearer error="invalid_token"'),
    ],
)
def test_token_errors_are_401_with_rfc6750_challenge(
    error: TokenError | JwtSvidError, challenge: str
) -> None:
    authz = _authz()
    d = decide(authz, authz.policies[0], error)
    assert (d.allowed, d.status, d.reason) == (False, 401, error.reason)
    headers = dict(d.response_headers)
    assert headers["www-authenticate"] == challenge
    assert headers["content-type"] == "application/json"
    assert json.loads(d.body)["reason"] == error.reason


def test_hide_details_keeps_reason_out_of_body_only() -> None:
    authz = _authz(hide_details=True)
    d = decide(authz, authz.policies[0], JwtSvidError("expired", "x"))
    assert json.loads(d.body) == {"error": "unauthorized"}
    assert d.reason == "expired"


def test_no_policy_default_deny_and_allow() -> None:
    deny_all = compile_authz(AuthzConfig())
    d = decide(deny_all, None, None)
    assert (d.allowed, d.status, d.reason) == (False, 403, NO_MATCHING_POLICY)
    allow_all = compile_authz(AuthzConfig(default="allow"))
    d = decide(allow_all, None, None)
    assert (d.allowed, d.reason, d.headers_to_remove) == (True, DEFAULT_ALLOW, ("x-spiffe-id",))


def test_require_token_false_allows_without_identity() -> None:
    authz = _authz(require_token=False, audiences=(), allow=())
    d = decide(authz, authz.policies[0], None)
    assert (d.allowed, d.reason, d.spiffe_id) == (True, NO_TOKEN_REQUIRED, None)
    assert d.headers_to_set == ()
    assert d.headers_to_remove == ("x-spiffe-id",)  # a client-made x-spiffe-id never reaches upstream


@pytest.mark.parametrize(
    ("outcome", "reason", "status"),
    [
        (JwtSvidError("expired", "x"), "expired", 401),
        (_svid("spiffe://example.org/other"), SUBJECT_NOT_ALLOWED, 403),
    ],
)
def test_dry_run_allows_but_reports(outcome: JwtSvid | JwtSvidError, reason: str, status: int) -> None:
    authz = _authz(dry_run=True)
    d = decide(authz, authz.policies[0], outcome)
    assert (d.allowed, d.dry_run, d.reason, d.status, d.verdict) == (True, True, reason, status, "deny")
    assert d.headers_to_set == ()
    assert d.headers_to_remove == ("x-spiffe-id",)


def test_dry_run_allow_is_a_normal_allow() -> None:
    authz = _authz(dry_run=True)
    d = decide(authz, authz.policies[0], _svid())
    assert (d.allowed, d.dry_run, d.headers_to_set) == (True, False, (("x-spiffe-id", WEB),))


def test_internal_error_denies() -> None:
    d = internal_error()
    assert (d.allowed, d.status, d.reason) == (False, 403, "internal_error")


def test_inject_decision_overwrites_token_header() -> None:
    authz = _authz()
    d = inject_decision(authz, authz.policies[0], _svid())
    assert d.allowed
    assert d.headers_to_set == (("authorization", "Bearer a.b.c"),)
    assert d.spiffe_id == WEB
