"""Writing files the way the programs that feed svidgate do."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


def replace_file(path: Path, data: bytes) -> None:
    """Replace a file the way real writers do (new inode, renamed into place), so watchers see the change."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def read_only_directory(path: Path) -> Iterator[None]:
    """Make `path` unwritable for this process, even as root, for the duration of the block.

    As root, chmod stops nothing: the directory is bind-mounted onto itself and remounted read-only (writes
    fail with EROFS, as on a file system remounted read-only after an error). As another user, mode 0500 does.
    """
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o500)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)
