"""Inject mode (svidgate.extauthz.inject): one mint per token lifetime; entitlement where it is knowable."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from svidgate.config import parse_config
from svidgate.errors import SourceError
from svidgate.extauthz.inject import (
    MINT_FAILED,
    NO_AUDIENCE,
    NOT_ENTITLED,
    UNVERIFIED_CALLER,
    InjectError,
    TokenInjector,
    caller_from_extensions,
)
from svidgate.identity.clock import FakeClock
from svidgate.identity.entitlement import CallerInfo
from svidgate.identity.jwtsvid import JwtSvid
from svidgate.identity.spiffe_id import SpiffeId

EGRESS = SpiffeId.parse("spiffe://example.org/egress")

WORKLOADS = parse_config(
    """
trust_domain: example.org
workloads:
  - spiffe_id: spiffe://example.org/egress
    selectors: [unix:uid:1000]
  - spiffe_id: spiffe://example.org/other
    selectors: [envoy:node_id:other]
""",
    "test",
).workloads


class Minter:
    def __init__(self, clock: FakeClock, ttl: int = 300) -> None:
        self.clock = clock
        self.ttl = ttl
        self.calls: list[tuple[SpiffeId, tuple[str, ...]]] = []

    def __call__(self, spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        self.calls.append((spiffe_id, tuple(audience)))
        now = int(self.clock())
        return JwtSvid(f"t{len(self.calls)}.x.y", spiffe_id, tuple(audience), now + self.ttl, now, {})


def test_token_reused_until_half_lifetime() -> None:
    clock = FakeClock(1_800_000_000)
    minter = Minter(clock, ttl=300)
    injector = TokenInjector(minter, WORKLOADS, clock)
    first = injector.token(EGRESS, "backend")
    clock.advance(149)
    assert injector.token(EGRESS, "backend") is first
    clock.advance(1)
    second = injector.token(EGRESS, "backend")
    assert second is not first
    assert len(minter.calls) == 2
    assert minter.calls[0] == (EGRESS, ("backend",))


def test_short_tokens_refresh_30s_before_expiry() -> None:
    clock = FakeClock(1_800_000_000)
    minter = Minter(clock, ttl=3600)
    injector = TokenInjector(minter, WORKLOADS, clock)
    injector.token(EGRESS, "backend")
    clock.advance(1799)
    injector.token(EGRESS, "backend")
    assert len(minter.calls) == 1
    minter.ttl = 70  # half-life 35 s, 30 s before expiry = 40 s: the earlier (35 s) wins
    clock.advance(1)
    injector.token(EGRESS, "backend")
    clock.advance(34)
    injector.token(EGRESS, "backend")
    assert len(minter.calls) == 2
    clock.advance(1)
    injector.token(EGRESS, "backend")
    assert len(minter.calls) == 3


def test_one_token_per_audience() -> None:
    clock = FakeClock()
    minter = Minter(clock)
    injector = TokenInjector(minter, WORKLOADS, clock)
    a = injector.token(EGRESS, "a")
    b = injector.token(EGRESS, "b")
    assert a is not b
    assert injector.token(EGRESS, "a") is a


def test_no_audience_and_mint_failure() -> None:
    clock = FakeClock()

    def failing(spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        raise SourceError("upstream SPIRE agent unavailable")

    injector = TokenInjector(failing, WORKLOADS, clock)
    with pytest.raises(InjectError) as info:
        injector.token(EGRESS, "")
    assert info.value.reason == NO_AUDIENCE
    with pytest.raises(InjectError) as info:
        injector.token(EGRESS, "backend")
    assert info.value.reason == MINT_FAILED


def test_entitlement_of_known_callers() -> None:
    injector = TokenInjector(Minter(FakeClock()), WORKLOADS, FakeClock())
    injector.check_entitled(EGRESS, CallerInfo(uid=1000))  # kernel-verified uid matches the workload
    with pytest.raises(InjectError) as unverified:
        injector.check_entitled(EGRESS, None)  # nothing kernel-verified (TCP): never minted for
    assert unverified.value.reason == UNVERIFIED_CALLER
    with pytest.raises(InjectError) as info:
        injector.check_entitled(EGRESS, CallerInfo(uid=1001))
    assert info.value.reason == NOT_ENTITLED
    with pytest.raises(InjectError):
        injector.check_entitled(EGRESS, CallerInfo(node_id="other"))


def test_caller_from_extensions() -> None:
    assert caller_from_extensions(None, {}) is None
    assert caller_from_extensions(None, {"node_id": "n"}) == CallerInfo(node_id="n")
    peer = CallerInfo(uid=5, gid=6, pid=7)
    assert caller_from_extensions(peer, {"cluster": "c"}) == CallerInfo(None, "c", 5, 6, 7)
