"""Shared pytest configuration. Kept minimal on purpose: fixtures live next to the tests that use them, and
the test CA is an ordinary import (`tests.support.ca.TestCA`)."""

from __future__ import annotations

from hypothesis import settings

# Key generation and signing make single examples slow on a loaded CI machine; a deadline only adds flakes.
settings.register_profile("svidgate", deadline=None)
settings.load_profile("svidgate")
