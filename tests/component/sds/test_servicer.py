"""The SDS servicer on a real grpc.aio server: StreamSecrets, DeltaSecrets, FetchSecrets."""

from __future__ import annotations

import logging

import grpc
import pytest
from cryptography import x509
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from svidgate.config import SdsConfig
from svidgate.identity.snapshot import SnapshotFeed
from svidgate.metrics import Metrics
from svidgate.sds.resources import SECRET_TYPE_URL
from tests.support.sds import ADMIN, BACKEND, FRONTEND, Identities, secrets_of, sotw_request
from tests.support.sds_server import Responses, sds_server, stub


@pytest.fixture
def ids() -> Identities:
    return Identities.create()


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_stream_secrets_full_cycle(ids: Identities) -> None:
    feed = SnapshotFeed(ids.snapshot())
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    async with sds_server(feed, metrics=metrics) as (_, target), grpc.aio.insecure_channel(target) as channel:
        call = stub(channel).StreamSecrets()
        call_rx = Responses(call)
        await call.write(sotw_request(["default", "ALL", "spiffe://example.org/backend"], node_id="frontend"))
        first = await call_rx.next()
        assert first.type_url == SECRET_TYPE_URL
        assert first.nonce
        secrets = secrets_of(first)
        assert sorted(secrets) == ["ALL", "default"]  # backend: not entitled, left out
        assert metric(metrics, "svidgate_sds_rejected_resource_names_total", reason="not_entitled") == 1
        assert metric(metrics, "svidgate_sds_streams", api="sotw") == 1
        # ACK: no response.
        await call.write(sotw_request(["default", "ALL"], version=first.version_info, nonce=first.nonce))
        await call_rx.none()
        assert metric(metrics, "svidgate_sds_acks_total", resource="default") == 1
        # Rotation: only the certificate is pushed.
        feed.publish(ids.snapshot())
        rotated = await call_rx.next()
        assert list(secrets_of(rotated)) == ["default"]
        assert rotated.nonce != first.nonce
        assert rotated.version_info != first.version_info
        assert metric(metrics, "svidgate_sds_pushes_total", resource="default") == 2
        await call.done_writing()
        await call_rx._task
    assert metric(metrics, "svidgate_sds_streams", api="sotw") == 0


async def test_nack_is_counted_once_and_not_re_pushed(
    ids: Identities, caplog: pytest.LogCaptureFixture
) -> None:
    feed = SnapshotFeed(ids.snapshot())
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    async with sds_server(feed, metrics=metrics) as (_, target), grpc.aio.insecure_channel(target) as channel:
        call = stub(channel).StreamSecrets()
        call_rx = Responses(call)
        await call.write(sotw_request(["default"], node_id="frontend"))
        first = await call_rx.next()
        with caplog.at_level(logging.WARNING, logger="svidgate.sds.servicer"):
            for _ in range(3):  # Envoy repeating its NACK must not trigger a push loop
                await call.write(
                    sotw_request(["default"], nonce=first.nonce, error="Failed to load private key")
                )
            await call_rx.none()
        assert metric(metrics, "svidgate_sds_nacks_total", resource="default") == 1
        nacks = [r for r in caplog.records if r.getMessage() == "sds.nack"]
        assert len(nacks) == 1
        assert "PRIVATE KEY-----" not in caplog.text
        # Same content republished: no push. New content: pushed.
        current = feed.current()
        from svidgate.identity.snapshot import IdentitySnapshot

        feed.publish(IdentitySnapshot(current.svids, current.bundles, current.version + 1000))
        await call_rx.none()
        feed.publish(ids.snapshot())
        assert "default" in secrets_of(await call_rx.next())
        call_rx.close()


