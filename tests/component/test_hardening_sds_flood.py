"""SDS requests too large to serve are refused whole, on a real server (security review: one SotW request with
150k junk names held the shared event loop for 20-40 s, stalling ext_authz Check on the same loop)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from svidgate.identity.snapshot import SnapshotFeed
from svidgate.sds.resources import SECRET_TYPE_URL
from svidgate.sds.servicer import MAX_NAMES_LOGGED, MAX_NODE_FIELD_LENGTH
from svidgate.sds.stream import MAX_RESOURCE_NAMES
from tests.support.sds import Identities, secrets_of, sotw_request
from tests.support.sds_server import Responses, sds_server, stub

#: The size of the reviewer's reproduction (/tmp/review/inj/sds_names_flood.py).
FLOOD = 150_000


@pytest.fixture
def ids() -> Identities:
    return Identities.create()


def flood_names(count: int = FLOOD) -> list[str]:
    return [*(f"n{i}" for i in range(count)), "ROOTCA"]


def delta_request(
    subscribe: list[str], unsubscribe: list[str] | None = None, node_id: str = "frontend", nonce: str = ""
) -> discovery_pb2.DeltaDiscoveryRequest:
    request = discovery_pb2.DeltaDiscoveryRequest(
        type_url=SECRET_TYPE_URL,
        resource_names_subscribe=subscribe,
        resource_names_unsubscribe=unsubscribe or [],
        response_nonce=nonce,
    )
    request.node.id = node_id
    return request


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
        code = await stream_status(stub(channel).DeltaSecrets(), delta_request(flood_names()))
        assert code == grpc.StatusCode.INVALID_ARGUMENT

        code = await stream_status(
            stub(channel).DeltaSecrets(), delta_request(["ROOTCA"], [f"n{i}" for i in range(FLOOD)])
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT

        # Under the cap per request, over it per stream (delta subscriptions accumulate).
        call = stub(channel).DeltaSecrets()
        rx = Responses(call)
        half = MAX_RESOURCE_NAMES // 2 + 1
        await call.write(delta_request([*(f"a{i}" for i in range(half)), "ROOTCA"]))
        first = await rx.next()
        assert [r.name for r in first.resources] == ["ROOTCA"]
        await call.write(delta_request([f"b{i}" for i in range(half)], nonce=first.nonce))
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
            delta = delta_request(["ROOTCA"])
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
