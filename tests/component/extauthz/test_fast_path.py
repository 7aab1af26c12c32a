"""The Check decision fast path: a repeated Check is answered from its earlier decision, never wrongly.

Every test decides a request once (the slow path fills the fast path), changes exactly one thing the decision
depends on, and asserts the next identical Check sees the change: a fast path that ignored it would answer
with the stale decision and these tests would fail.
"""

from __future__ import annotations

from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from prometheus_client import CollectorRegistry

from svidgate.config import parse_config
from svidgate.extauthz.inject import TokenInjector
from svidgate.extauthz.reload import PolicyHolder
from svidgate.extauthz.servicer import AuthorizationServicer
from svidgate.identity.entitlement import CallerInfo
from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
from svidgate.metrics import Metrics
from tests.component.extauthz.test_servicer import CONFIG, CaMinter, metadata, request
from tests.support.ca import NOW, TestCA

WEB = "spiffe://example.org/web"


class World:
    """A servicer with a movable clock, a replaceable feed and a changeable caller."""

    def __init__(self, config: str = CONFIG) -> None:
        self.ca = TestCA("example.org")
        self.now = NOW
        self.caller: CallerInfo | None = CallerInfo(uid=1000)
        self.feed = SnapshotFeed(IdentitySnapshot(bundles=self.ca.bundles(), version=1))
        self.registry = CollectorRegistry()
        self.policies = PolicyHolder(parse_config(config, "test").authz)
        workloads = parse_config(config, "test").workloads
        self.servicer = AuthorizationServicer(
            self.feed,
            self.policies,
            Metrics(self.registry).authz,
            clock=lambda: self.now,
            injector=TokenInjector(CaMinter(self.ca), workloads, lambda: self.now),
            peers=lambda peer: self.caller,
        )

    def check(self, req: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
        return self.servicer.check(req, peer=lambda: "unix:svidgate")

    def counter(self, name: str) -> float:
        return self.registry.get_sample_value(name) or 0.0


def status(response: external_auth_pb2.CheckResponse) -> tuple[int, str]:
    code = (
        200 if response.WhichOneof("http_response") == "ok_response" else response.denied_response.status.code
    )
    return code, str(metadata(response)["reason"])


def test_a_repeated_check_is_a_token_cache_hit_with_its_own_decision_id() -> None:
    world = World()
    token = world.ca.create_jwt_svid(WEB, ["api"])
    first, second = world.check(request(token)), world.check(request(token))
    assert status(first) == status(second) == (200, "allowed")
    assert metadata(first)["decision_id"] != metadata(second)["decision_id"]
    assert world.counter("svidgate_authz_token_cache_misses_total") == 1
    assert world.counter("svidgate_authz_token_cache_hits_total") == 1


def test_an_expired_token_is_refused_on_the_next_check() -> None:
    world = World()
    token = world.ca.create_jwt_svid(WEB, ["api"], ttl=60)
    assert status(world.check(request(token))) == (200, "allowed")
    world.now = NOW + 60 + 31  # past exp and the default 30 s leeway
    assert status(world.check(request(token))) == (401, "expired")


def test_a_key_removed_from_the_bundle_is_refused_on_the_next_check() -> None:
    world = World()
    token = world.ca.create_jwt_svid(WEB, ["api"])
    assert status(world.check(request(token))) == (200, "allowed")
    world.feed.publish(IdentitySnapshot(bundles=TestCA("example.org").bundles(), version=2))
    assert status(world.check(request(token))) == (401, "unknown_key")


def test_a_reloaded_policy_decides_the_next_check() -> None:
    world = World()
    token = world.ca.create_jwt_svid(WEB, ["api"])
    assert status(world.check(request(token))) == (200, "allowed")
    world.policies.swap(
        parse_config(CONFIG.replace("allow: [spiffe://example.org/web, ", "allow: ["), "t").authz
    )
    assert status(world.check(request(token))) == (403, "subject_not_allowed")


def test_every_part_of_the_request_is_part_of_the_key() -> None:
    world = World()
    token = world.ca.create_jwt_svid(WEB, ["api"])
    assert status(world.check(request(token))) == (200, "allowed")
    # Each differs from the allowed request in one part, which selects another policy (or none).
    assert status(world.check(request(token, host="other.example.org"))) == (403, "no_matching_policy")
    assert status(world.check(request(token, path="/healthz"))) == (200, "no_token_required")
    assert status(world.check(request(None))) == (401, "missing_token")
    assert metadata(world.check(request(token, extensions={"policy": "egress"})))["policy"] == "egress"
    other_token = world.ca.create_jwt_svid("spiffe://example.org/db", ["api"])
    assert status(world.check(request(other_token))) == (403, "subject_not_allowed")


def test_inject_mode_is_decided_for_every_caller() -> None:
    world = World()
    egress = request(None, extensions={"policy": "egress"})
    assert status(world.check(egress)) == (200, "injected")
    world.caller = CallerInfo(uid=4242)  # not entitled to spiffe://example.org/egress
    assert status(world.check(egress)) == (403, "not_entitled")


def test_cache_size_zero_turns_the_fast_path_off_too() -> None:
    world = World(CONFIG.replace("authz:\n", "authz:\n  cache_size: 0\n"))
    token = world.ca.create_jwt_svid(WEB, ["api"])
    for _ in range(3):
        assert status(world.check(request(token))) == (200, "allowed")
    assert world.counter("svidgate_authz_token_cache_misses_total") == 3
    assert world.counter("svidgate_authz_token_cache_hits_total") == 0


def test_raw_header_maps_take_the_slow_path() -> None:
    world = World()
    token = world.ca.create_jwt_svid(WEB, ["api"])
    raw = request(None)
    value = f"Bearer {token}".encode()
    raw.attributes.request.http.header_map.headers.add(key="authorization", raw_value=value)
    assert status(world.check(raw)) == (200, "allowed")
    duplicate: Any = raw.attributes.request.http.header_map.headers.add()
    duplicate.key, duplicate.raw_value = "authorization", value
    assert status(world.check(raw)) == (401, "duplicate_token")


def test_a_token_not_yet_valid_is_allowed_once_it_is() -> None:
    world = World()
    token = world.ca.create_jwt_svid(WEB, ["api"], ttl=600, extra_claims={"nbf": int(NOW) + 120})
    assert status(world.check(request(token))) == (401, "not_yet_valid")
    world.now = NOW + 120
    assert status(world.check(request(token))) == (200, "allowed")
