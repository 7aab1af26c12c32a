"""Fixtures shared by the runtime's component tests (whole servers from a `Layout`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.runtime import Layout, write_config
from tests.support.tempdir import short_dir


@pytest.fixture
def layout() -> Iterator[Layout]:
    """A short private directory holding the default test config (`write_config(layout)`), removed after."""
    with short_dir() as root:
        layout = Layout(root)
        write_config(layout)
        yield layout
