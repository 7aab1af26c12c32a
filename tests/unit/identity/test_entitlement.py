"""Entitlement: which SPIFFE IDs a caller may receive, from `workloads[].selectors`."""

from __future__ import annotations

import pytest

from svidgate.config import Selector, Workload
from svidgate.identity.entitlement import CallerInfo, entitled_ids
from svidgate.identity.spiffe_id import SpiffeId

A = SpiffeId.parse("spiffe://example.org/a")
B = SpiffeId.parse("spiffe://example.org/b")
C = SpiffeId.parse("spiffe://example.org/c")


def wl(spiffe_id: SpiffeId, *selectors: str) -> Workload:
    return Workload(spiffe_id, tuple(Selector.parse(s) for s in selectors))


WORKLOADS = (
    wl(A, "envoy:node_id:web"),
    wl(B, "envoy:node_id:web", "unix:uid:1000"),
    wl(C, "envoy:cluster:ops", "unix:gid:50"),
    wl(A, "unix:uid:0"),  # a second way to A: never listed twice
)


@pytest.mark.parametrize(
    ("caller", "expected"),
    [
        (CallerInfo(), ()),
        (CallerInfo(node_id="web"), (A,)),
        (CallerInfo(node_id="web", uid=1000), (A, B)),
        (CallerInfo(uid=1000), ()),  # all selectors must match
        (CallerInfo(cluster="ops", gid=50), (C,)),
        (CallerInfo(cluster="ops", gid=51), ()),
        (CallerInfo(node_id="web", uid=0), (A,)),  # deduplicated, config order
        (CallerInfo(node_id="WEB"), ()),  # exact, case-sensitive
        (CallerInfo(node_id="web", cluster="ops", uid=1000, gid=50), (A, B, C)),
    ],
)
def test_entitled_ids(caller: CallerInfo, expected: tuple[SpiffeId, ...]) -> None:
    assert entitled_ids(WORKLOADS, caller) == expected


def test_unknown_attributes_never_match() -> None:
    # On TCP there are no peer credentials: a unix selector must not match "None".
    assert entitled_ids((wl(A, "unix:uid:0"),), CallerInfo(node_id="x")) == ()


def test_any_selector_only_when_configured() -> None:
    assert entitled_ids((wl(A, "any"),), CallerInfo()) == (A,)
    assert entitled_ids((wl(A, "envoy:node_id:x"),), CallerInfo()) == ()


def test_with_node_keeps_peer_credentials_and_treats_empty_as_unknown() -> None:
    caller = CallerInfo(uid=1, gid=2, pid=3).with_node("web", "")
    assert caller == CallerInfo(node_id="web", cluster=None, uid=1, gid=2, pid=3)
    assert caller.describe() == {"node_id": "web", "uid": 1, "gid": 2, "pid": 3}
