"""The Check service on real gRPC servers (grpc.aio and threaded), with real tokens from a test CA."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
import grpc.aio
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from prometheus_client import CollectorRegistry

from svidgate.config import AuthzConfig, parse_config
from svidgate.extauthz import decision as decide_module
from svidgate.extauthz import servicer as servicer_module
from svidgate.extauthz.inject import TokenInjector
from svidgate.extauthz.reload import PolicyHolder
from svidgate.extauthz.servicer import (
    AuthorizationServicer,
    DecisionLog,
    new_sync_check_server,
    to_check_response,
)
from svidgate.identity.entitlement import CallerInfo
from svidgate.identity.jwtsvid import JwtSvid, parse_jwt_svid_insecure
from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
from svidgate.identity.spiffe_id import SpiffeId
from svidgate.metrics import Metrics
from tests.support.ca import NOW, TestCA

CONFIG = """
trust_domain: example.org
federation:
  partner.test:
    bundle_file: /nonexistent/partner.json
workloads:
  - spiffe_id: spiffe://example.org/egress
    selectors: [unix:uid:1000]
authz:
  policies:
    - name: health
      match: {path_exact: /healthz}
      require_token: false
    - name: egress
      mode: inject
      match: {context_extensions: {policy: egress}}
      audiences: [backend, other]
      inject_audience: backend
    - name: shadow
      match: {path_prefix: /shadow/}
      audiences: [api]
      allow: [spiffe://example.org/web]
      dry_run: true
    - name: api
      match: {hosts: [api.example.org]}
      audiences: [api]
      allow: [spiffe://example.org/web, 'spiffe://partner.test/ns/*']
"""


def authz_config(text: str = CONFIG) -> AuthzConfig:
    return parse_config(text, "test").authz


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org")


@pytest.fixture(scope="module")
def partner() -> TestCA:
    return TestCA("partner.test")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


class CaMinter:
    def __init__(self, ca: TestCA) -> None:
        self.ca = ca
        self.calls = 0

    def __call__(self, spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        self.calls += 1
        return parse_jwt_svid_insecure(self.ca.create_jwt_svid(spiffe_id, list(audience), now=NOW))


@pytest.fixture
def servicer(ca: TestCA, partner: TestCA, metrics: Metrics) -> AuthorizationServicer:
    feed = SnapshotFeed(IdentitySnapshot(bundles={**ca.bundles(), **partner.bundles()}, version=1))
    workloads = parse_config(CONFIG, "test").workloads
    injector = TokenInjector(CaMinter(ca), workloads, lambda: NOW)
    return AuthorizationServicer(
        feed,
        PolicyHolder(authz_config()),
        metrics.authz,
        clock=lambda: NOW,
        injector=injector,
        peers=lambda peer: CallerInfo(uid=1000),
    )


@pytest.fixture
async def stub(servicer: AuthorizationServicer) -> AsyncIterator[external_auth_pb2_grpc.AuthorizationStub]:
    server = grpc.aio.server()
    servicer.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield external_auth_pb2_grpc.AuthorizationStub(channel)
    await server.stop(None)


@pytest.fixture
def sync_stub(servicer: AuthorizationServicer) -> Iterator[external_auth_pb2_grpc.AuthorizationStub]:
    server = new_sync_check_server(servicer, max_workers=2)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield external_auth_pb2_grpc.AuthorizationStub(channel)
    server.stop(None)


def request(
    token: str | None = None,
    *,
    host: str = "api.example.org",
    path: str = "/orders?x=1",
    headers: dict[str, str] | None = None,
    extensions: dict[str, str] | None = None,
) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.host, http.path, http.id = "GET", host, path, "req-1"
    if token is not None:
        http.headers["authorization"] = f"Bearer {token}"
    http.headers.update(headers or {})
    req.attributes.context_extensions.update(extensions or {})
    return req


def ok_headers(response: external_auth_pb2.CheckResponse) -> dict[str, tuple[str, int]]:
    return {h.header.key: (h.header.value, h.append_action) for h in response.ok_response.headers}


def metadata(response: external_auth_pb2.CheckResponse) -> dict[str, Any]:
    return {k: v.string_value or v.bool_value for k, v in response.dynamic_metadata.fields.items()}


async def test_allow(stub: Any, ca: TestCA) -> None:
    token = ca.create_jwt_svid("spiffe://example.org/web", ["api"])
    response = await stub.Check(request(token, headers={"x-spiffe-id": "spiffe://forged/x"}))
    assert response.status.code == 0
    assert response.WhichOneof("http_response") == "ok_response"
    assert ok_headers(response) == {
        "x-spiffe-id": ("spiffe://example.org/web", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
    }
    assert list(response.ok_response.headers_to_remove) == ["authorization"]
    md = metadata(response)
    assert md["spiffe_id"] == "spiffe://example.org/web"
    assert md["policy"] == "api"
    assert md["reason"] == "allowed"
    assert len(md["decision_id"]) == 16
    # The second answer is copied from the memoised template: same content, its own decision ID.
    again = await stub.Check(request(token))
    assert ok_headers(again) == ok_headers(response)
    assert metadata(again)["decision_id"] != md["decision_id"]
    assert len(again.ok_response.headers) == 1


async def test_federated_trust_domain_allowed_by_glob(stub: Any, partner: TestCA) -> None:
    token = partner.create_jwt_svid("spiffe://partner.test/ns/payments", ["api"])
    response = await stub.Check(request(token))
    assert response.status.code == 0
    assert ok_headers(response)["x-spiffe-id"][0] == "spiffe://partner.test/ns/payments"


@pytest.mark.parametrize(
    ("make", "status", "reason"),
    [
        (lambda ca: None, 401, "missing_token"),
        (lambda ca: ca.create_jwt_svid("spiffe://example.org/web", ["api"], now=NOW - 3600), 401, "expired"),
        (lambda ca: ca.create_jwt_svid("spiffe://example.org/web", ["other"]), 401, "audience_mismatch"),
        (
            lambda ca: TestCA("unknown.test").create_jwt_svid("spiffe://unknown.test/web", ["api"]),
            401,
            "unknown_trust_domain",
        ),
        (
            lambda ca: TestCA("example.org").create_jwt_svid("spiffe://example.org/web", ["api"]),
            401,
            "unknown_key",
        ),
        (lambda ca: ca.create_jwt_svid("spiffe://example.org/db", ["api"]), 403, "subject_not_allowed"),
    ],
)
async def test_denials_are_responses_not_rpc_errors(
    stub: Any, ca: TestCA, make: Any, status: int, reason: str
) -> None:
    response = await stub.Check(request(make(ca)))
    assert response.status.code != 0
    assert response.WhichOneof("http_response") == "denied_response"
    assert response.denied_response.status.code == status
    assert metadata(response)["reason"] == reason
    assert f'"reason":"{reason}"' in response.denied_response.body
    headers = {h.header.key: h.header.value for h in response.denied_response.headers}
    assert ("www-authenticate" in headers) is (status == 401)
    assert headers["x-svidgate-decision-id"] == metadata(response)["decision_id"]


async def test_duplicate_header_via_raw_headers(stub: Any, ca: TestCA) -> None:
    token = ca.create_jwt_svid("spiffe://example.org/web", ["api"])
    req = request()
    for _ in range(2):
        header = req.attributes.request.http.header_map.headers.add()
        header.key, header.raw_value = "authorization", f"Bearer {token}".encode()
    response = await stub.Check(req)
    assert response.denied_response.status.code == 401
    assert metadata(response)["reason"] == "duplicate_token"


async def test_no_token_required_and_no_policy(stub: Any) -> None:
    response = await stub.Check(request(host="anything", path="/healthz"))
    assert response.status.code == 0
    assert list(response.ok_response.headers_to_remove) == ["x-spiffe-id"]
    response = await stub.Check(request(host="elsewhere.example.org", path="/"))
    assert response.denied_response.status.code == 403
    assert metadata(response)["reason"] == "no_matching_policy"


async def test_dry_run_allows_and_counts(stub: Any, ca: TestCA, metrics: Metrics) -> None:
    response = await stub.Check(request(None, path="/shadow/x"))
    assert response.status.code == 0
    md = metadata(response)
    assert (md["reason"], md["dry_run"], md["policy"]) == ("missing_token", True, "shadow")
    labels = {"policy": "shadow", "result": "deny", "reason": "missing_token", "dry_run": "true"}
    assert metrics.registry.get_sample_value("svidgate_authz_decisions_total", labels) == 1


async def test_cache_hits_are_counted(
    stub: Any, ca: TestCA, metrics: Metrics, servicer: AuthorizationServicer
) -> None:
    token = ca.create_jwt_svid("spiffe://example.org/web", ["api"])
    for _ in range(3):
        assert (await stub.Check(request(token))).status.code == 0
    registry = metrics.registry
    assert registry.get_sample_value("svidgate_authz_token_cache_misses_total") == 1
    assert registry.get_sample_value("svidgate_authz_token_cache_hits_total") == 2
    assert registry.get_sample_value("svidgate_authz_token_cache_entries") == 1
    assert registry.get_sample_value("svidgate_authz_check_duration_seconds_count") == 3


async def test_internal_error_denies_with_a_response(
    stub: Any, ca: TestCA, servicer: AuthorizationServicer, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(servicer.cache, "validate", broken)
    token = ca.create_jwt_svid("spiffe://example.org/web", ["api"])
    with caplog.at_level(logging.ERROR, logger="svidgate.extauthz.servicer"):
        response = await stub.Check(request(token))
    assert response.status.code != 0
    assert response.denied_response.status.code == 403
    assert metadata(response)["reason"] == "internal_error"
    assert any(r.getMessage() == "authz.internal_error" for r in caplog.records)
    assert all(token not in r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)


async def test_hot_reload_changes_the_decision(
    stub: Any, ca: TestCA, servicer: AuthorizationServicer
) -> None:
    token = ca.create_jwt_svid("spiffe://example.org/db", ["api"])
    assert (await stub.Check(request(token))).denied_response.status.code == 403
    holder = servicer._policies
    holder.swap(
        authz_config(CONFIG.replace("allow: [spiffe://example.org/web,", "allow: [spiffe://example.org/db,"))
    )
    for _ in range(2):
        assert (await stub.Check(request(token))).status.code == 0
    assert holder.generation == 1


async def test_inject(stub: Any, servicer: AuthorizationServicer) -> None:
    first = await stub.Check(request(None, host="backend", extensions={"policy": "egress"}))
    assert first.status.code == 0
    value, action = ok_headers(first)["authorization"]
    assert value.startswith("Bearer ")
    assert action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    svid = parse_jwt_svid_insecure(value.removeprefix("Bearer "))
    assert str(svid.spiffe_id) == "spiffe://example.org/egress"
    assert svid.audience == ("backend",)
    second = await stub.Check(request(None, extensions={"policy": "egress", "audience": "other"}))
    assert parse_jwt_svid_insecure(ok_headers(second)["authorization"][0][7:]).audience == ("other",)
    third = await stub.Check(request(None, host="backend", extensions={"policy": "egress"}))
    assert ok_headers(third)["authorization"][0] == value  # re-used, not re-minted
    assert metadata(third)["reason"] == "injected"


async def test_inject_refuses_unentitled_peer(stub: Any, servicer: AuthorizationServicer) -> None:
    servicer._peers = lambda peer: CallerInfo(uid=4242)
    response = await stub.Check(request(None, extensions={"policy": "egress"}))
    assert response.denied_response.status.code == 403
    assert metadata(response)["reason"] == "not_entitled"


def test_threaded_server_serves_the_same_core(sync_stub: Any, ca: TestCA) -> None:
    token = ca.create_jwt_svid("spiffe://example.org/web", ["api"])
    assert sync_stub.Check(request(token)).status.code == 0
    assert sync_stub.Check(request(None)).denied_response.status.code == 401


def test_threaded_server_counts_calls_like_the_aio_interceptor(
    sync_stub: Any, ca: TestCA, metrics: Metrics
) -> None:
    token = ca.create_jwt_svid("spiffe://example.org/web", ["api"])
    sync_stub.Check(request(token))
    sync_stub.Check(request(None))  # a denial is still an OK RPC
    labels = {"service": "envoy.service.auth.v3.Authorization", "method": "Check"}
    registry = metrics.registry
    assert registry.get_sample_value("svidgate_grpc_server_started_total", labels) == 2
    assert registry.get_sample_value("svidgate_grpc_server_handled_total", {**labels, "code": "OK"}) == 2


def test_decision_log_rate_limit_and_sampling() -> None:
    now = [0.0]
    log = DecisionLog(clock=lambda: now[0], rng=lambda: 0.5)
    assert [log.admit(1.0, 2) for _ in range(3)] == [0, 0, None]
    now[0] = 0.5  # half a second refills one token at 2/s
    assert log.admit(1.0, 2) == 1  # reports the one line suppressed
    assert log.admit(0.4, 100) is None  # sampled out (rng 0.5 >= 0.4)
    now[0] = 10.0
    assert log.admit(0.6, 2) == 0  # sampled-out lines are intentional, not "suppressed"


async def test_a_metrics_fault_denies_instead_of_failing_the_rpc(
    stub: Any, ca: TestCA, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Security review: recording used to run outside the fail-closed guard, so an exception there became an
    # RPC error -- which Envoy with failure_mode_allow turns into an ALLOW.
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("metrics down")

    monkeypatch.setattr(metrics.authz.recorder, "check", broken)
    token = ca.create_jwt_svid("spiffe://example.org/web", ["api"])
    response = await stub.Check(request(token))
    assert response.status.code != 0
    assert response.WhichOneof("http_response") == "denied_response"
    assert response.denied_response.status.code == 403
    assert metadata(response)["reason"] == "internal_error"


def test_a_metrics_fault_denies_on_the_threaded_server(
    sync_stub: Any, ca: TestCA, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("metrics down")

    monkeypatch.setattr(metrics.authz.recorder, "check", broken)
    token = ca.create_jwt_svid("spiffe://example.org/web", ["api"])
    response = sync_stub.Check(request(token))
    assert response.status.code != 0
    assert metadata(response)["reason"] == "internal_error"


@pytest.mark.parametrize(
    "decision",
    [
        decide_module.Decision(
            allowed=True,
            status=200,
            reason="allowed",
            policy="p",
            spiffe_id="spiffe://example.org/web",
            headers_to_set=(("x-spiffe-id", "spiffe://example.org/web"),),
            headers_to_remove=("authorization",),
        ),
        decide_module.deny(401, "expired", policy="p"),
        decide_module.deny(403, "subject_not_allowed", policy="p", spiffe_id="spiffe://example.org/x"),
        decide_module.internal_error(),
    ],
)
def test_pre_encoded_response_equals_the_built_one(decision: decide_module.Decision) -> None:
    # The template is encoded once and the per-Check decision ID appended as bytes: the receiver must parse
    # exactly the message `to_check_response` builds.
    wire = servicer_module._Prepared(decision).wire(b"0123456789abcdef")
    parsed = external_auth_pb2.CheckResponse.FromString(wire)
    assert parsed == to_check_response(decision, "0123456789abcdef")
    if not decision.allowed:
        keys = [h.header.key for h in parsed.denied_response.headers]
        assert keys[-1] == "x-svidgate-decision-id"


async def test_repeated_checks_share_one_template_and_count_exactly(
    stub: Any, ca: TestCA, metrics: Metrics
) -> None:
    token = ca.create_jwt_svid("spiffe://example.org/web", ["api"])
    ids = set()
    for _ in range(5):
        response = await stub.Check(request(token))
        assert response.status.code == 0
        ids.add(metadata(response)["decision_id"])
    assert len(ids) == 5
    labels = {"policy": "api", "result": "allow", "reason": "allowed", "dry_run": "false"}
    registry = metrics.registry
    assert registry.get_sample_value("svidgate_authz_decisions_total", labels) == 5
    assert registry.get_sample_value("svidgate_authz_check_duration_seconds_count") == 5
