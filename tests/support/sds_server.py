"""The SDS servicer on a real grpc.aio server, and a reader of its response streams (component tests)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from envoy.service.secret.v3 import sds_pb2_grpc

from svidgate.config import SdsConfig, Workload
from svidgate.identity.snapshot import SnapshotFeed
from svidgate.metrics import Metrics
from svidgate.sds.servicer import SERVER_OPTIONS, SecretDiscoveryServicer
from tests.support.sds import TD, WORKLOADS


@contextlib.asynccontextmanager
async def sds_server(
    feed: SnapshotFeed,
    workloads: Sequence[Workload] = WORKLOADS,
    sds: SdsConfig | None = None,
    *,
    address: str = "127.0.0.1:0",
    **kwargs: object,
) -> AsyncIterator[tuple[SecretDiscoveryServicer, str]]:
    """A grpc.aio server with the SDS servicer; yields the servicer and the target to dial."""
    server = grpc.aio.server(options=list(SERVER_OPTIONS), maximum_concurrent_rpcs=None)
    metrics = kwargs.pop("metrics", None)
    if isinstance(metrics, Metrics):  # the process's metrics: SDS records into its own part
        kwargs["metrics"] = metrics.sds
    servicer = SecretDiscoveryServicer(feed, workloads, sds or SdsConfig(), TD, **kwargs)  # type: ignore[arg-type]
    servicer.add_to_server(server)
    port = server.add_insecure_port(address)
    await server.start()
    target = f"127.0.0.1:{port}" if address.startswith("127.0.0.1") else address
    try:
        yield servicer, target
    finally:
        await server.stop(grace=None)


def stub(channel: grpc.aio.Channel) -> sds_pb2_grpc.SecretDiscoveryServiceStub:
    return sds_pb2_grpc.SecretDiscoveryServiceStub(channel)


class Responses:
    """Reads a response stream in the background, so a test can wait for the next one or for none."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        self.call = call
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            async for response in self.call:
                await self.queue.put(response)
        except grpc.aio.AioRpcError as err:
            await self.queue.put(err)

    async def next(self, timeout: float = 5.0) -> Any:
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, Exception):
            raise item
        return item

    async def none(self, wait: float = 0.3) -> None:
        # The absence of a push can only be shown by waiting a little; the protocol gives nothing to wait on.
        await asyncio.sleep(wait)
        assert self.queue.empty(), f"unexpected response: {self.queue.get_nowait()!r}"

    def close(self) -> None:
        self.call.cancel()
        self._task.cancel()
