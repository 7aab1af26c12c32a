"""Open SDS streams follow config reloads and snapshot changes that grant or take away resources.

A reload (`update_workloads`) re-evaluates every open stream's entitlement: what it grants is pushed, what it
takes away is withdrawn (delta: `removed_resources`; SotW: the stream ends with OK, see svidgate.sds.stream).
"""

from __future__ import annotations

import logging

import grpc
import pytest
from prometheus_client import CollectorRegistry

from svidgate.identity.snapshot import SnapshotFeed
from svidgate.metrics import Metrics
from tests.component.sds.test_servicer import delta_request, metric
from tests.support.sds import (
    ADMIN,
    BACKEND,
    FRONTEND,
    WORKLOADS,
    Identities,
    secrets_of,
    sotw_request,
    workload,
)
from tests.support.sds_server import Responses, sds_server, stub

#: WORKLOADS plus: node "frontend" may also have the backend identity.
GRANTED = (*WORKLOADS, workload(BACKEND, "envoy:node_id:frontend"))
#: Node "frontend" matches nothing any more.
REVOKED = tuple(w for w in WORKLOADS if w.spiffe_id != FRONTEND)


@pytest.fixture
def ids() -> Identities:
    return Identities.create()


async def test_reload_grants_then_withdraws_on_open_sotw_stream(
    ids: Identities, caplog: pytest.LogCaptureFixture
) -> None:
    feed = SnapshotFeed(ids.snapshot())
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    async with (
        sds_server(feed, metrics=metrics) as (servicer, target),
        grpc.aio.insecure_channel(target) as channel,
    ):
        call = stub(channel).StreamSecrets()
        call_rx = Responses(call)
        names = ["default", "ROOTCA", str(BACKEND)]
        await call.write(sotw_request(names, node_id="frontend"))
        first = await call_rx.next()
        assert sorted(secrets_of(first)) == ["ROOTCA", "default"]  # backend: not entitled yet
        await call.write(sotw_request(names, version=first.version_info, nonce=first.nonce))
        await call_rx.none()

        # Unrelated reload (the frontend node's entitlement is the same): nothing is sent.
        servicer.update_workloads((*WORKLOADS, workload(ADMIN, "envoy:node_id:ops")))
        await call_rx.none()

        # A reload grants the backend identity: only that name is pushed, on the open stream.
        servicer.update_workloads(GRANTED)
        granted = await call_rx.next()
        assert list(secrets_of(granted)) == [str(BACKEND)]
        assert granted.version_info != first.version_info
        await call.write(sotw_request(names, version=granted.version_info, nonce=granted.nonce))
        await call_rx.none()

        # A reload takes it away again: SotW cannot withdraw a secret, so the stream ends with OK.
        with caplog.at_level(logging.WARNING, logger="svidgate.sds.servicer"):
            servicer.update_workloads(WORKLOADS)
            await call_rx._task
        assert await call.code() == grpc.StatusCode.OK
        assert call_rx.queue.empty()
        ended = [r for r in caplog.records if r.getMessage() == "sds.stream_ended_withdrawn"]
        assert len(ended) == 1
        assert ended[0].fields["resources"] == {str(BACKEND): "not_entitled"}  # type: ignore[attr-defined]
        assert metric(metrics, "svidgate_sds_streams", api="sotw") == 0

        # Envoy reconnects: everything else again, the withdrawn name refused (and the stream stays open).
        again = stub(channel).StreamSecrets()
        again_rx = Responses(again)
        await again.write(sotw_request(names, node_id="frontend"))
        reconnected = await again_rx.next()
        assert sorted(secrets_of(reconnected)) == ["ROOTCA", "default"]
        await again.write(sotw_request(names, version=reconnected.version_info, nonce=reconnected.nonce))
        await again_rx.none()
        assert not again.done()
        again_rx.close()


async def test_reload_that_changes_the_default_svid_pushes_it(ids: Identities) -> None:
    feed = SnapshotFeed(ids.snapshot())
    async with sds_server(feed) as (servicer, target), grpc.aio.insecure_channel(target) as channel:
        call = stub(channel).StreamSecrets()
        call_rx = Responses(call)
        await call.write(sotw_request(["default"], node_id="frontend"))
        first = await call_rx.next()
        await call.write(sotw_request(["default"], version=first.version_info, nonce=first.nonce))
        # Backend first for node "frontend": its default identity changes, the name stays servable.
        servicer.update_workloads((workload(BACKEND, "envoy:node_id:frontend"), *WORKLOADS))
        pushed = secrets_of(await call_rx.next())["default"]
        from cryptography import x509

        chain = x509.load_pem_x509_certificates(pushed.tls_certificate.certificate_chain.inline_bytes)
        assert chain[0] == feed.current().svids[BACKEND].leaf
        # Losing every entitlement withdraws `default`: the stream ends with OK.
        servicer.update_workloads(REVOKED)
        await call_rx._task
        assert await call.code() == grpc.StatusCode.OK


