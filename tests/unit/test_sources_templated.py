"""The built-in source's templated SVIDs: minted on the first hold, rotated while held, dropped when idle."""

from __future__ import annotations

import pytest

from svidgate.config import Selector, Workload
from svidgate.errors import SourceError
from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import FakeClock
from svidgate.identity.keys import KeyType
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.template import SpiffeIdTemplate
from svidgate.identity.x509svid import verify_x509_svid
from svidgate.sources import BuiltinSource
from svidgate.sources.builtin import TEMPLATED_IDLE

TD = TrustDomain("example.org")
HOUR = 3600.0
STATIC = SpiffeId.parse("spiffe://example.org/static")
TEMPLATED = Workload(
    SpiffeIdTemplate.parse("spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}"),
    (Selector.parse("k8s:ns:shop"),),
    ("mesh.internal",),
    "mesh",
)
FRONTEND = SpiffeId.parse("spiffe://example.org/ns/shop/sa/frontend")
BACKEND = SpiffeId.parse("spiffe://example.org/ns/shop/sa/backend")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def source(clock: FakeClock) -> BuiltinSource:
    ca = BuiltinCa.in_memory(TD, KeyType.EC_P256, clock, ca_ttl=30 * 86400)
    workloads = [Workload(STATIC, (Selector("any"),)), TEMPLATED]
    return BuiltinSource(ca, workloads, None, clock, x509_svid_ttl=HOUR, jwt_svid_ttl=300)


async def test_first_hold_mints_and_publishes_with_the_workloads_dns_names_and_hint(
    source: BuiltinSource, clock: FakeClock
) -> None:
    first = source.feed.current()
    assert set(first.svids) == {STATIC}  # nothing minted for a template up front
    await source.acquire(FRONTEND, TEMPLATED)
    second = source.feed.current()
    assert second.version == first.version + 1
    svid = second.svids[FRONTEND]
    assert verify_x509_svid(svid.cert_chain, second.bundles, clock()) == FRONTEND
    assert svid.hint == "mesh"
    await source.acquire(FRONTEND, TEMPLATED)  # a second holder: no new mint, no new snapshot
    assert source.feed.current() is second
    assert source.templated_svids == 1


async def test_held_svids_rotate_and_idle_ones_are_dropped(source: BuiltinSource, clock: FakeClock) -> None:
    await source.acquire(FRONTEND, TEMPLATED)
    await source.acquire(BACKEND, TEMPLATED)
    minted = source.feed.current().svids[FRONTEND]
    clock.advance(HOUR / 2 + 1)
    assert source.refresh() is True
    assert source.feed.current().svids[FRONTEND] is not minted  # rotated like every SVID
    source.release(BACKEND)
    assert source.next_due() <= clock() + TEMPLATED_IDLE
    clock.advance(TEMPLATED_IDLE - 1)
    source.refresh()
    assert BACKEND in source.feed.current().svids  # idle, not yet dropped
    clock.advance(2)
    assert source.refresh() is True
    assert set(source.feed.current().svids) == {STATIC, FRONTEND}
    assert source.templated_svids == 1


async def test_held_again_while_idle_is_kept(source: BuiltinSource, clock: FakeClock) -> None:
    await source.acquire(FRONTEND, TEMPLATED)
    source.release(FRONTEND)
    clock.advance(TEMPLATED_IDLE - 10)
    await source.acquire(FRONTEND, TEMPLATED)  # an Envoy reconnecting gets the same SVID back
    clock.advance(20)
    source.refresh()
    assert FRONTEND in source.feed.current().svids


async def test_jwt_svids_only_for_held_templated_ids(source: BuiltinSource) -> None:
    with pytest.raises(SourceError, match="not a configured workload"):
        source.mint_jwt_svid(FRONTEND, ["aud"])
    await source.acquire(FRONTEND, TEMPLATED)
    assert source.mint_jwt_svid(FRONTEND, ["aud"]).spiffe_id == FRONTEND


async def test_a_reload_keeps_held_templated_svids(source: BuiltinSource) -> None:
    await source.acquire(FRONTEND, TEMPLATED)
    source.set_workloads([Workload(STATIC, (Selector("any"),))])
    assert FRONTEND in source.feed.current().svids
