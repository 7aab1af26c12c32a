"""The validated-token cache (svidgate.extauthz.cache)."""

from __future__ import annotations

from typing import Any

import pytest

from svidgate.errors import JwtSvidError
from svidgate.extauthz import cache as cache_module
from svidgate.extauthz.cache import TokenCache
from svidgate.identity import jwtsvid
from svidgate.identity.bundle import Bundle
from tests.support.ca import NOW, TestCA

WEB = "spiffe://example.org/web"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = jwtsvid.validate_jwt_svid

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(cache_module, "validate_jwt_svid", counting)
    return seen


def test_hit_costs_no_validation(ca: TestCA, calls: list[str]) -> None:
    cache = TokenCache(10)
    token = ca.create_jwt_svid(WEB, ["api"])
    bundles = ca.bundles()
    first = cache.validate(token, bundles, {"api"}, NOW, 30)
    second = cache.validate(token, bundles, {"api"}, NOW + 1, 30)
    assert first is second
    assert len(calls) == 1


def test_audience_checked_on_every_hit(ca: TestCA, calls: list[str]) -> None:
    cache = TokenCache(10)
    token = ca.create_jwt_svid(WEB, ["api"])
    cache.validate(token, ca.bundles(), {"api"}, NOW, 30)
    with pytest.raises(JwtSvidError) as info:
        cache.validate(token, ca.bundles(), {"other"}, NOW, 30)
    assert info.value.reason == "audience_mismatch"
    assert len(calls) == 1


def test_entry_dies_at_exp(ca: TestCA, calls: list[str]) -> None:
    cache = TokenCache(10)
    token = ca.create_jwt_svid(WEB, ["api"], ttl=60)
    bundles = ca.bundles()
    cache.validate(token, bundles, {"api"}, NOW, 30)
    assert cache.lookup(token, bundles, NOW + 59) is not None
    assert cache.lookup(token, bundles, NOW + 60) is None
    assert len(cache) == 0
    # Within the validator's leeway the token still validates, but it is no longer cached.
    cache.validate(token, bundles, {"api"}, NOW + 70, 30)
    assert len(cache) == 0
    with pytest.raises(JwtSvidError, match="expired"):
        cache.validate(token, bundles, {"api"}, NOW + 91, 30)


def test_dropped_when_bundle_loses_the_key(ca: TestCA) -> None:
    cache = TokenCache(10)
    token = ca.create_jwt_svid(WEB, ["api"])
    cache.validate(token, ca.bundles(), {"api"}, NOW, 30)
    # A new bundle object holding the same key (a snapshot that re-read the bundle): still a hit.
    same = {ca.trust_domain: ca.bundle()}
    assert cache.lookup(token, same, NOW) is not None
    # The key is gone (rotation or compromise): miss, entry dropped, and validation now fails.
    other = TestCA("example.org")
    rotated = {ca.trust_domain: other.bundle()}
    assert cache.lookup(token, rotated, NOW) is None
    assert len(cache) == 0
    with pytest.raises(JwtSvidError, match="unknown_key"):
        cache.validate(token, rotated, {"api"}, NOW, 30)
    # The trust domain disappeared altogether.
    cache.validate(token, ca.bundles(), {"api"}, NOW, 30)
    assert cache.lookup(token, {}, NOW) is None


def test_same_kid_different_key_is_a_miss(ca: TestCA) -> None:
    cache = TokenCache(10)
    token = ca.create_jwt_svid(WEB, ["api"])
    cache.validate(token, ca.bundles(), {"api"}, NOW, 30)
    impostor = TestCA("example.org")
    swapped = {
        ca.trust_domain: Bundle(ca.trust_domain, jwt_authorities={ca.jwt_kid: impostor.jwt_key.public_key()})
    }
    assert cache.lookup(token, swapped, NOW) is None


def test_lru_bound(ca: TestCA) -> None:
    cache = TokenCache(2)
    bundles = ca.bundles()
    tokens = [ca.create_jwt_svid(WEB, ["api"], now=NOW - i) for i in range(3)]
    cache.validate(tokens[0], bundles, {"api"}, NOW, 30)
    cache.validate(tokens[1], bundles, {"api"}, NOW, 30)
    cache.lookup(tokens[0], bundles, NOW)  # tokens[0] is now the most recently used
    cache.validate(tokens[2], bundles, {"api"}, NOW, 30)
    assert len(cache) == 2
    assert cache.lookup(tokens[1], bundles, NOW) is None
    assert cache.lookup(tokens[0], bundles, NOW) is not None


def test_disabled(ca: TestCA, calls: list[str]) -> None:
    cache = TokenCache(0)
    token = ca.create_jwt_svid(WEB, ["api"])
    cache.validate(token, ca.bundles(), {"api"}, NOW, 30)
    cache.validate(token, ca.bundles(), {"api"}, NOW, 30)
    assert len(calls) == 2
    assert len(cache) == 0


def test_failures_are_not_cached(ca: TestCA, calls: list[str]) -> None:
    cache = TokenCache(10)
    token = ca.create_jwt_svid(WEB, ["api"])
    for _ in range(2):
        with pytest.raises(JwtSvidError):
            cache.validate(token, ca.bundles(), {"nope"}, NOW, 30)
    assert len(cache) == 0


def test_an_entry_is_bound_to_the_kid_that_verified_it(ca: TestCA) -> None:
    cache = TokenCache(10)
    token = ca.create_jwt_svid(WEB, ["api"])
    svid = jwtsvid.validate_jwt_svid(token, ca.bundles(), ["api"], NOW)
    assert svid.key_id == ca.jwt_kid
    # A JwtSvid that was not parsed from a token here names no key: it is never trusted from the cache.
    cache.store(
        jwtsvid.JwtSvid(token, svid.spiffe_id, svid.audience, svid.expiry, None, {}), ca.bundles(), NOW
    )
    assert len(cache) == 0
    cache.store(svid, ca.bundles(), NOW)
    assert len(cache) == 1
