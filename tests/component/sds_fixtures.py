"""Shared builders for the SDS tests (unit, component): CAs, snapshots, workloads, a servicer on a server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2, struct_pb2

from svidgate.config import SdsConfig, Selector, Workload
from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import FakeClock
from svidgate.identity.keys import KeyType
from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import X509Svid
from svidgate.metrics import Metrics
from svidgate.sds.resources import SECRET_TYPE_URL
from svidgate.sds.servicer import SERVER_OPTIONS, SecretDiscoveryServicer

TD = TrustDomain("example.org")
FED_TD = TrustDomain("partner.test")
FRONTEND = SpiffeId.parse("spiffe://example.org/frontend")
BACKEND = SpiffeId.parse("spiffe://example.org/backend")
ADMIN = SpiffeId.parse("spiffe://example.org/admin")


def workload(spiffe_id: SpiffeId, *selectors: str) -> Workload:
    return Workload(spiffe_id, tuple(Selector.parse(s) for s in selectors))


#: frontend for node "frontend", backend for node "backend"; admin needs node "backend" AND cluster "ops".
WORKLOADS: tuple[Workload, ...] = (
    workload(FRONTEND, "envoy:node_id:frontend"),
    workload(BACKEND, "envoy:node_id:backend"),
    workload(ADMIN, "envoy:node_id:backend", "envoy:cluster:ops"),
)


@dataclass
class Identities:
    """A CA for the own trust domain, one for a federated one, and a clock; mints snapshots."""

    clock: FakeClock
    ca: BuiltinCa
    fed_ca: BuiltinCa
    version: int = 0

    @classmethod
    def create(cls) -> Identities:
        import time

        clock = FakeClock(time.time())
        return cls(
            clock,
            BuiltinCa.in_memory(TD, KeyType.EC_P256, clock),
            BuiltinCa.in_memory(FED_TD, KeyType.EC_P256, clock),
        )

    def mint(self, spiffe_id: SpiffeId, ttl: float = 3600) -> X509Svid:
        ca = self.ca if spiffe_id.trust_domain == TD else self.fed_ca
        return ca.mint_x509_svid(spiffe_id, ttl)

    def snapshot(
        self,
        ids: Sequence[SpiffeId] = (FRONTEND, BACKEND, ADMIN),
        *,
        federated: bool = True,
        svids: Mapping[SpiffeId, X509Svid] | None = None,
    ) -> IdentitySnapshot:
        self.version += 1
        bundles = {TD: self.ca.bundle()}
        if federated:
            bundles[FED_TD] = self.fed_ca.bundle()
        return IdentitySnapshot(
            svids=dict(svids) if svids is not None else {i: self.mint(i) for i in ids},
            bundles=bundles,
            version=self.version,
        )


def node(node_id: str = "frontend", cluster: str = "", validation: str | None = None) -> base_pb2.Node:
    result = base_pb2.Node(id=node_id, cluster=cluster)
    if validation is not None:
        result.metadata.CopyFrom(
            struct_pb2.Struct(fields={"svidgate.validation": struct_pb2.Value(string_value=validation)})
        )
    return result


def sotw_request(
    names: Sequence[str],
    *,
    version: str = "",
    nonce: str = "",
    error: str | None = None,
    node_id: str | None = None,
) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(
        resource_names=list(names), version_info=version, response_nonce=nonce, type_url=SECRET_TYPE_URL
    )
    if node_id is not None:
        request.node.CopyFrom(node(node_id))
    if error is not None:
        request.error_detail.code = 3
        request.error_detail.message = error
    return request


def unpack(resource: any_pb2.Any) -> secret_pb2.Secret:
    secret = secret_pb2.Secret()
    assert resource.Unpack(secret)
    return secret


def secrets_of(response: discovery_pb2.DiscoveryResponse) -> dict[str, secret_pb2.Secret]:
    return {s.name: s for s in (unpack(r) for r in response.resources)}


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
