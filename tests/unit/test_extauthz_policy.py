"""Policy matching and subject rules (svidgate.extauthz.policy): table-driven."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from svidgate.config import AllowRule, AuthzConfig, Policy, PolicyMatch
from svidgate.errors import ConfigError
from svidgate.extauthz.policy import (
    SubjectMatcher,
    compile_authz,
    compile_policy,
    normalize_host,
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
    # (match kwargs, host, path, method, context_extensions, expected)
    ({}, "any.host", "/anything", "DELETE", {}, True),
    ({"hosts": ("api.example.org",)}, "api.example.org:443", "/", "GET", {}, True),
    ({"hosts": ("api.example.org",)}, "API.EXAMPLE.ORG", "/", "GET", {}, True),
    ({"hosts": ("api.example.org",)}, "api.example.org.evil", "/", "GET", {}, False),
    ({"hosts": ("*.example.org",)}, "a.b.example.org", "/", "GET", {}, True),
    ({"hosts": ("*.example.org",)}, "example.org", "/", "GET", {}, False),
    ({"hosts": ("*.example.org",)}, "badexample.org", "/", "GET", {}, False),
    ({"hosts": ("*",)}, "whatever", "/", "GET", {}, True),
    ({"path_prefix": "/api/"}, "h", "/api/v1?x=/admin", "GET", {}, True),
    ({"path_prefix": "/api/"}, "h", "/apix", "GET", {}, False),
    ({"path_prefix": "/api/"}, "h", "/x?/api/", "GET", {}, False),
    ({"path_exact": "/healthz"}, "h", "/healthz?verbose=1", "GET", {}, True),
    ({"path_exact": "/healthz"}, "h", "/healthz/x", "GET", {}, False),
    ({"path_regex": re.compile(r"/users/[0-9]+")}, "h", "/users/42?x", "GET", {}, True),
    ({"path_regex": re.compile(r"/users/[0-9]+")}, "h", "/users/42/x", "GET", {}, False),
    ({"methods": ("GET", "HEAD")}, "h", "/", "get", {}, True),
    ({"methods": ("GET", "HEAD")}, "h", "/", "POST", {}, False),
    ({"context_extensions": {"policy": "pay"}}, "h", "/", "GET", {"policy": "pay", "x": "y"}, True),
    ({"context_extensions": {"policy": "pay"}}, "h", "/", "GET", {"policy": "other"}, False),
    ({"context_extensions": {"policy": "pay"}}, "h", "/", "GET", {}, False),
]


@pytest.mark.parametrize(("match", "host", "path", "method", "extensions", "expected"), MATCH_CASES)
def test_policy_match(
    match: dict[str, Any], host: str, path: str, method: str, extensions: dict[str, str], expected: bool
) -> None:
    authz = compile_authz(AuthzConfig(policies=(_policy(**match),)))
    selected = authz.select(host, path, method, extensions)
    assert (selected is not None) is expected


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
]


@pytest.mark.parametrize(("rules", "subject", "expected"), SUBJECT_CASES)
def test_subject_rules(rules: list[str], subject: str, expected: bool) -> None:
    parsed = [AllowRule.parse(r) for r in rules]
    matcher = SubjectMatcher.compile(parsed, "allow")
    assert matcher.allows(subject) is expected
    # Same semantics as the config's own reference implementation.
    from svidgate.identity.spiffe_id import SpiffeId

    assert any(r.matches(SpiffeId.parse(subject)) for r in parsed) is expected


def test_compile_rejects_token_policy_without_audience() -> None:
    with pytest.raises(ConfigError, match=r"policies\[0\]\.audiences"):
        compile_authz(AuthzConfig(policies=(Policy(name="x", allow=(AllowRule.parse("*"),)),)))


def test_compile_accepts_no_token_policy_without_audience() -> None:
    compile_policy(Policy(name="health", require_token=False), "authz.policies[0]")


def test_compile_rejects_bad_allow_value() -> None:
    with pytest.raises(ConfigError, match="not a SPIFFE ID"):
        SubjectMatcher.compile([AllowRule("id", "example.org/web")], "authz.policies[0].allow")


def test_compile_rejects_empty_token_header() -> None:
    with pytest.raises(ConfigError, match="token_header"):
        compile_authz(AuthzConfig(token_header=" "))


@given(st.text(max_size=100))
def test_normalize_host_lowercases_and_strips_ports(host: str) -> None:
    assume(not host.strip().startswith("["))  # bracketed IPv6 literals are covered by the table above
    once = normalize_host(host)
    assert once == once.lower() or not once.isascii()
    assert ":" not in once or once.count(":") > 1  # only a bare IPv6 address keeps colons
