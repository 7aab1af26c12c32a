"""What changes under open streams, and the one wake-up mechanism for every one of them.

Two things change under an open stream: the identity snapshot (a source publishes to its `SnapshotFeed`) and
what a reload changes (the workloads that entitle callers). `ChangeSignal` turns both into one event: a
watcher takes `current()` *before* it looks at the state and awaits it after, so a change made after the look
always wakes it, and nothing made before the look is missed either. Snapshot publications are relayed into
the signal by one task while any watcher runs, so waking 10k streams costs one `asyncio.Event.set()`: no task
or future per stream per wait.

The signal also holds the `Rules` in force: what a reload changes for entitlement decisions, one immutable
value swapped once (`swap_rules`). The runtime gives SDS, the Workload API and token injection the same
signal, so a reload is one reference assignment and one wake-up, and no service keeps a copy of
``workloads[]`` of its own. Waking must be done from the event loop; `rules` may be read from any thread (one
attribute read).

This module imports `svidgate.identity.snapshot` and the config's `Workload` type.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from svidgate.config import Workload
from svidgate.identity.snapshot import SnapshotFeed

__all__ = ["ChangeSignal", "Rules"]


@dataclass(frozen=True, slots=True, eq=False)
class Rules:
    """The entitlement rules in force (``workloads[]``). Replaced whole on a reload, never mutated: a stream
    compares the object it computed its entitlement from with the current one (identity, like a snapshot
    version)."""

    workloads: tuple[Workload, ...]


class ChangeSignal:
    """Woken (set, then replaced) whenever the snapshot of `feed` or the reloadable state changes.

    Args:
        feed: the identity source's feed; its publications wake every watcher.
        workloads: the workloads in force at start.
    """

    def __init__(self, feed: SnapshotFeed, workloads: Sequence[Workload] = ()) -> None:
        self.feed = feed
        #: The rules in force; replaced whole by `swap_rules`.
        self.rules = Rules(tuple(workloads))
        self._changed = asyncio.Event()
        self._relay: asyncio.Task[None] | None = None
        self._watchers = 0

    def current(self) -> asyncio.Event:
        """The event the next change sets: take it before looking at the state, await it after."""
        return self._changed

    def swap_rules(self, workloads: Sequence[Workload]) -> bool:
        """Put new rules in force and wake every watcher, unless `workloads` are the ones in force.

        Returns:
            True when the rules changed.
        """
        workloads = tuple(workloads)
        if workloads == self.rules.workloads:
            return False
        self.rules = Rules(workloads)
        self.wake()
        return True

    def wake(self) -> None:
        """Wake every watcher (a reload changed what they serve, or the snapshot changed)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def watch_started(self) -> None:
        """A watcher begins; the first one starts relaying snapshot publications."""
        self._watchers += 1
        if self._relay is None:
            # The baseline version is read now, not when the task first runs: a snapshot published in between
            # must still wake the watchers.
            self._relay = asyncio.create_task(self._relay_snapshots(self.feed.current().version))

    def watch_stopped(self) -> None:
        """A watcher ends; the last one stops the relay."""
        self._watchers -= 1
        if self._watchers == 0 and self._relay is not None:
            self._relay.cancel()
            self._relay = None

    async def _relay_snapshots(self, version: int) -> None:
        while True:
            version = (await self.feed.wait_newer(version)).version
            self.wake()
