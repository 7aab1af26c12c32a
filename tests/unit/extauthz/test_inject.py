"""Inject mode (svidgate.extauthz.inject): one mint per token lifetime; entitlement where it is knowable."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace

import pytest

from svidgate.config import Policy, PolicyMatch, parse_config
from svidgate.errors import SourceError
from svidgate.extauthz.inject import (
    AUDIENCE_NOT_ALLOWED,
    MINT_FAILED,
    NO_AUDIENCE,
    NO_IDENTITY,
    NOT_ENTITLED,
    UNVERIFIED_CALLER,
    InjectError,
    TokenInjector,
    allowed_audiences,
    caller_from_extensions,
    is_verified,
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
    def __init__(self, clock: FakeClock | None = None, ttl: int = 300) -> None:
        self.clock = clock or FakeClock(1_800_000_000)
        self.ttl = ttl
        self.calls: list[tuple[SpiffeId, tuple[str, ...]]] = []
        self._lock = threading.Lock()

    def __call__(self, spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        with self._lock:
            self.calls.append((spiffe_id, tuple(audience)))
            n = len(self.calls)
        now = int(self.clock())
        return JwtSvid(f"t{n}.x.y", spiffe_id, tuple(audience), now + self.ttl, now, {})


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


# Hardening: inject mode.
#
# Hardening of inject mode: no tokens for unverified callers or unlisted audiences; mints do not queue.
# Regression for the review's inj/ repro: over TCP (no peer credentials) and with no node_id/cluster, the
# caller was None, the entitlement check was skipped, and `context_extensions["audience"]` chose any audience.

FRONTEND = SpiffeId.parse("spiffe://example.org/frontend")
REVIEW_WORKLOADS = parse_config(
    """
trust_domain: example.org
workloads:
  - spiffe_id: spiffe://example.org/frontend
    selectors: ["unix:uid:1000", "envoy:node_id:frontend-egress"]
  - spiffe_id: spiffe://example.org/backend
    selectors: ["unix:uid:1000", "envoy:node_id:backend-ingress"]
