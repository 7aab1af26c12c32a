"""Time as an injectable dependency, so that expiry and rotation are tested without sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable

#: A clock returns the current time as seconds since the Unix epoch.
Clock = Callable[[], float]

system_clock: Clock = time.time


class FakeClock:
    """A clock that moves only when told to; for tests and offline tools."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
