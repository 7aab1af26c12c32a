"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from svidgate.identity.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at a fixed instant (2027-01-15): tests advance it, never wait for time to pass."""
    return FakeClock(1_800_000_000.0)
