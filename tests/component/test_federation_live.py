"""Live federation against a real partner bundle endpoint (in-process, real TLS): a JWT-SVID signed with a
partner key added after the last fetch is allowed on first sight on both Check servers, a burst of Checks
with unknown keys costs the partner at most one request, and a reload adds and removes partners at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from svidgate.config import BundleEndpointServerConfig, Config, parse_config
from svidgate.extauthz.reload import PolicyHolder
from svidgate.extauthz.servicer import AuthorizationServicer
from svidgate.identity.bundle import spiffe_bundle_json
from svidgate.identity.clock import system_clock
from svidgate.identity.keys import generate_private_key, key_id
from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.sources import create_source
from svidgate.sources.builtin import BuiltinSource
from svidgate.sources.bundle_server import BundleEndpointServer, BundleSequence
from tests.component.runtime_support import check_request
from tests.support.ca import TestCA

PARTNER = TrustDomain("partner.org")
PARTNER_ENDPOINT = SpiffeId.parse("spiffe://partner.org/bundle-endpoint")
CLIENT = "spiffe://partner.org/client"
AUDIENCE = "spiffe://example.org/api"
REAL_NOW = time.time()


@dataclass
class Partner:
    ca: TestCA
    feed: SnapshotFeed
    server: BundleEndpointServer
    requests: list[tuple[str, int]]

    def add_jwt_key(self) -> tuple[str, object]:
        """Publish a bundle with one more JWT authority; returns (kid, private key)."""
        key = generate_private_key()
        kid = key_id(key.public_key())
        current = self.feed.current()
        bundle = current.bundles[PARTNER]
        extra = {**bundle.jwt_authorities, kid: key.public_key()}
        new_bundle = self.ca.bundle(extra_jwt=extra)
        self.feed.publish(
            IdentitySnapshot(svids=current.svids, bundles={PARTNER: new_bundle}, version=current.version + 1)
        )
        return kid, key

    def token(self, kid: str, key: object, subject: str = CLIENT) -> str:
        return self.ca.create_jwt_svid(
            subject, [AUDIENCE], now=time.time(), key=key, extra_header={"kid": kid}
        )


@pytest.fixture
async def partner(tmp_path: Path) -> AsyncIterator[Partner]:
    ca = TestCA(PARTNER, not_before=REAL_NOW - 3600, not_after=REAL_NOW + 86400)
    svid = ca.create_x509_svid(PARTNER_ENDPOINT, not_before=REAL_NOW - 60, not_after=REAL_NOW + 3600)
    feed = SnapshotFeed(
        IdentitySnapshot(svids={PARTNER_ENDPOINT: svid}, bundles={PARTNER: ca.bundle()}, version=1)
    )
    requests: list[tuple[str, int]] = []
    server = BundleEndpointServer(
        "127.0.0.1",
        0,
        BundleEndpointServerConfig(spiffe_id=PARTNER_ENDPOINT),
        PARTNER,
        feed,
        BundleSequence(None),
        on_request=lambda document, status: requests.append((document, status)),
    )
    await server.start()
    (tmp_path / "partner.json").write_bytes(spiffe_bundle_json(ca.bundle()))
    try:
        yield Partner(ca, feed, server, requests)
    finally:
        await server.stop()


def federation_yaml(partner: Partner) -> str:
    return f"""\
federation:
  partner.org:
    bundle_file: partner.json
    bundle_endpoint:
      url: https://127.0.0.1:{partner.server.port}/
      profile: https_spiffe
      endpoint_spiffe_id: {PARTNER_ENDPOINT}
      refresh: 1h
"""


def own_config(tmp_path: Path, partner: Partner, *, federated: bool = True) -> Config:
    text = f"""\
trust_domain: example.org
state_dir: {tmp_path / "state"}
workloads:
  - spiffe_id: spiffe://example.org/api
    selectors: [envoy:node_id:api]
{federation_yaml(partner) if federated else ""}
authz:
  unknown_key_wait: 5s   # this test is about what is validated, not about how fast a loopback fetch is
  policies:
    - name: api
      match: {{path_prefix: /api}}
      audiences: [{AUDIENCE}]
      allow: ["spiffe://partner.org/*"]
