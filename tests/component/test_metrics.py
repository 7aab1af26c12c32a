"""`/metrics` of a running server after real traffic: SDS streams (ACK, NACK, rejected names), Check calls,
Workload API calls. Series values are checked, not just names."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
from prometheus_client import CollectorRegistry

from svidgate.metrics import CHECK_BUCKETS, Metrics
from tests.support.runtime import (
    BACKEND,
    TRUST_DOMAIN,
    WEB,
    WORKLOAD_HEADER,
    Layout,
    SdsStream,
    check,
    fetch_jwt_svid,
    scrape,
    sds_request,
    tcp_grpc_target,
    value,
    workload_channel,
)
from tests.support.server import running_server

AUTHZ = "envoy.service.auth.v3.Authorization"
SDS = "envoy.service.secret.v3.SecretDiscoveryService"


async def test_series_after_real_traffic(layout: Layout) -> None:
    from svidgate._gen import workload_pb2, workload_pb2_grpc

    async with (
        running_server(layout.config, CollectorRegistry()) as server,
        grpc.aio.insecure_channel(f"unix:{layout.sds_socket}") as sds_channel,
        grpc.aio.insecure_channel(tcp_grpc_target(server)) as tcp_channel,
        workload_channel(layout) as wl_channel,
    ):
        port = server.http_port
        assert port is not None

        # -- SDS: one stream ACKs, one NACKs; the first also asks for an unknown and an unentitled name.
        acking = SdsStream(sds_channel)
        acking.send(sds_request("web", ["default", "ROOTCA", "nope", BACKEND]))
        first = await acking.receive()
        assert sorted(r.name for r in _secrets(first)) == ["ROOTCA", "default"]
        acking.send(
            sds_request(
                "web", ["default", "ROOTCA", "nope", BACKEND], version=first.version_info, nonce=first.nonce
            )
        )
        nacking = SdsStream(sds_channel)
        nacking.send(sds_request("web", ["default", "ROOTCA"]))
        second = await nacking.receive()
        nacking.send(
            sds_request(
                "web", ["default", "ROOTCA"], nonce=second.nonce, error="Failed to load certificate chain"
            )
        )

        # -- Check: a valid token twice (one miss, one cache hit), a missing token, a no-token policy.
        token = await fetch_jwt_svid(wl_channel, "backend")
        assert (await check(tcp_channel, "/api/orders", token)).status.code == 0
        assert (await check(tcp_channel, "/api/orders", token)).status.code == 0
        assert (await check(tcp_channel, "/api/orders")).status.code != 0
        assert (await check(tcp_channel, "/healthz")).status.code == 0

        # -- Workload API: an open X.509 stream and a JWT call (above).
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(wl_channel)
        x509 = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=WORKLOAD_HEADER)
        assert len((await x509.read()).svids) == 1

        samples = await _scrape_until(
            port, lambda s: s.get(("svidgate_sds_nacks_total", (("resource", "default"),))) == 1.0
        )

        # SDS
        assert value(samples, "svidgate_sds_streams", api="sotw") == 2
        assert value(samples, "svidgate_sds_pushes_total", resource="default") == 2
        assert value(samples, "svidgate_sds_pushes_total", resource="ROOTCA") == 2
        assert value(samples, "svidgate_sds_acks_total", resource="default") == 1
        assert value(samples, "svidgate_sds_acks_total", resource="ROOTCA") == 1
        assert value(samples, "svidgate_sds_nacks_total", resource="default") == 1
        assert value(samples, "svidgate_sds_nacks_total", resource="ROOTCA") == 1
        assert value(samples, "svidgate_sds_rejected_resource_names_total", reason="unknown") == 1
        assert value(samples, "svidgate_sds_rejected_resource_names_total", reason="not_entitled") == 1

        # ext_authz
        decisions = "svidgate_authz_decisions_total"
        assert value(samples, decisions, policy="api", result="allow", reason="allowed", dry_run="false") == 2
        assert (
            value(samples, decisions, policy="api", result="deny", reason="missing_token", dry_run="false")
            == 1
        )
        assert (
            value(
                samples,
                decisions,
                policy="health",
                result="allow",
                reason="no_token_required",
                dry_run="false",
            )
            == 1
        )
        assert value(samples, "svidgate_authz_check_duration_seconds_count") == 4
        assert value(samples, "svidgate_authz_check_duration_seconds_bucket", le="+Inf") == 4
        assert value(samples, "svidgate_authz_check_duration_seconds_sum") > 0
        assert (
            len([k for k in samples if k[0] == "svidgate_authz_check_duration_seconds_bucket"])
            == len(CHECK_BUCKETS) + 1
        )
        assert value(samples, "svidgate_authz_token_cache_hits_total") == 1
        assert value(samples, "svidgate_authz_token_cache_misses_total") == 1
        assert value(samples, "svidgate_authz_token_cache_entries") == 1

        # Workload API
        assert value(samples, "svidgate_workload_api_streams", method="FetchX509SVID") == 1

        # gRPC server, every service
        handled = "svidgate_grpc_server_handled_total"
        assert value(samples, handled, service=AUTHZ, method="Check", code="OK") == 4
        assert value(samples, handled, service="SpiffeWorkloadAPI", method="FetchJWTSVID", code="OK") == 1
        assert value(samples, "svidgate_grpc_server_started_total", service=SDS, method="StreamSecrets") == 2

        # Scrape-time identity series
        expiry = value(samples, "svidgate_x509_svid_expiry_seconds", spiffe_id=WEB)
        assert 3000 < expiry <= 3600  # the default 1h X.509-SVID TTL, minted moments ago
        assert value(samples, "svidgate_bundle_sequence", trust_domain=TRUST_DOMAIN) >= 1
        assert 0 <= value(samples, "svidgate_bundle_age_seconds", trust_domain=TRUST_DOMAIN) < 600
        assert value(samples, "svidgate_x509_svids") == 3
        assert value(samples, "svidgate_bundles") == 1

        # Process
        assert value(samples, "svidgate_ready") == 1
        assert value(samples, "process_cpu_seconds_total") > 0
        assert value(samples, "svidgate_build_info", version=_version()) == 1

        x509.cancel()
        acking.close_requests()
        nacking.close_requests()
        acking.call.cancel()
        nacking.call.cancel()
        after = await _scrape_until(
            port,
            lambda s: (
                s.get(("svidgate_sds_streams", (("api", "sotw"),))) == 0
                and s.get(("svidgate_workload_api_streams", (("method", "FetchX509SVID"),))) == 0
            ),
        )
        assert value(after, "svidgate_sds_streams", api="sotw") == 0
        assert value(after, "svidgate_workload_api_streams", method="FetchX509SVID") == 0


def _secrets(response: object) -> list[object]:
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    out = []
    for resource in response.resources:  # type: ignore[attr-defined]
        secret = secret_pb2.Secret()
        resource.Unpack(secret)
        out.append(secret)
    return out


def _version() -> str:
    from svidgate import __version__

    return __version__


async def _scrape_until(port: int, ready: object, attempts: int = 200) -> dict:  # type: ignore[type-arg]
    # The servicer counts an ACK/NACK when it reads the request, which races the scrape; poll until the
    # expected sample shows up (bounded), instead of sleeping a fixed time.
    samples = await scrape(port)
    for _ in range(attempts):
        if ready(samples):  # type: ignore[operator]
            return samples
        await asyncio.sleep(0.01)
        samples = await scrape(port)
    return samples


def test_metrics_registry_is_injected_and_isolated() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    a = Metrics(first, process_metrics=False)
    Metrics(second, process_metrics=False)
    a.sds.pushes.labels(resource="default").inc()
    assert first.get_sample_value("svidgate_sds_pushes_total", {"resource": "default"}) == 1
    assert second.get_sample_value("svidgate_sds_pushes_total", {"resource": "default"}) is None


def test_bundle_age_restarts_only_when_content_changes() -> None:
    from svidgate.identity.ca import BuiltinCa
    from svidgate.identity.clock import FakeClock
    from svidgate.identity.keys import KeyType
    from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
    from svidgate.identity.spiffe_id import TrustDomain

    clock = FakeClock(1_800_000_000.0)
    registry = CollectorRegistry()
    metrics = Metrics(registry, clock=clock, process_metrics=False)
    td = TrustDomain("example.org")
    ca = BuiltinCa.in_memory(td, KeyType.EC_P256, clock)
    feed = SnapshotFeed(IdentitySnapshot(bundles={td: ca.bundle()}, version=1))
    metrics.watch_feed(feed)
    clock.advance(30)
    assert registry.get_sample_value("svidgate_bundle_age_seconds", {"trust_domain": "example.org"}) == 30
    # A new snapshot with an equal bundle (a rebuilt object): the age keeps counting.
    same = IdentitySnapshot(bundles={td: ca.bundle()}, version=2)
    feed.publish(same)
    metrics.observe_snapshot(same)
    clock.advance(10)
    assert registry.get_sample_value("svidgate_bundle_age_seconds", {"trust_domain": "example.org"}) == 40
    # A different bundle (another CA): the age restarts.
    other = BuiltinCa.in_memory(td, KeyType.EC_P256, clock)
    changed = IdentitySnapshot(bundles={td: other.bundle()}, version=3)
    feed.publish(changed)
    metrics.observe_snapshot(changed)
    clock.advance(5)
    assert registry.get_sample_value("svidgate_bundle_age_seconds", {"trust_domain": "example.org"}) == 5
    assert registry.get_sample_value("svidgate_identity_snapshots_total") == 2