""",
    "test",
).workloads
#: The review's egress policy, with an explicit audience list.
EGRESS_POLICY = Policy(
    name="egress",
    match=PolicyMatch(context_extensions={"policy": "egress"}),
    audiences=("backend", "payments"),
    mode="inject",
    inject_audience="backend",
    inject_spiffe_id=FRONTEND,
)
VERIFIED = CallerInfo(uid=1000, gid=1000, pid=42)
EXT = {"policy": "egress", "node_id": "frontend-egress"}
TIMEOUT = 10.0  # a safety net for a broken test, never a time the test waits for


def injector(minter: Minter | None = None) -> TokenInjector:
    minter = minter or Minter()
    return TokenInjector(minter, REVIEW_WORKLOADS, minter.clock)


@pytest.mark.parametrize(
    ("peer", "extensions"),
    [
        (None, {"policy": "egress"}),  # the review's repro: nothing known at all
        (None, EXT),  # claims only: anyone can write node_id into a CheckRequest
        (CallerInfo(node_id="frontend-egress"), EXT),  # a peer record without kernel credentials
    ],
)
def test_unverified_callers_get_no_token(peer: CallerInfo | None, extensions: dict[str, str]) -> None:
    minter = Minter()
    with pytest.raises(InjectError) as info:
        injector(minter).inject(EGRESS_POLICY, peer, extensions)
    assert info.value.reason == UNVERIFIED_CALLER
    assert minter.calls == []


def test_the_legacy_entitlement_check_fails_closed_too() -> None:
    # What servicer.py calls today: check_entitled(spiffe_id, caller_from_extensions(...)).
    with pytest.raises(InjectError) as info:
        injector().check_entitled(FRONTEND, None)
    assert info.value.reason == UNVERIFIED_CALLER
    with pytest.raises(InjectError):
        injector().check_entitled(FRONTEND, CallerInfo(node_id="frontend-egress"))


def test_opt_in_lets_unverified_callers_through() -> None:
    opted = replace(EGRESS_POLICY, inject_allow_unverified_callers=True)
    svid = injector().inject(opted, None, {"policy": "egress"})
    assert (svid.spiffe_id, svid.audience) == (FRONTEND, ("backend",))


def test_verified_callers_are_checked_against_workloads() -> None:
    svid = injector().inject(EGRESS_POLICY, VERIFIED, EXT)
    assert svid.spiffe_id == FRONTEND
    for peer, extensions in (
        (CallerInfo(uid=4242), EXT),  # another user
        (VERIFIED, {"policy": "egress", "node_id": "backend-ingress"}),  # right user, other node
        (VERIFIED, {"policy": "egress"}),  # the workload needs the node id as well
    ):
        with pytest.raises(InjectError) as info:
            injector().inject(EGRESS_POLICY, peer, extensions)
        assert info.value.reason == NOT_ENTITLED


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (None, "backend"),
        ("", "backend"),
        ("backend", "backend"),
        ("payments", "payments"),
        ("payments-prod", AUDIENCE_NOT_ALLOWED),  # the review's attacker-chosen audience
        ("Backend", AUDIENCE_NOT_ALLOWED),  # audiences are compared exactly, as validators do
        ("spiffe://example.org/backend", AUDIENCE_NOT_ALLOWED),
    ],
)
def test_requested_audience_must_be_listed(requested: str | None, expected: str) -> None:
    minter = Minter()
    extensions = dict(EXT) if requested is None else {**EXT, "audience": requested}
    if expected == AUDIENCE_NOT_ALLOWED:
        with pytest.raises(InjectError) as info:
            injector(minter).inject(EGRESS_POLICY, VERIFIED, extensions)
        assert info.value.reason == AUDIENCE_NOT_ALLOWED
        assert minter.calls == []
    else:
        assert injector(minter).inject(EGRESS_POLICY, VERIFIED, extensions).audience == (expected,)


def test_inject_audience_counts_as_listed() -> None:
    only_default = replace(EGRESS_POLICY, audiences=())
    assert allowed_audiences(only_default) == frozenset({"backend"})
    assert injector().inject(only_default, VERIFIED, {**EXT, "audience": "backend"}).audience == ("backend",)
    with pytest.raises(InjectError):
        injector().inject(only_default, VERIFIED, {**EXT, "audience": "payments"})


def test_a_policy_without_inject_spiffe_id_mints_nothing() -> None:
    with pytest.raises(InjectError) as info:
        injector().inject(replace(EGRESS_POLICY, inject_spiffe_id=None), VERIFIED, EXT)
    assert info.value.reason == NO_IDENTITY


def test_only_kernel_credentials_make_a_caller_verified() -> None:
    assert not is_verified(None)
    assert not is_verified(CallerInfo(node_id="n", cluster="c"))
    assert is_verified(CallerInfo(uid=0))


# -- the minting lock ---------------------------------------------------------------------------------------


class GatedMinter(Minter):
    """Blocks minting for one audience until released, to hold a mint "in flight"."""

    def __init__(self, gated: str) -> None:
        super().__init__()
        self.gated = gated
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        if audience[0] == self.gated:
            self.entered.set()
            assert self.release.wait(TIMEOUT)
        return super().__call__(spiffe_id, audience)


def test_a_slow_mint_does_not_block_other_tokens() -> None:
    minter = GatedMinter("slow")
    tokens = injector(minter)
    cached = tokens.token(FRONTEND, "cached")
    slow = threading.Thread(target=tokens.token, args=(FRONTEND, "slow"))
    slow.start()
    try:
        assert minter.entered.wait(TIMEOUT)
        # While "slow" is being minted, a cached token and a new audience are both served at once. With one
        # global lock held during the mint, these calls would block until release.
        done = threading.Event()
        results: list[JwtSvid] = []

        def others() -> None:
            results.extend((tokens.token(FRONTEND, "cached"), tokens.token(FRONTEND, "other")))
            done.set()

        threading.Thread(target=others, daemon=True).start()
        assert done.wait(TIMEOUT), "a mint in flight blocked unrelated tokens"
        assert results[0] is cached
        assert results[1].audience == ("other",)
    finally:
        minter.release.set()
        slow.join(TIMEOUT)


def test_concurrent_misses_for_one_token_mint_once() -> None:
    minter = GatedMinter("backend")
    tokens = injector(minter)
    results: list[JwtSvid] = []
    threads = [
        threading.Thread(target=lambda: results.append(tokens.token(FRONTEND, "backend"))) for _ in range(8)
    ]
    threads[0].start()
    assert minter.entered.wait(TIMEOUT)
    for thread in threads[1:]:
        thread.start()
    minter.release.set()
    for thread in threads:
        thread.join(TIMEOUT)
    assert len(results) == 8
    assert all(r is results[0] for r in results)
    assert len(minter.calls) == 1


def test_a_failed_mint_fails_its_followers_and_is_retried() -> None:
    calls = 0
    gate = threading.Event()
    entered = threading.Event()

    def failing(spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        nonlocal calls
        calls += 1
        entered.set()
        assert gate.wait(TIMEOUT)
        raise SourceError("upstream SPIRE agent unavailable")

    tokens = TokenInjector(failing, REVIEW_WORKLOADS, FakeClock())
    errors: list[str] = []

    def fetch() -> None:
        try:
            tokens.token(FRONTEND, "backend")
        except InjectError as err:
            errors.append(err.reason)

    leader = threading.Thread(target=fetch)
    leader.start()
    assert entered.wait(TIMEOUT)
    follower = threading.Thread(target=fetch)
    follower.start()
    gate.set()
    leader.join(TIMEOUT)
    follower.join(TIMEOUT)
    assert errors == [MINT_FAILED, MINT_FAILED]
    assert calls in (1, 2)  # the follower either shared the flight or started the retry after it
    with pytest.raises(InjectError):
        tokens.token(FRONTEND, "backend")  # nothing cached: a later request tries again
    assert calls >= 2
