"""Policy matching and subject rules (svidgate.extauthz.policy): table-driven."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from svidgate.config import AllowRule, AuthzConfig, Policy, PolicyMatch
from svidgate.extauthz.policy import (
    SubjectMatcher,
    canonical_host,
    compile_authz,
    normalize_host,
    normalize_path,
    strip_query,
)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.org", "api.example.org"),
        ("API.Example.ORG", "api.example.org"),
        ("api.example.org:8443", "api.example.org"),
        ("api.example.org.", "api.example.org"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("", ""),
    ],
)
def test_normalize_host(host: str, expected: str) -> None:
    assert normalize_host(host) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/a/b?x=1", "/a/b"), ("/a#frag", "/a"), ("/a", "/a"), ("/?q", "/"), ("/a?b#c", "/a")],
)
def test_strip_query(path: str, expected: str) -> None:
    assert strip_query(path) == expected


def _policy(name: str = "p", **match: Any) -> Policy:
    return Policy(name=name, match=PolicyMatch(**match), audiences=("aud",), allow=(AllowRule.parse("*"),))


MATCH_CASES = [
    # (match kwargs, host, path, method, context_extensions, why it misses: None when it matches)
    ({}, "any.host", "/anything", "DELETE", {}, None),
    ({"hosts": ("api.example.org",)}, "api.example.org:443", "/", "GET", {}, None),
    ({"hosts": ("api.example.org",)}, "API.EXAMPLE.ORG", "/", "GET", {}, None),
    ({"hosts": ("api.example.org",)}, "api.example.org.evil", "/", "GET", {}, "host 'api.example.org.evil'"),
    ({"hosts": ("*.example.org",)}, "a.b.example.org", "/", "GET", {}, None),
    ({"hosts": ("*.example.org",)}, "example.org", "/", "GET", {}, "is not one of ['*.example.org']"),
    ({"hosts": ("*.example.org",)}, "badexample.org", "/", "GET", {}, "host 'badexample.org'"),
    ({"hosts": ("*",)}, "whatever", "/", "GET", {}, None),
    ({"path_prefix": "/api/"}, "h", "/api/v1?x=/admin", "GET", {}, None),
    ({"path_prefix": "/api/"}, "h", "/apix", "GET", {}, "path '/apix' does not start with '/api/'"),
    ({"path_prefix": "/api/"}, "h", "/x?/api/", "GET", {}, "path '/x' does not start"),
    ({"path_exact": "/healthz"}, "h", "/healthz?verbose=1", "GET", {}, None),
    ({"path_exact": "/healthz"}, "h", "/healthz/x", "GET", {}, "path '/healthz/x' is not '/healthz'"),
    ({"path_regex": re.compile(r"/users/[0-9]+")}, "h", "/users/42?x", "GET", {}, None),
    ({"path_regex": re.compile(r"/users/[0-9]+")}, "h", "/users/42/x", "GET", {}, "does not match the regex"),
    ({"methods": ("GET", "HEAD")}, "h", "/", "get", {}, None),
    ({"methods": ("GET", "HEAD")}, "h", "/", "POST", {}, "method POST is not one of ['GET', 'HEAD']"),
    ({"context_extensions": {"policy": "pay"}}, "h", "/", "GET", {"policy": "pay", "x": "y"}, None),
    (
        {"context_extensions": {"policy": "pay"}},
        "h",
        "/",
        "GET",
        {"policy": "other"},
        "context_extensions['policy'] is 'other', not 'pay'",
    ),
    ({"context_extensions": {"policy": "pay"}}, "h", "/", "GET", {}, "is None, not 'pay'"),
]


@pytest.mark.parametrize(("match", "host", "path", "method", "extensions", "why_not"), MATCH_CASES)
def test_policy_match(
    match: dict[str, Any], host: str, path: str, method: str, extensions: dict[str, str], why_not: str | None
) -> None:
    authz = compile_authz(AuthzConfig(policies=(_policy(**match),)))
    selected = authz.select(host, path, method, extensions)
    assert (selected is not None) is (why_not is None)
    # The one matching rule says why it missed (what `svidgate explain` prints).
    (policy,) = authz.policies
    reason = policy.mismatch(canonical_host(host) or "", normalize_path(path) or "", method, extensions)
    if why_not is None:
        assert reason is None
    else:
        assert reason is not None
        assert why_not in reason


def test_first_match_wins() -> None:
    authz = compile_authz(
        AuthzConfig(
            policies=(
                _policy("health", path_exact="/healthz"),
                _policy("api", path_prefix="/"),
                _policy("never", path_prefix="/healthz"),
            )
        )
    )
    assert authz.select("h", "/healthz", "GET", {}).name == "health"  # type: ignore[union-attr]
    assert authz.select("h", "/x", "GET", {}).name == "api"  # type: ignore[union-attr]


def test_no_policy_and_default() -> None:
    assert compile_authz(AuthzConfig()).select("h", "/", "GET", {}) is None
    assert compile_authz(AuthzConfig(default="allow")).default_allow
    assert not compile_authz(AuthzConfig()).default_allow


SUBJECT_CASES = [
    (["spiffe://example.org/web"], "spiffe://example.org/web", True),
    (["spiffe://example.org/web"], "spiffe://example.org/web2", False),
    (["spiffe://example.org/web"], "spiffe://example.org/web/x", False),
    (["spiffe://partner.test/ns/*"], "spiffe://partner.test/ns/a", True),
    (["spiffe://partner.test/ns/*"], "spiffe://partner.test/ns/a/b", True),
    (["spiffe://partner.test/ns/*"], "spiffe://partner.test/ns", False),
    (["spiffe://partner.test/ns/*"], "spiffe://partner.test/nsx/a", False),
    (["spiffe://partner.test/ns/*"], "spiffe://other.test/ns/a", False),
    (["spiffe://partner.test"], "spiffe://partner.test/anything/at/all", True),
    (["spiffe://partner.test"], "spiffe://partner.testx/a", False),
    (["spiffe://partner.test"], "spiffe://sub.partner.test/a", False),
    (["*"], "spiffe://anyone.test/x", True),
    ([], "spiffe://example.org/web", False),
    (["spiffe://a.org/x/*"], "spiffe://a.org/xy", False),
    (["spiffe://a.org/*"], "spiffe://a.org/anything", True),
    (["spiffe://a.org/*"], "spiffe://a.org.evil/x", False),
    (["spiffe://a.org"], "spiffe://b.org/x", False),
]


@pytest.mark.parametrize(("rules", "subject", "expected"), SUBJECT_CASES)
def test_subject_rules(rules: list[str], subject: str, expected: bool) -> None:
    parsed = [AllowRule.parse(r) for r in rules]
    assert SubjectMatcher.compile(parsed).allows(subject) is expected


@given(st.text(max_size=100))
def test_normalize_host_lowercases_and_strips_ports(host: str) -> None:
    assume(not host.strip().startswith("["))  # bracketed IPv6 literals are covered by the table above
    once = normalize_host(host)
    assert once == once.lower() or not once.isascii()
    assert ":" not in once or once.count(":") > 1  # only a bare IPv6 address keeps colons
