"""`ChangeSignal`: the rules in force and the one wake-up of every stream (SDS, Workload API)."""

from __future__ import annotations

import asyncio

from svidgate.changes import ChangeSignal
from svidgate.config import Selector, Workload
from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
from svidgate.identity.spiffe_id import SpiffeId

WEB = Workload(SpiffeId.parse("spiffe://example.org/web"), (Selector("any"),))
API = Workload(SpiffeId.parse("spiffe://example.org/api"), (Selector("any"),))


def test_swap_rules_replaces_the_value_whole_and_wakes_once() -> None:
    signal = ChangeSignal(SnapshotFeed(IdentitySnapshot()), (WEB,))
    first = signal.rules
    wake = signal.current()
    assert signal.swap_rules([WEB, API]) is True
    assert wake.is_set()
    assert signal.rules is not first
    assert signal.rules.workloads == (WEB, API)
    assert first.workloads == (WEB,)  # what a stream decided with is never mutated
    assert not signal.current().is_set()


def test_swapping_in_the_rules_in_force_changes_nothing() -> None:
    signal = ChangeSignal(SnapshotFeed(IdentitySnapshot()), (WEB,))
    rules, wake = signal.rules, signal.current()
    assert signal.swap_rules((WEB,)) is False
    assert signal.rules is rules
    assert not wake.is_set()


async def test_a_snapshot_published_while_watched_wakes_the_watchers() -> None:
    feed = SnapshotFeed(IdentitySnapshot(version=1))
    signal = ChangeSignal(feed)
    signal.watch_started()
    try:
        wake = signal.current()  # taken before looking
        feed.publish(IdentitySnapshot(version=2))
        await asyncio.wait_for(wake.wait(), 5)
    finally:
        signal.watch_stopped()


async def test_a_snapshot_published_before_the_relay_first_runs_is_not_missed() -> None:
    feed = SnapshotFeed(IdentitySnapshot(version=1))
    signal = ChangeSignal(feed)
    wake = signal.current()
    signal.watch_started()  # the relay's baseline is version 1, read now
    feed.publish(IdentitySnapshot(version=2))  # before the relay task has run once
    try:
        await asyncio.wait_for(wake.wait(), 5)
    finally:
        signal.watch_stopped()
