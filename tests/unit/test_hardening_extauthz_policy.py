"""Hardening: policies match the canonical host and path, and ambiguous requests never pass.

Regression for the review's policy_match.py: `//admin`, `/public/../admin`, `/%61dmin` and `/healthz;/admin`
used to miss an `/admin` policy (and fall through to `authz.default`), and `Host: evil.com:80@good` was read
as `evil.com`.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from svidgate.config import AuthzConfig, parse_config
from svidgate.extauthz.decision import decide
from svidgate.extauthz.policy import (
    AMBIGUOUS_REQUEST,
    CompiledAuthz,
    canonical_host,
    compile_authz,
    normalize_path,
)
from svidgate.extauthz.token import MISSING_TOKEN
from svidgate.identity.jwtsvid import JwtSvid
from svidgate.identity.spiffe_id import SpiffeId

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