async def test_stale_nonce_ignored_and_new_stream_gets_full_state(ids: Identities) -> None:
    feed = SnapshotFeed(ids.snapshot())
    async with sds_server(feed) as (_, target), grpc.aio.insecure_channel(target) as channel:
        call = stub(channel).StreamSecrets()
        call_rx = Responses(call)
        await call.write(sotw_request(["default"], node_id="frontend"))
        first = await call_rx.next()
        feed.publish(ids.snapshot())
        second = await call_rx.next()
        await call.write(sotw_request(["default", "ROOTCA"], version=first.version_info, nonce=first.nonce))
        await call_rx.none()  # stale: ignored
        await call.write(sotw_request(["default", "ROOTCA"], version=second.version_info, nonce=second.nonce))
        assert list(secrets_of(await call_rx.next())) == ["ROOTCA"]
        call_rx.close()
        # Reconnect with an old version: full state anyway.
        again = stub(channel).StreamSecrets()
        again_rx = Responses(again)
        await again.write(
            sotw_request(
                ["default", "ROOTCA"], version=first.version_info, nonce=first.nonce, node_id="frontend"
            )
        )
        assert sorted(secrets_of(await again_rx.next())) == ["ROOTCA", "default"]
        again_rx.close()


async def test_node_from_first_request_decides_entitlement(ids: Identities) -> None:
    feed = SnapshotFeed(ids.snapshot())
    async with sds_server(feed) as (_, target), grpc.aio.insecure_channel(target) as channel:
        call = stub(channel).StreamSecrets()
        call_rx = Responses(call)
        first_request = sotw_request(["default", str(ADMIN)], node_id="backend")
        first_request.node.cluster = "ops"
        await call.write(first_request)
        secrets = secrets_of(await call_rx.next())
        assert sorted(secrets) == ["default", str(ADMIN)]
        chain = x509.load_pem_x509_certificates(
            secrets["default"].tls_certificate.certificate_chain.inline_bytes
        )
        assert chain[0] == feed.current().svids[BACKEND].leaf  # default: the first entitled ID
        call_rx.close()


async def test_caller_matching_nothing_gets_no_svid(
    ids: Identities, caplog: pytest.LogCaptureFixture
) -> None:
    feed = SnapshotFeed(ids.snapshot())
    async with sds_server(feed) as (_, target), grpc.aio.insecure_channel(target) as channel:
        with caplog.at_level(logging.WARNING, logger="svidgate.sds.servicer"):
            call = stub(channel).StreamSecrets()
            call_rx = Responses(call)
            await call.write(sotw_request(["default", "ROOTCA"], node_id="stranger"))
            assert list(secrets_of(await call_rx.next())) == ["ROOTCA"]
            call_rx.close()
        assert any(r.getMessage() == "sds.caller_not_entitled" for r in caplog.records)


async def test_per_node_trusted_ca_validation(ids: Identities) -> None:
    feed = SnapshotFeed(ids.snapshot())
    async with sds_server(feed) as (_, target), grpc.aio.insecure_channel(target) as channel:
        call = stub(channel).StreamSecrets()
        call_rx = Responses(call)
        request = sotw_request(["ALL"])
        from tests.support.sds import node

        request.node.CopyFrom(node("frontend", validation="trusted_ca"))
        await call.write(request)
        secret = secrets_of(await call_rx.next())["ALL"]
        # Two trust domains' roots: the node's trusted_ca wish gives way to the SPIFFE validator (no pooling).
        assert secret.validation_context.HasField("custom_validator_config")
        assert not secret.validation_context.HasField("trusted_ca")
        call_rx.close()
    feed = SnapshotFeed(ids.snapshot(federated=False))
    async with sds_server(feed) as (_, target), grpc.aio.insecure_channel(target) as channel:
        call = stub(channel).StreamSecrets()
        call_rx = Responses(call)
        request = sotw_request(["ALL"])
        request.node.CopyFrom(node("frontend", validation="trusted_ca"))
        await call.write(request)
        secret = secrets_of(await call_rx.next())["ALL"]
        assert secret.validation_context.trusted_ca.inline_bytes.count(b"BEGIN CERTIFICATE") == 1
        assert not secret.validation_context.HasField("custom_validator_config")
        call_rx.close()


