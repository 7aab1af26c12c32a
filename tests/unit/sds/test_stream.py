"""The pure SDS stream state machines: versions, nonces, ACK/NACK, subscriptions, rotation."""

from __future__ import annotations

import pytest

from svidgate.identity.snapshot import IdentitySnapshot
from svidgate.sds.resources import Naming, SecretResolver, Subscriber
from svidgate.sds.stream import (
    MAX_RESOURCE_NAMES,
    Ack,
    DeltaStream,
    Nack,
    Rejected,
    Removed,
    ResourceLimitError,
    SotwStream,
    StaleNonce,
    Withdrawn,
    check_resource_names,
    state_version,
)
from tests.support.sds import BACKEND, FRONTEND, TD, Identities

SUB = Subscriber((FRONTEND,), "spiffe")


@pytest.fixture(scope="module")
def ids() -> Identities:
    return Identities.create()


def resolver(snapshot: IdentitySnapshot) -> SecretResolver:
    return SecretResolver(snapshot, Naming(TD))


def names(response: object) -> list[str]:
    return [r.name for r in response.resources]  # type: ignore[attr-defined]


# -- state of the world --------------------------------------------------------------------------------------


def test_sotw_first_request_gets_full_state_even_with_old_version(ids: Identities) -> None:
    res = resolver(ids.snapshot())
    stream = SotwStream(SUB)
    step = stream.on_request(["default", "ROOTCA"], "some-old-version", "old-nonce", None, res)
    assert step.response is not None
    assert names(step.response) == ["default", "ROOTCA"]
    assert step.response.nonce == "1"
    pairs = [(r.name, r.version) for r in step.response.resources]
    assert step.response.version_info == state_version(pairs)


def test_sotw_ack_then_nothing_until_content_changes(ids: Identities) -> None:
    snap = ids.snapshot()
    stream = SotwStream(SUB)
    first = stream.on_request(["default", "ALL"], "", "", None, resolver(snap)).response
    assert first is not None
    ack = stream.on_request(["default", "ALL"], first.version_info, first.nonce, None, resolver(snap))
    assert ack.response is None
    assert ack.events == (Ack(first.nonce, tuple((r.name, r.version) for r in first.resources)),)
    assert stream.acked == {r.name: r.version for r in first.resources}
    # Same content in a new snapshot object: nothing to push.
    same = IdentitySnapshot(snap.svids, snap.bundles, snap.version + 100)
    assert stream.on_snapshot(resolver(same)).response is None
    # Rotation of the SVIDs: only the certificate is pushed, not the unchanged bundles.
    rotated = stream.on_snapshot(resolver(ids.snapshot()))
    assert rotated.response is not None
    assert names(rotated.response) == ["default"]
    assert rotated.response.nonce == "2"
    assert rotated.response.version_info != first.version_info


def test_sotw_stale_nonce_is_ignored(ids: Identities) -> None:
    stream = SotwStream(SUB)
    res = resolver(ids.snapshot())
    first = stream.on_request(["default"], "", "", None, res).response
    assert first is not None
    second = stream.on_snapshot(resolver(ids.snapshot())).response
    assert second is not None
    # Envoy's ACK of the first response crosses our second one: stale, ignored even with new names.
    step = stream.on_request(["default", "ROOTCA"], first.version_info, first.nonce, None, res)
    assert step.response is None
    assert step.events == (StaleNonce(first.nonce, second.nonce),)
    assert stream.names == ("default",)


def test_sotw_nack_is_reported_once_and_not_re_pushed(ids: Identities) -> None:
    stream = SotwStream(SUB)
    res = resolver(ids.snapshot())
    first = stream.on_request(["default"], "", "", None, res).response
    assert first is not None
    step = stream.on_request(["default"], "", first.nonce, (13, "bad key"), res)
    assert step.response is None
    assert step.events == (
        Nack(first.nonce, ((first.resources[0].name, first.resources[0].version),), 13, "bad key"),
    )
    # Envoy repeats its request (same nonce, still failing): nothing is re-sent, nothing reported twice.
    again = stream.on_request(["default"], "", first.nonce, (13, "bad key"), res)
    assert again.response is None
    assert again.events == ()
    # A snapshot with the same bad content: still no push. New content: pushed.
    assert (
        stream.on_snapshot(resolver(IdentitySnapshot(res.snapshot.svids, res.snapshot.bundles, 999))).response
        is None
    )
    assert stream.on_snapshot(resolver(ids.snapshot())).response is not None


def test_sotw_subscription_changes(ids: Identities) -> None:
    stream = SotwStream(SUB)
    res = resolver(ids.snapshot())
    first = stream.on_request(["default"], "", "", None, res).response
    assert first is not None
    # Adding a name sends only the new one.
    added = stream.on_request(["default", "ROOTCA"], first.version_info, first.nonce, None, res).response
    assert added is not None
    assert names(added) == ["ROOTCA"]
    # Dropping one sends nothing; re-adding it later sends it again (Envoy dropped its copy).
    dropped = stream.on_request(["default"], added.version_info, added.nonce, None, res)
    assert dropped.response is None
    readded = stream.on_request(["default", "ROOTCA"], added.version_info, added.nonce, None, res).response
    assert readded is not None
    assert names(readded) == ["ROOTCA"]


