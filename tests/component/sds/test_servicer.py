"""The SDS servicer on a real grpc.aio server: StreamSecrets, DeltaSecrets, FetchSecrets."""

from __future__ import annotations

import asyncio
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
from svidgate.sds.servicer import MAX_NAMES_LOGGED, MAX_NODE_FIELD_LENGTH
from svidgate.sds.stream import MAX_RESOURCE_NAMES
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


# Hardening: requests too large to serve.
#
# SDS requests too large to serve are refused whole, on a real server (security review: one SotW request with
# 150k junk names held the shared event loop for 20-40 s, stalling ext_authz Check on the same loop).

#: The size of the reviewer's reproduction (/tmp/review/inj/sds_names_flood.py).
FLOOD = 150_000


def flood_names(count: int = FLOOD) -> list[str]:
    return [*(f"n{i}" for i in range(count)), "ROOTCA"]


def frontend_delta_request(
    subscribe: list[str], unsubscribe: list[str] | None = None, nonce: str = ""
) -> discovery_pb2.DeltaDiscoveryRequest:
    return delta_request(subscribe, unsubscribe or [], nonce=nonce, node_id="frontend")


async def stream_status(call: grpc.aio.StreamStreamCall, request: object) -> grpc.StatusCode:  # type: ignore[type-arg]
    """Write `request`, then read until the server ends the call; its status code."""
    await call.write(request)
    try:
        async for response in call:
            raise AssertionError(f"served ({len(response.resources)} resources) instead of refused")
    except grpc.aio.AioRpcError as err:
        return err.code()
    raise AssertionError("the stream ended without an error status")


async def test_sotw_flood_is_refused_while_other_streams_are_served(
    ids: Identities, caplog: pytest.LogCaptureFixture
) -> None:
    feed = SnapshotFeed(ids.snapshot())
    async with (
        sds_server(feed) as (_, target),
        grpc.aio.insecure_channel(target) as honest,
        grpc.aio.insecure_channel(target) as hostile,
    ):
        # An Envoy with an open stream before the flood.
        open_call = stub(honest).StreamSecrets()
        open_rx = Responses(open_call)
        await open_call.write(sotw_request(["default"], node_id="frontend"))
        first = await open_rx.next()
        assert list(secrets_of(first)) == ["default"]

        async def flood() -> grpc.StatusCode:
            call = stub(hostile).StreamSecrets()
            return await stream_status(call, sotw_request(flood_names(), node_id="x"))

        async def fetch() -> list[str]:
            response = await stub(honest).FetchSecrets(sotw_request(["ROOTCA"], node_id="backend"))
            return list(secrets_of(response))

        with caplog.at_level(logging.WARNING, logger="svidgate.sds.servicer"):
            code, fetched = await asyncio.gather(flood(), fetch())
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert fetched == ["ROOTCA"]
        refused = [r for r in caplog.records if r.getMessage() == "sds.request_refused"]
        assert len(refused) == 1
        fields = refused[0].fields  # type: ignore[attr-defined]
        assert fields["node_id"] == "x"
        assert (
            f"resource_names has {FLOOD + 1} resource names; at most {MAX_RESOURCE_NAMES}" in fields["error"]
        )
        # Not one warning per name.
        assert not [r for r in caplog.records if r.getMessage() == "sds.resource_rejected"]

        # The stream opened before the flood still gets rotations.
        await open_call.write(sotw_request(["default"], version=first.version_info, nonce=first.nonce))
        feed.publish(ids.snapshot())
        rotated = await open_rx.next()
        assert list(secrets_of(rotated)) == ["default"]
        open_rx.close()


