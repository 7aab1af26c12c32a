"""Reconnect storms: thousands of SDS streams opened at once on one server, none refused."""

from __future__ import annotations

import asyncio

import grpc

from svidgate.identity.snapshot import SnapshotFeed
from svidgate.sds.servicer import SERVER_OPTIONS
from tests.support.sds import Identities, sotw_request
from tests.support.sds_server import sds_server, stub

STREAMS = 3000
CHANNELS = 8  # a node's Envoys reconnecting: many connections, many streams each


async def open_streams(target: str, count: int, channels: int) -> tuple[int, list[str]]:
    """Open `count` StreamSecrets at once; return how many got their first response, and the errors."""
    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    calls = []
    errors: list[str] = []

    async def one(i: int) -> bool:
        call = stub(chans[i % channels]).StreamSecrets()
        calls.append(call)
        try:
            await call.write(sotw_request(["default", "ROOTCA"], node_id="frontend"))
            response = await asyncio.wait_for(call.read(), 60)
            return response is not grpc.aio.EOF and len(response.resources) == 2  # type: ignore[attr-defined]
        except (TimeoutError, grpc.aio.AioRpcError) as err:
            errors.append(repr(err)[:200])
            return False

    try:
        results = await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for call in calls:
            call.cancel()
        for chan in chans:
            await chan.close(None)
    return sum(results), errors


async def test_burst_of_streams_none_refused() -> None:
    ids = Identities.create()
    feed = SnapshotFeed(ids.snapshot())
    async with sds_server(feed) as (_, target):
        served, errors = await open_streams(target, STREAMS, CHANNELS)
    assert errors == []
    assert served == STREAMS


def test_server_options_raise_grpc_core_limits() -> None:
    options = dict(SERVER_OPTIONS)
    # grpc-core defaults: 1000 pending requests (random refusals above), hard limit 3000.
    assert options["grpc.server.max_pending_requests"] >= 10 * 1000
    assert options["grpc.server.max_pending_requests_hard_limit"] >= 10 * 3000
    assert options["grpc.max_concurrent_streams"] >= 10_000