def test_sotw_unknown_names_reported_once_others_served(ids: Identities) -> None:
    stream = SotwStream(SUB)
    res = resolver(ids.snapshot())
    step = stream.on_request(["default", str(BACKEND), "bogus"], "", "", None, res)
    assert step.response is not None
    assert names(step.response) == ["default"]
    reasons = {e.rejection.name: e.rejection.reason for e in step.events if isinstance(e, Rejected)}
    assert reasons == {str(BACKEND): "not_entitled", "bogus": "unknown"}
    ack = stream.on_request(["default", str(BACKEND), "bogus"], "", step.response.nonce, None, res)
    assert not [e for e in ack.events if isinstance(e, Rejected)]


def test_sotw_name_that_appears_later_is_pushed(ids: Identities) -> None:
    stream = SotwStream(SUB)
    no_fed = resolver(ids.snapshot(federated=False))
    step = stream.on_request(["spiffe://partner.test"], "", "", None, no_fed)
    assert step.response is None
    assert isinstance(step.events[0], Rejected)
    later = stream.on_snapshot(resolver(ids.snapshot()))
    assert later.response is not None
    assert names(later.response) == ["spiffe://partner.test"]


def test_sotw_wildcard(ids: Identities) -> None:
    stream = SotwStream(Subscriber((FRONTEND,), "spiffe"))
    step = stream.on_request([], "", "", None, resolver(ids.snapshot()))
    assert step.response is not None
    assert names(step.response) == [str(FRONTEND), "spiffe://example.org", "spiffe://partner.test"]


def test_sotw_nothing_before_first_request(ids: Identities) -> None:
    assert SotwStream(SUB).on_snapshot(resolver(ids.snapshot())).response is None


# -- delta ---------------------------------------------------------------------------------------------------


def test_delta_subscribe_ack_rotate(ids: Identities) -> None:
    stream = DeltaStream(SUB)
    res = resolver(ids.snapshot())
    first = stream.on_request(["default", "ALL"], [], {}, "", None, res).response
    assert first is not None
    assert names(first) == ["default", "ALL"]
    ack = stream.on_request([], [], {}, first.nonce, None, res)
    assert ack.response is None
    assert isinstance(ack.events[0], Ack)
    rotated = stream.on_snapshot(resolver(ids.snapshot())).response
    assert rotated is not None
    assert names(rotated) == ["default"]
    assert rotated.removed == ()


def test_delta_initial_versions_skip_unchanged(ids: Identities) -> None:
    res = resolver(ids.snapshot())
    current = {n: res.resolve(n, SUB).version for n in ("default", "ROOTCA")}  # type: ignore[union-attr]
    stream = DeltaStream(SUB)
    step = stream.on_request(
        ["default", "ROOTCA"], [], {"default": current["default"], "ROOTCA": "stale"}, "", None, res
    )
    assert step.response is not None
    assert names(step.response) == ["ROOTCA"]


def test_delta_reconnect_with_everything_current_sends_nothing(ids: Identities) -> None:
    res = resolver(ids.snapshot())
    current = {n: res.resolve(n, SUB).version for n in ("default", "ROOTCA")}  # type: ignore[union-attr]
    step = DeltaStream(SUB).on_request(["default", "ROOTCA"], [], current, "", None, res)
    assert step.response is None


def test_delta_unsubscribe_and_removed(ids: Identities) -> None:
    stream = DeltaStream(SUB)
    res = resolver(ids.snapshot())
    first = stream.on_request(["default", "spiffe://partner.test"], [], {}, "", None, res).response
    assert first is not None
    stream.on_request([], [], {}, first.nonce, None, res)
    # The federated bundle disappears: removed_resources.
    no_fed = resolver(ids.snapshot(federated=False))
    gone = stream.on_snapshot(no_fed)
    assert gone.response is not None
    assert gone.response.removed == ("spiffe://partner.test",)
    assert Removed("spiffe://partner.test") in gone.events
    # Unsubscribe: nothing sent; re-subscribe: sent again.
    assert stream.on_request([], ["default"], {}, gone.response.nonce, None, no_fed).response is None
    back = stream.on_request(["default"], [], {}, "", None, no_fed).response
    assert back is not None
    assert names(back) == ["default"]


def test_delta_nack_not_re_pushed_and_stale_nonce_keeps_subscriptions(ids: Identities) -> None:
    stream = DeltaStream(SUB)
    res = resolver(ids.snapshot())
    first = stream.on_request(["default"], [], {}, "", None, res).response
    assert first is not None
    nack = stream.on_request([], [], {}, first.nonce, (3, "no"), res)
    assert nack.response is None
    assert isinstance(nack.events[0], Nack)
    same = IdentitySnapshot(res.snapshot.svids, res.snapshot.bundles, 12345)
    assert stream.on_snapshot(resolver(same)).response is None
    # A stale nonce still carries a subscription delta that must be honoured.
    step = stream.on_request(["ROOTCA"], [], {}, "unknown-nonce", None, res)
    assert isinstance(step.events[0], StaleNonce)
    assert step.response is not None
    assert names(step.response) == ["ROOTCA"]