async def test_reload_grants_then_removes_on_open_delta_stream(ids: Identities) -> None:
    feed = SnapshotFeed(ids.snapshot())
    async with sds_server(feed) as (servicer, target), grpc.aio.insecure_channel(target) as channel:
        call = stub(channel).DeltaSecrets()
        call_rx = Responses(call)
        await call.write(delta_request(["default", str(BACKEND)], node_id="frontend"))
        first = await call_rx.next()
        assert [r.name for r in first.resources] == ["default"]
        await call.write(delta_request(nonce=first.nonce))
        await call_rx.none()

        servicer.update_workloads(GRANTED)
        granted = await call_rx.next()
        assert [r.name for r in granted.resources] == [str(BACKEND)]
        assert not granted.removed_resources
        await call.write(delta_request(nonce=granted.nonce))

        servicer.update_workloads(WORKLOADS)
        removed = await call_rx.next()
        assert not removed.resources
        assert list(removed.removed_resources) == [str(BACKEND)]
        await call.write(delta_request(nonce=removed.nonce))
        await call_rx.none()

        # The stream goes on: a rotation still reaches it, and a later grant pushes the name again.
        feed.publish(ids.snapshot())
        rotated = await call_rx.next()
        assert [r.name for r in rotated.resources] == ["default"]
        servicer.update_workloads(GRANTED)
        assert [r.name for r in (await call_rx.next()).resources] == [str(BACKEND)]
        call_rx.close()


async def test_delta_wildcard_stream_loses_an_identity(ids: Identities) -> None:
    feed = SnapshotFeed(ids.snapshot())
    async with sds_server(feed, GRANTED) as (servicer, target), grpc.aio.insecure_channel(target) as channel:
        call = stub(channel).DeltaSecrets()
        call_rx = Responses(call)
        await call.write(delta_request([], node_id="frontend"))
        first = await call_rx.next()
        assert str(BACKEND) in [r.name for r in first.resources]
        await call.write(delta_request(nonce=first.nonce))
        servicer.update_workloads(WORKLOADS)
        removed = await call_rx.next()
        assert list(removed.removed_resources) == [str(BACKEND)]
        call_rx.close()


async def test_federated_trust_domain_removed_ends_sotw_stream(
    ids: Identities, caplog: pytest.LogCaptureFixture
) -> None:
    feed = SnapshotFeed(ids.snapshot())
    async with sds_server(feed) as (_, target), grpc.aio.insecure_channel(target) as channel:
        # One stream holds the federated bundle itself, one only the SPIFFE validator over all bundles.
        federated = stub(channel).StreamSecrets()
        federated_rx = Responses(federated)
        await federated.write(sotw_request(["default", "spiffe://partner.test"], node_id="frontend"))
        first = await federated_rx.next()
        assert sorted(secrets_of(first)) == ["default", "spiffe://partner.test"]
        await federated.write(
            sotw_request(["default", "spiffe://partner.test"], version=first.version_info, nonce=first.nonce)
        )
        everything = stub(channel).StreamSecrets()
        everything_rx = Responses(everything)
        await everything.write(sotw_request(["ALL"], node_id="frontend"))
        all_first = await everything_rx.next()
        await everything.write(sotw_request(["ALL"], version=all_first.version_info, nonce=all_first.nonce))
        await everything_rx.none()

        # The federation is removed (same SVIDs, so only the bundles change).
        current = feed.current()
        from svidgate.identity.snapshot import IdentitySnapshot
        from tests.support.sds import TD

        with caplog.at_level(logging.WARNING, logger="svidgate.sds.servicer"):
            feed.publish(IdentitySnapshot(current.svids, {TD: current.bundles[TD]}, current.version + 1))
            await federated_rx._task
        assert await federated.code() == grpc.StatusCode.OK
        ended = [r for r in caplog.records if r.getMessage() == "sds.stream_ended_withdrawn"]
        assert [r.fields["resources"] for r in ended] == [{"spiffe://partner.test": "unknown"}]  # type: ignore[attr-defined]
        # ALL stays servable: its content changes (one trust domain fewer) and the stream goes on.
        changed = secrets_of(await everything_rx.next())["ALL"]
        assert changed.validation_context.HasField("custom_validator_config")
        assert not everything.done()
        everything_rx.close()
