"""The peercred front's attestation hook: every connection is attested before it is served, and a slow
attestation of one caller holds up nobody else."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from svidgate.config import Selector, Workload
from svidgate.identity.entitlement import CallerInfo, KubernetesWorkload
from svidgate.identity.snapshot import SnapshotFeed
from svidgate.peercred import PeerRegistry
from tests.support.peercred import ClaimedFront
from tests.support.sds import FRONTEND, Identities, secrets_of, sotw_request
from tests.support.sds_server import sds_server, stub
from tests.support.tempdir import short_dir

POD = KubernetesWorkload("shop", "frontend", "frontend-1", "uid-1", "node-1", "envoy")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir("sgpa-") as path:
        yield path


async def fetch_default(public: Path) -> list[str]:
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel: one attestation each
    async with grpc.aio.insecure_channel(f"unix:{public}", options=options) as channel:
        response = await stub(channel).FetchSecrets(sotw_request(["default"], node_id="envoy"), timeout=10)
        return list(secrets_of(response))


async def test_callers_are_attested_before_they_are_served_and_a_slow_one_blocks_nobody(
    sock_dir: Path,
) -> None:
    registry = PeerRegistry()
    feed = SnapshotFeed(Identities.create().snapshot())
    workloads = (Workload(FRONTEND, (Selector.parse("k8s:ns:shop"),)),)
    first_started = asyncio.Event()
    release_first = asyncio.Event()
    calls = 0

    async def attest(caller: CallerInfo) -> CallerInfo:
        nonlocal calls
        calls += 1
        assert caller.pid is not None  # the kernel-verified PID is what attestation starts from
        if calls == 1:
            first_started.set()
            await release_first.wait()  # a kubelet that takes its time for this caller
        return dataclasses.replace(caller, k8s=POD)

    inner, public = sock_dir / "inner.sock", sock_dir / "sds.sock"
    async with (
        sds_server(feed, workloads, address=f"unix:{inner}", peers=registry),
        ClaimedFront(public, str(inner), registry, attest=attest),
    ):
        slow = asyncio.create_task(fetch_default(public))
        await asyncio.wait_for(first_started.wait(), 10)
        # The second caller is attested and served while the first one's attestation is still waiting.
        assert await asyncio.wait_for(fetch_default(public), 10) == ["default"]
        assert not slow.done()
        release_first.set()
        assert await asyncio.wait_for(slow, 10) == ["default"]
    assert calls == 2
