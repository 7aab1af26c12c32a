"""Policy matching and subject rules (svidgate.extauthz.policy): table-driven."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from svidgate.config import AllowRule, AuthzConfig, Policy, PolicyMatch, parse_config
from svidgate.extauthz.decision import decide
from svidgate.extauthz.policy import (
    AMBIGUOUS_REQUEST,
    CompiledAuthz,
    SubjectMatcher,
    canonical_host,
    compile_authz,
    normalize_host,
    normalize_path,
    strip_query,
)
from svidgate.extauthz.token import MISSING_TOKEN
from svidgate.identity.jwtsvid import JwtSvid
from svidgate.identity.spiffe_id import SpiffeId


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


# Hardening: policies match the canonical host and path, and ambiguous requests never pass.
# Regression for the review's policy_match.py: `//admin`, `/public/../admin`, `/%61dmin` and `/healthz;/admin`
# used to miss an `/admin` policy (and fall through to `authz.default`), and `Host: evil.com:80@good` was read
# as `evil.com`.

# The review's pol.yaml: note `default: allow`, the worst case for a policy that fails to match.
REVIEW = """
trust_domain: example.org
authz:
  policies:
    - name: public
      match: {hosts: [public.example.org], path_prefix: /public}
      require_token: false
    - name: health
      match: {path_exact: /healthz}
      require_token: false
    - name: admin
      match: {path_prefix: /admin}
      audiences: [admin]
      allow: [spiffe://example.org/ops]
    - name: api-host
      match: {hosts: [api.example.org, "*.svc.example.org", "[::1]"]}
      audiences: [api]
      allow: ["*"]
  default: allow
"""


@pytest.fixture(scope="module")
def authz() -> CompiledAuthz:
    return compile_authz(parse_config(REVIEW, "test").authz)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/admin", "/admin"),
        ("", "/"),
        ("/", "/"),
        ("//admin", "/admin"),
        ("///admin//x", "/admin/x"),
        ("/public/../admin", "/admin"),
        ("/./admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("/%2e%2e/admin", "/admin"),  # encoded dots are dots (decoded before dot-segment removal)
        ("/public/%2E%2E/admin", "/admin"),
        ("/healthz/../admin", "/admin"),
        ("/../../admin", "/admin"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a/..", "/"),
        ("/a/.b/..c", "/a/.b/..c"),  # dots inside a name are not dot segments
        ("/file.txt", "/file.txt"),
        ("/a%7eb", "/a~b"),
        ("/a%20b", "/a%20b"),
        ("/a%3fb", "/a%3Fb"),  # a reserved character stays encoded, hex upper-cased
        ("/healthz?/../admin", "/healthz"),  # the query is not the path
        ("/healthz#/admin", "/healthz"),
        ("/Admin", "/Admin"),  # case-sensitive: RFC 3986 6.2.2.1
        # No single reading: refused.
        ("/admin%2f", None),
        ("/public%2F..%2Fadmin", None),
        ("/a%5Cb", None),
        ("/a\\b", None),
        ("/healthz;/admin", None),
        ("/public/..;/admin", None),
        ("/a%3Bb", None),
        ("/a%00b", None),
        ("/a\nb", None),
        ("/a b", None),
        ("/caf\u00e9", None),
        ("/a%zz", None),
        ("/a%2", None),
        ("*", None),
        ("http://evil/admin", None),
    ],
)
def test_normalize_path(path: str, expected: str | None) -> None:
    assert normalize_path(path) == expected


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        ("public.example.org", "/public/x", "public"),
        ("PUBLIC.example.org:8443", "/public/x", "public"),
        ("public.example.org.", "/public", "public"),
        ("x", "/admin", "admin"),
        ("x", "//admin", "admin"),
        ("x", "/public/../admin", "admin"),
        ("public.example.org", "/public/../admin", "admin"),
        ("x", "/%61dmin", "admin"),
        ("x", "/healthz/../admin", "admin"),
        ("x", "/./admin", "admin"),
        ("x", "/healthz", "health"),
        ("x", "/healthz?/../admin", "health"),
        ("x", "/healthz#/admin", "health"),
        ("x", "/Admin", None),  # case-sensitive, documented
        # Ambiguous: the built-in deny, never `authz.default: allow`.
        ("x", "/admin%2f", AMBIGUOUS_REQUEST),
        ("x", "/healthz;/admin", AMBIGUOUS_REQUEST),
        ("public.example.org", "/public/..;/admin", AMBIGUOUS_REQUEST),
        ("public.example.org", "/public/..%2Fadmin", AMBIGUOUS_REQUEST),
        ("x", "/public\\..\\admin", AMBIGUOUS_REQUEST),
    ],
)
def test_select_on_canonical_path(authz: CompiledAuthz, host: str, path: str, expected: str | None) -> None:
    selected = authz.select(host, path, "GET", {})
    assert (selected.name if selected else None) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.org", "api.example.org"),
        ("API.Example.ORG", "api.example.org"),
        ("api.example.org:8443", "api.example.org"),
        ("api.example.org:", "api.example.org"),
        ("api.example.org.", "api.example.org"),
        (" api.example.org ", "api.example.org"),
        ("[::1]:8080", "::1"),
        ("[0:0::1]", "::1"),  # one address, one spelling
        ("::1", "::1"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("", ""),
        # No single reading: refused.
        ("evil.com:80@good", None),
        ("good@evil.com", None),
        ("evil.com:80@api.example.org", None),
        ("api.example.org:80:80", None),
        ("api.example.org:99999x", None),
        ("api.example.org..", None),
        ("api..example.org", None),
        ("api.example.org/x", None),
        ("api.example.org\\x", None),
        ("api example.org", None),
        ("b\u00fccher.example", None),  # IDNA U-label: use the xn-- form
        ("\u212a8s.io", None),  # KELVIN SIGN: str.lower() would make it "k8s.io"
        ("api\uff0eexample\uff0eorg", None),  # FULLWIDTH FULL STOP, a dot only after IDNA mapping
        ("\u0430pi.example.org", None),  # Cyrillic a
        ("[::1", None),
        ("[::1]x", None),
        ("[not-v6]", None),
        ("[fe80::1%eth0]", None),
    ],
)
def test_canonical_host(host: str, expected: str | None) -> None:
    assert canonical_host(host) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.org", "api-host"),
        ("API.EXAMPLE.ORG:443", "api-host"),
        ("a.svc.example.org", "api-host"),
        ("[::1]:80", "api-host"),
        ("[0::1]", "api-host"),
        ("svc.example.org", None),  # the bare suffix is not a subdomain
        ("api.example.org.evil", None),
        # Would have matched a host policy (or been read as another host) before.
        ("evil.com:80@api.example.org", AMBIGUOUS_REQUEST),
        ("api.example.org:80@evil.com", AMBIGUOUS_REQUEST),
        ("\u212a.svc.example.org", AMBIGUOUS_REQUEST),
        ("api\uff0eexample.org", AMBIGUOUS_REQUEST),
    ],
)
def test_select_on_canonical_host(authz: CompiledAuthz, host: str, expected: str | None) -> None:
    selected = authz.select(host, "/x", "GET", {})
    assert (selected.name if selected else None) == expected


def test_ambiguous_request_is_denied_whatever_the_token_and_default(authz: CompiledAuthz) -> None:
    assert authz.default_allow
    policy = authz.select("x", "/healthz;/admin", "GET", {})
    assert policy is not None
    denied = decide(authz, policy, None)
    assert (denied.allowed, denied.status, denied.reason, denied.policy) == (
        False,
        401,
        MISSING_TOKEN,
        AMBIGUOUS_REQUEST,
    )
    svid = JwtSvid("t", SpiffeId.parse("spiffe://example.org/ops"), ("admin",), 2, 1, {})
    with_token = decide(authz, policy, svid)
    assert (with_token.allowed, with_token.status) == (False, 403)
    # The built-in policy is never one a configuration can name: names may not contain '/'.
    assert "/" in AMBIGUOUS_REQUEST


def test_the_built_in_deny_does_not_depend_on_configuration() -> None:
    empty = compile_authz(AuthzConfig(default="allow"))
    selected = empty.select("x", "/a%2Fb", "GET", {})
    assert selected is not None
    assert not decide(empty, selected, None).allowed


_SEGMENT = st.sampled_from(["a", "admin", ".", "..", "", "%2e", "%2E%2e", "b.c", "%61", "~x"])


@given(st.lists(_SEGMENT, max_size=8), st.booleans())
def test_canonical_paths_are_fixed_points(segments: list[str], trailing: bool) -> None:
    path = "/" + "/".join(segments) + ("/" if trailing else "")
    canonical = normalize_path(path)
    assert canonical is not None
    assert normalize_path(canonical) == canonical
    assert canonical.startswith("/")
    assert "//" not in canonical
    parts = canonical.split("/")
    assert "." not in parts
    assert ".." not in parts