def test_delta_wildcard(ids: Identities) -> None:
    step = DeltaStream(SUB).on_request([], [], {}, "", None, resolver(ids.snapshot()))
    assert step.response is not None
    assert names(step.response) == [str(FRONTEND), "spiffe://example.org", "spiffe://partner.test"]


# -- entitlement changes and withdrawal ----------------------------------------------------------------------

BOTH = Subscriber((FRONTEND, BACKEND), "spiffe")


def test_sotw_entitlement_grant_pushes_only_the_new_name(ids: Identities) -> None:
    res = resolver(ids.snapshot())
    stream = SotwStream(SUB)
    first = stream.on_request(["default", str(BACKEND)], "", "", None, res).response
    assert first is not None
    assert names(first) == ["default"]
    stream.on_request(["default", str(BACKEND)], "", first.nonce, None, res)
    assert stream.on_entitlement(SUB, res).response is None  # unchanged: nothing
    granted = stream.on_entitlement(BOTH, res)
    assert granted.response is not None
    assert names(granted.response) == [str(BACKEND)]
    assert not granted.end_stream


def test_sotw_withdrawal_ends_the_stream(ids: Identities) -> None:
    res = resolver(ids.snapshot())
    stream = SotwStream(BOTH)
    first = stream.on_request(["default", str(BACKEND)], "", "", None, res).response
    assert first is not None
    step = stream.on_entitlement(SUB, res)
    assert step.end_stream
    assert step.response is None
    withdrawn = [e for e in step.events if isinstance(e, Withdrawn)]
    assert [(r.name, r.reason) for r in withdrawn[0].rejections] == [(str(BACKEND), "not_entitled")]
    rejected = [e for e in step.events if isinstance(e, Rejected)]
    assert rejected[0].previously_served


def test_sotw_unavailable_is_transient_not_a_withdrawal(ids: Identities) -> None:
    stream = SotwStream(SUB)
    assert stream.on_request(["default"], "", "", None, resolver(ids.snapshot())).response is not None
    # The SVID is missing from one snapshot (being re-minted): Envoy keeps its copy, the stream goes on.
    step = stream.on_snapshot(resolver(ids.snapshot(ids=())))
    assert not step.end_stream
    assert step.response is None
    assert isinstance(step.events[0], Rejected)
    assert stream.on_snapshot(resolver(ids.snapshot())).response is not None


def test_sotw_trust_domain_gone_ends_the_stream_but_not_for_all(ids: Identities) -> None:
    res = resolver(ids.snapshot())
    held = SotwStream(SUB)
    assert held.on_request(["spiffe://partner.test"], "", "", None, res).response is not None
    validator = SotwStream(SUB)
    assert validator.on_request(["ALL"], "", "", None, res).response is not None
    no_fed = resolver(ids.snapshot(federated=False))
    assert held.on_snapshot(no_fed).end_stream
    changed = validator.on_snapshot(no_fed)
    assert not changed.end_stream
    assert changed.response is not None


def test_sotw_wildcard_withdrawal(ids: Identities) -> None:
    res = resolver(ids.snapshot())
    stream = SotwStream(BOTH)
    first = stream.on_request([], "", "", None, res).response
    assert first is not None
    assert str(BACKEND) in names(first)
    assert stream.on_entitlement(SUB, res).end_stream


def test_delta_entitlement_grant_and_removal(ids: Identities) -> None:
    res = resolver(ids.snapshot())
    stream = DeltaStream(SUB)
    first = stream.on_request(["default", str(BACKEND)], [], {}, "", None, res).response
    assert first is not None
    granted = stream.on_entitlement(BOTH, res).response
    assert granted is not None
    assert names(granted) == [str(BACKEND)]
    gone = stream.on_entitlement(SUB, res)
    assert gone.response is not None
    assert gone.response.removed == (str(BACKEND),)
    assert not gone.end_stream


def test_delta_wildcard_removal(ids: Identities) -> None:
    res = resolver(ids.snapshot())
    stream = DeltaStream(BOTH)
    first = stream.on_request([], [], {}, "", None, res).response
    assert first is not None
    gone = stream.on_entitlement(SUB, res).response
    assert gone is not None
    assert gone.removed == (str(BACKEND),)
    # A wildcard SVID missing from one snapshot is transient: not removed.
    assert stream.on_snapshot(resolver(ids.snapshot(ids=()))).response is None


def test_state_version_is_order_independent() -> None:
    assert state_version([("a", "1"), ("b", "2")]) == state_version([("b", "2"), ("a", "1")])
    assert state_version([("a", "1")]) != state_version([("a", "2")])


# Hardening: size caps.
#
# Size caps of the pure SDS stream state machines (security review: a 150k-name request held the loop).


@pytest.fixture(scope="module")
def snapshot() -> IdentitySnapshot:
    return Identities.create().snapshot()


def junk(count: int, prefix: str = "n") -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def test_resource_name_count_is_capped_with_a_message_naming_the_field() -> None:
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
