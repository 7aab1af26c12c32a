"""A short private temporary directory, for tests that put unix sockets in it.

Unix socket paths are limited to 108 bytes (107 usable), and pytest's `tmp_path` can be longer than that.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def short_dir(prefix: str = "sg-") -> Iterator[Path]:
    """A private directory (mode 0700) with a short path under /tmp, removed afterwards.

    Args:
        prefix: the start of the directory's name, so a leftover says which tests made it.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
