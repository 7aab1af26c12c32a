"""`svidgate explain` (svidgate.extauthz.explain): the offline decision and its reasons, as text."""

from __future__ import annotations

import pytest

from svidgate.config import AuthzConfig, parse_config
from svidgate.extauthz.explain import explain
from tests.support.ca import NOW, TestCA

CONFIG = """
trust_domain: example.org
workloads:
  - spiffe_id: spiffe://example.org/egress
    selectors: [envoy:node_id:egress]
authz:
  policies:
    - name: health
      match: {path_exact: /healthz}
      require_token: false
    - name: api
      match: {hosts: [api.example.org], path_prefix: /api/, methods: [GET]}
      audiences: [api]
      allow: [spiffe://example.org/web]
    - name: egress
      mode: inject
      match: {context_extensions: {policy: egress}}
      inject_audience: backend
"""


@pytest.fixture(scope="module")
def authz() -> AuthzConfig:
    return parse_config(CONFIG, "test").authz


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org")


def test_allow(authz: AuthzConfig, ca: TestCA) -> None:
    token = ca.create_jwt_svid("spiffe://example.org/web", ["api"])
    text = explain(authz, ca.bundles(), token=token, host="api.example.org:443", path="/api/x?y", now=NOW)
    lines = text.splitlines()
    assert lines[0] == "decision: ALLOW 200 (reason: allowed)"
    assert "skipped:  'health' (authz.policies[0]): path '/api/x' is not '/healthz'" in lines
    assert "policy:   'api' (authz.policies[1]) matches" in lines
    assert "upstream: set x-spiffe-id: spiffe://example.org/web" in lines
    assert "upstream: remove authorization" in lines
    assert token not in text  # claims are shown, the token never is


def test_bearer_prefix_accepted(authz: AuthzConfig, ca: TestCA) -> None:
    token = ca.create_jwt_svid("spiffe://example.org/web", ["api"])
    text = explain(
        authz, ca.bundles(), token=f"Bearer {token}", host="api.example.org", path="/api/", now=NOW
    )
    assert text.startswith("decision: ALLOW")


def test_expired_says_when(authz: AuthzConfig, ca: TestCA) -> None:
    token = ca.create_jwt_svid("spiffe://example.org/web", ["api"], now=NOW - 600, ttl=60)
    text = explain(authz, ca.bundles(), token=token, host="api.example.org", path="/api/", now=NOW)
    assert text.startswith("decision: DENY 401 (reason: expired)")
    assert "token:    sub=spiffe://example.org/web aud=['api'] exp=" in text
    assert "540s ago" in text
    assert 'response: www-authenticate: Bearer error="invalid_token"' in text


def test_subject_not_allowed(authz: AuthzConfig, ca: TestCA) -> None:
    token = ca.create_jwt_svid("spiffe://example.org/db", ["api"])
    text = explain(authz, ca.bundles(), token=token, host="api.example.org", path="/api/", now=NOW)
    assert text.startswith("decision: DENY 403 (reason: subject_not_allowed)")
    assert "subject allowed by ['spiffe://example.org/web']" in text


def test_no_policy(authz: AuthzConfig, ca: TestCA) -> None:
    text = explain(authz, ca.bundles(), token=None, host="other", path="/", method="POST", now=NOW)
    assert text.startswith("decision: DENY 403 (reason: no_matching_policy)")
    assert "host 'other' is not one of ['api.example.org']" in text
    assert "context_extensions['policy'] is None, not 'egress'" in text


def test_missing_token_and_health(authz: AuthzConfig, ca: TestCA) -> None:
    text = explain(authz, ca.bundles(), token=None, host="api.example.org", path="/api/", now=NOW)
    assert text.startswith("decision: DENY 401 (reason: missing_token)")
    assert "response: www-authenticate: Bearer" in text
    text = explain(authz, ca.bundles(), token=None, host="x", path="/healthz", now=NOW)
    assert text.startswith("decision: ALLOW 200 (reason: no_token_required)")


def test_inject(authz: AuthzConfig, ca: TestCA) -> None:
    text = explain(
        authz, ca.bundles(), token=None, host="x", path="/", now=NOW, context_extensions={"policy": "egress"}
    )
    assert text.startswith("decision: ALLOW 200 (reason: injected)")
    assert "spiffe://example.org/egress with audience 'backend'" in text
