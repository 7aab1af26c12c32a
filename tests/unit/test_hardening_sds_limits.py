"""Size caps of the pure SDS stream state machines (security review: a 150k-name request held the loop)."""

from __future__ import annotations

import pytest

from svidgate.identity.snapshot import IdentitySnapshot
from svidgate.sds.resources import Naming, SecretResolver, Subscriber
from svidgate.sds.stream import (
    MAX_RESOURCE_NAMES,
    DeltaStream,
    ResourceLimitError,
    SotwStream,
    check_resource_names,
)
from tests.support.sds import FRONTEND, TD, Identities

SUB = Subscriber((FRONTEND,), "spiffe")


@pytest.fixture(scope="module")
def snapshot() -> IdentitySnapshot:
    return Identities.create().snapshot()


def resolver(snapshot: IdentitySnapshot) -> SecretResolver:
    return SecretResolver(snapshot, Naming(TD))


def junk(count: int, prefix: str = "n") -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def test_check_resource_names_edges() -> None:
    check_resource_names("resource_names", MAX_RESOURCE_NAMES)
    with pytest.raises(ResourceLimitError) as info:
        check_resource_names("resource_names", MAX_RESOURCE_NAMES + 1)
    assert (info.value.field, info.value.count, info.value.limit) == (
        "resource_names",
        MAX_RESOURCE_NAMES + 1,
        MAX_RESOURCE_NAMES,
    )
    assert "resource_names has 1001 resource names; at most 1000" in str(info.value)


def test_sotw_at_the_cap_is_served(snapshot: IdentitySnapshot) -> None:
    stream = SotwStream(SUB)
    step = stream.on_request([*junk(MAX_RESOURCE_NAMES - 1), "ROOTCA"], "", "", None, resolver(snapshot))
    assert step.response is not None
    assert [r.name for r in step.response.resources] == ["ROOTCA"]


def test_sotw_over_the_cap_is_refused_before_any_state_changes(snapshot: IdentitySnapshot) -> None:
    stream = SotwStream(SUB)
    res = resolver(snapshot)
    with pytest.raises(ResourceLimitError):
        stream.on_request([*junk(150_000), "ROOTCA"], "", "", None, res)
    # Duplicates count: the cost is in the raw list, not in the distinct names.
    with pytest.raises(ResourceLimitError):
        stream.on_request(["ROOTCA"] * (MAX_RESOURCE_NAMES + 1), "", "", None, res)
    assert stream.names == ()
    assert stream.last_nonce is None
    # The refused requests left nothing behind: the next request is still the stream's first.
    step = stream.on_request(["ROOTCA"], "", "", None, res)
    assert step.response is not None
    assert step.response.nonce == "1"


@pytest.mark.parametrize(
    ("subscribe", "unsubscribe", "initial", "field"),
    [
        (junk(MAX_RESOURCE_NAMES + 1), [], {}, "resource_names_subscribe"),
        (["ROOTCA"], junk(MAX_RESOURCE_NAMES + 1), {}, "resource_names_unsubscribe"),
        (["ROOTCA"], [], dict.fromkeys(junk(MAX_RESOURCE_NAMES + 1), "v"), "initial_resource_versions"),
    ],
)
def test_delta_each_list_is_capped(
    snapshot: IdentitySnapshot,
    subscribe: list[str],
    unsubscribe: list[str],
    initial: dict[str, str],
    field: str,
) -> None:
    stream = DeltaStream(SUB)
    with pytest.raises(ResourceLimitError) as info:
        stream.on_request(subscribe, unsubscribe, initial, "", None, resolver(snapshot))
    assert info.value.field == field
    assert stream.names == ()


def test_delta_subscriptions_are_capped_per_stream(snapshot: IdentitySnapshot) -> None:
    res = resolver(snapshot)
    stream = DeltaStream(SUB)
    half = MAX_RESOURCE_NAMES // 2 + 100
    step = stream.on_request([*junk(half, "a"), "ROOTCA"], [], {}, "", None, res)
    assert step.response is not None
    # Each request is under the cap, the stream would not be: refused, and the subscription is unchanged.
    with pytest.raises(ResourceLimitError) as info:
        stream.on_request(junk(half, "b"), [], {}, step.response.nonce, None, res)
    assert info.value.field == "subscriptions"
    assert info.value.count == 2 * half + 1
    assert len(stream.names) == half + 1
    # Swapping names in one request (subscribe b*, unsubscribe a*) stays under the cap: accepted.
    stream.on_request(junk(half, "b"), junk(half, "a"), {}, step.response.nonce, None, res)
    assert len(stream.names) == half + 1
    # Re-subscribing to names already held adds nothing.
    stream.on_request(junk(half, "b"), [], {}, "", None, res)
    assert len(stream.names) == half + 1
