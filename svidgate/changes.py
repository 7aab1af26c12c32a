"""One wake-up mechanism for every long-lived stream (SDS and the Workload API alike).

Two things change under an open stream: the identity snapshot (a source publishes to its `SnapshotFeed`) and
what a reload changes (the workloads that entitle callers). `ChangeSignal` turns both into one event: a
watcher takes `current()` *before* it looks at the state and awaits it after, so a change made after the look
always wakes it, and nothing made before the look is missed either. Snapshot publications are relayed into
the signal by one task while any watcher runs, so waking 10k streams costs one `asyncio.Event.set()`: no task
or future per stream per wait.

One signal may be shared by several services (the runtime gives SDS and the Workload API the same one), so
that a reload wakes every stream once. Must be used from the event loop.

This module imports only `svidgate.identity.snapshot`.
"""

from __future__ import annotations

import asyncio

from svidgate.identity.snapshot import SnapshotFeed

__all__ = ["ChangeSignal"]


class ChangeSignal:
    """Woken (set, then replaced) whenever the snapshot of `feed` or the reloadable state changes.

    Args:
        feed: the identity source's feed; its publications wake every watcher.
    """

    def __init__(self, feed: SnapshotFeed) -> None:
        self.feed = feed
        self._changed = asyncio.Event()
        self._relay: asyncio.Task[None] | None = None
        self._watchers = 0

    def current(self) -> asyncio.Event:
        """The event the next change sets: take it before looking at the state, await it after."""
        return self._changed

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