async def test_delta_flood_and_per_stream_total_are_refused(ids: Identities) -> None:
    feed = SnapshotFeed(ids.snapshot())
    async with sds_server(feed) as (_, target), grpc.aio.insecure_channel(target) as channel:
        code = await stream_status(stub(channel).DeltaSecrets(), frontend_delta_request(flood_names()))
        assert code == grpc.StatusCode.INVALID_ARGUMENT

        code = await stream_status(
            stub(channel).DeltaSecrets(), frontend_delta_request(["ROOTCA"], [f"n{i}" for i in range(FLOOD)])
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT

        # Under the cap per request, over it per stream (delta subscriptions accumulate).
        call = stub(channel).DeltaSecrets()
        rx = Responses(call)
        half = MAX_RESOURCE_NAMES // 2 + 1
        await call.write(frontend_delta_request([*(f"a{i}" for i in range(half)), "ROOTCA"]))
        first = await rx.next()
        assert [r.name for r in first.resources] == ["ROOTCA"]
        await call.write(frontend_delta_request([f"b{i}" for i in range(half)], nonce=first.nonce))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rx.next()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "would be subscribed to" in (info.value.details() or "")


async def test_fetch_secrets_enforces_the_same_caps(ids: Identities) -> None:
    feed = SnapshotFeed(ids.snapshot())
    async with sds_server(feed) as (_, target), grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(channel).FetchSecrets(sotw_request(flood_names(), node_id="frontend"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(channel).FetchSecrets(
                sotw_request(["ROOTCA"], node_id="x" * (MAX_NODE_FIELD_LENGTH + 1))
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "node.id" in (info.value.details() or "")
        # At the caps: served.
        at_cap = [*(f"n{i}" for i in range(MAX_RESOURCE_NAMES - 1)), "ROOTCA"]
        response = await stub(channel).FetchSecrets(sotw_request(at_cap, node_id="x" * MAX_NODE_FIELD_LENGTH))
        assert list(secrets_of(response)) == ["ROOTCA"]


@pytest.mark.parametrize("field", ["id", "cluster"])
async def test_oversized_node_ends_the_stream(
    ids: Identities, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    feed = SnapshotFeed(ids.snapshot())
    request = sotw_request(["ROOTCA"])
    setattr(request.node, field, "x" * (1 << 20))
    async with sds_server(feed) as (_, target), grpc.aio.insecure_channel(target) as channel:
        with caplog.at_level(logging.WARNING, logger="svidgate.sds.servicer"):
            assert (
                await stream_status(stub(channel).StreamSecrets(), request)
                == grpc.StatusCode.INVALID_ARGUMENT
            )
            delta = frontend_delta_request(["ROOTCA"])
            setattr(delta.node, field, "x" * (MAX_NODE_FIELD_LENGTH + 1))
            assert (
                await stream_status(stub(channel).DeltaSecrets(), delta) == grpc.StatusCode.INVALID_ARGUMENT
            )
    refused = [r for r in caplog.records if r.getMessage() == "sds.request_refused"]
    assert len(refused) == 2
    # The oversized value is what is refused: it is not copied into the log line.
    assert all(len(r.fields.get("node_id", "")) < 100 for r in refused)  # type: ignore[attr-defined]


async def test_rejected_names_are_one_log_line_per_request(
    ids: Identities, caplog: pytest.LogCaptureFixture
) -> None:
    feed = SnapshotFeed(ids.snapshot())
    names = [*(f"junk-{i}-" + "y" * 300 for i in range(MAX_RESOURCE_NAMES - 1)), "ROOTCA"]
    async with sds_server(feed) as (_, target), grpc.aio.insecure_channel(target) as channel:
        call = stub(channel).StreamSecrets()
        rx = Responses(call)
        with caplog.at_level(logging.WARNING, logger="svidgate.sds.servicer"):
            await call.write(sotw_request(names, node_id="frontend"))
            assert list(secrets_of(await rx.next())) == ["ROOTCA"]
        rx.close()
    rejected = [r for r in caplog.records if r.getMessage() == "sds.resource_rejected"]
    assert len(rejected) == 1
    fields = rejected[0].fields  # type: ignore[attr-defined]
    assert fields["count"] == MAX_RESOURCE_NAMES - 1
    assert fields["reasons"] == {"unknown": MAX_RESOURCE_NAMES - 1}
    assert fields["not_shown"] == MAX_RESOURCE_NAMES - 1 - MAX_NAMES_LOGGED
    assert len(fields["resources"]) == MAX_NAMES_LOGGED
    assert all(len(name) <= 100 for name in fields["resources"])