async def test_configured_trusted_ca_and_istio_compat(ids: Identities) -> None:
    feed = SnapshotFeed(ids.snapshot())
    sds = SdsConfig(validation="trusted_ca", istio_compat=True)
    async with sds_server(feed, sds=sds) as (_, target), grpc.aio.insecure_channel(target) as channel:
        response = await stub(channel).FetchSecrets(
            sotw_request(["ROOTCA", "spiffe://partner.test"], node_id="x")
        )
        secrets = secrets_of(response)
        # Istio's ROOTCA spans both trust domains: served with the SPIFFE validator, not one trusted_ca pool.
        assert secrets["ROOTCA"].validation_context.HasField("custom_validator_config")
        assert secrets["spiffe://partner.test"].validation_context.HasField("trusted_ca")
    unsafe = SdsConfig(validation="trusted_ca", istio_compat=True, pool_trust_domain_roots_unsafe=True)
    async with sds_server(feed, sds=unsafe) as (_, target), grpc.aio.insecure_channel(target) as channel:
        response = await stub(channel).FetchSecrets(sotw_request(["ROOTCA"], node_id="x"))
        pooled = secrets_of(response)["ROOTCA"].validation_context.trusted_ca.inline_bytes
        assert pooled.count(b"BEGIN CERTIFICATE") == 2


async def test_fetch_secrets(ids: Identities) -> None:
    feed = SnapshotFeed(ids.snapshot())
    async with sds_server(feed) as (_, target), grpc.aio.insecure_channel(target) as channel:
        response = await stub(channel).FetchSecrets(
            sotw_request(["default", "bogus", "ALL"], node_id="frontend")
        )
        assert sorted(secrets_of(response)) == ["ALL", "default"]
        assert response.version_info
        assert not response.nonce
        everything = await stub(channel).FetchSecrets(sotw_request([], node_id="frontend"))
        assert sorted(secrets_of(everything)) == sorted(
            [str(FRONTEND), "spiffe://example.org", "spiffe://partner.test"]
        )


def delta_request(
    subscribe: list[str] = [],  # noqa: B006
    unsubscribe: list[str] = [],  # noqa: B006
    *,
    initial: dict[str, str] | None = None,
    nonce: str = "",
    error: str | None = None,
    node_id: str | None = None,
) -> discovery_pb2.DeltaDiscoveryRequest:
    request = discovery_pb2.DeltaDiscoveryRequest(
        type_url=SECRET_TYPE_URL,
        resource_names_subscribe=subscribe,
        resource_names_unsubscribe=unsubscribe,
        initial_resource_versions=initial or {},
        response_nonce=nonce,
    )
    if node_id is not None:
        request.node.id = node_id
    if error is not None:
        request.error_detail.code = 3
        request.error_detail.message = error
    return request


async def test_delta_secrets(ids: Identities) -> None:
    feed = SnapshotFeed(ids.snapshot())
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    async with sds_server(feed, metrics=metrics) as (_, target), grpc.aio.insecure_channel(target) as channel:
        call = stub(channel).DeltaSecrets()
        call_rx = Responses(call)
        await call.write(delta_request(["default", "spiffe://partner.test"], node_id="frontend"))
        first = await call_rx.next()
        versions = {r.name: r.version for r in first.resources}
        assert sorted(versions) == ["default", "spiffe://partner.test"]
        assert metric(metrics, "svidgate_sds_streams", api="delta") == 1
        await call.write(delta_request(nonce=first.nonce))
        # Federation removed and SVIDs rotated: the cert is pushed and the bundle removed.
        feed.publish(ids.snapshot(federated=False))
        update = await call_rx.next()
        assert [r.name for r in update.resources] == ["default"]
        assert list(update.removed_resources) == ["spiffe://partner.test"]
        versions["default"] = update.resources[0].version
        call_rx.close()
        # Reconnect with initial_resource_versions: the unchanged cert is not re-sent; ROOTCA is.
        again = stub(channel).DeltaSecrets()
        again_rx = Responses(again)
        await again.write(
            delta_request(["default", "ROOTCA"], initial={"default": versions["default"]}, node_id="frontend")
        )
        response = await again_rx.next()
        assert [r.name for r in response.resources] == ["ROOTCA"]
        again_rx.close()


async def test_delta_nack_not_re_pushed(ids: Identities) -> None:
    feed = SnapshotFeed(ids.snapshot())
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    async with sds_server(feed, metrics=metrics) as (_, target), grpc.aio.insecure_channel(target) as channel:
        call = stub(channel).DeltaSecrets()
        call_rx = Responses(call)
        await call.write(delta_request(["default"], node_id="frontend"))
        first = await call_rx.next()
        await call.write(delta_request(nonce=first.nonce, error="bad"))
        await call_rx.none()
        assert metric(metrics, "svidgate_sds_nacks_total", resource="default") == 1
        call_rx.close()