"""
    return parse_config(text, "own.yaml", base_dir=tmp_path)


@dataclass
class Own:
    source: BuiltinSource
    servicer: AuthorizationServicer


@pytest.fixture
async def own(tmp_path: Path, partner: Partner) -> AsyncIterator[Own]:
    config = own_config(tmp_path, partner)
    # In a thread: the source fetches the partner once while it starts, and the partner serves on this loop.
    source = await asyncio.to_thread(create_source, config, system_clock)
    assert isinstance(source, BuiltinSource)
    servicer = AuthorizationServicer(
        source.feed,
        PolicyHolder(config.authz),
        clock=system_clock,
        refresh_bundle=source.request_bundle_refresh,
    )
    runner = asyncio.ensure_future(source.run())
    # The partner's task fetches once at start; the tests begin after that (and its step) is done.
    async with asyncio.timeout(10):
        while not partner.requests:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    try:
        yield Own(source, servicer)
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


def allowed(wire: bytes) -> bool:
    from envoy.service.auth.v3 import external_auth_pb2

    return external_auth_pb2.CheckResponse.FromString(wire).status.code == 0


def bundle_fetches(partner: Partner) -> int:
    return sum(1 for document, status in partner.requests if document == "bundle" and status == 200)


async def test_new_partner_key_is_allowed_on_first_sight_on_the_threaded_server(
    partner: Partner, own: Own
) -> None:
    before = bundle_fetches(partner)
    kid, key = partner.add_jwt_key()
    assert kid not in own.source.feed.current().bundles[PARTNER].jwt_authorities
    wire = await asyncio.to_thread(own.servicer.check_wire, check_request("/api/x", partner.token(kid, key)))
    assert allowed(wire)
    assert bundle_fetches(partner) == before + 1
    assert kid in own.source.feed.current().bundles[PARTNER].jwt_authorities


@pytest.mark.parametrize("listener", ["grpc", "workload_api"])
async def test_new_partner_key_is_allowed_on_first_sight_on_grpc_aio(
    partner: Partner, own: Own, listener: str
) -> None:
    """listen.grpc and listen.workload_api answer Check on the event loop that also publishes the fetch: the
    wait is awaited there, never blocked on."""
    server = grpc.aio.server()
    header = ("workload.spiffe.io", "true")
    own.servicer.add_to_server(server, required_metadata=header if listener == "workload_api" else None)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        kid, key = partner.add_jwt_key()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            request = check_request("/api/x", partner.token(kid, key))
            response = await stub.Check(request, timeout=10, metadata=(header,))
        assert response.status.code == 0
    finally:
        await server.stop(0)


async def test_a_burst_of_unknown_keys_costs_the_partner_one_fetch(partner: Partner, own: Own) -> None:
    before = bundle_fetches(partner)
    tokens = [partner.token(f"made-up-{i}", generate_private_key()) for i in range(1000)]

    def burst() -> list[bool]:
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(
                pool.map(lambda t: allowed(own.servicer.check_wire(check_request("/api/x", t))), tokens)
            )

    results = await asyncio.to_thread(burst)
    assert not any(results)
    # At most one on-demand fetch per trust domain every 10 s (docs/configuration.md, federation).
    assert bundle_fetches(partner) - before <= 1
    # Within those 10 s, a genuinely new key is not fetched for again: denied, and no further request.
    kid, key = partner.add_jwt_key()
    wire = await asyncio.to_thread(own.servicer.check_wire, check_request("/api/x", partner.token(kid, key)))
    assert not allowed(wire)
    assert bundle_fetches(partner) - before <= 1


async def test_own_trust_domain_and_file_only_partners_never_fetch(tmp_path: Path, partner: Partner) -> None:
    config = parse_config(
        f"""\
trust_domain: example.org
state_dir: {tmp_path / "state"}
federation:
  partner.org: {{bundle_file: partner.json}}
authz:
  policies:
    - name: api
      match: {{path_prefix: /api}}
      audiences: [{AUDIENCE}]
      allow: ["*"]
""",
        "own.yaml",
        base_dir=tmp_path,
    )
    source = create_source(config, system_clock)
    assert isinstance(source, BuiltinSource)
    runner = asyncio.ensure_future(source.run())
    await asyncio.sleep(0)
    try:
        assert source.request_bundle_refresh(PARTNER) is None
        assert source.request_bundle_refresh(TrustDomain("example.org")) is None
        assert source.request_bundle_refresh(TrustDomain("nobody.org")) is None
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    assert partner.requests == []


async def test_reload_removes_and_adds_a_partner_at_once(tmp_path: Path, partner: Partner, own: Own) -> None:
    kid, key = partner.ca.jwt_kid, partner.ca.jwt_key
    token = partner.token(kid, key)
    assert allowed(await asyncio.to_thread(own.servicer.check_wire, check_request("/api/x", token)))

    own.source.set_federation({})
    # Removed before set_federation returns: the published snapshot no longer holds the partner's bundle.
    assert PARTNER not in own.source.feed.current().bundles
    assert not allowed(await asyncio.to_thread(own.servicer.check_wire, check_request("/api/x", token)))

    own.source.set_federation(own_config(tmp_path, partner).federation)
    snapshot = own.source.feed.current()
    while PARTNER not in snapshot.bundles:
        snapshot = await asyncio.wait_for(own.source.feed.wait_newer(snapshot.version), 10)
    assert allowed(await asyncio.to_thread(own.servicer.check_wire, check_request("/api/x", token)))
