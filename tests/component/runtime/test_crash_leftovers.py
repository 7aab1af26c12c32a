"""What a kill -9 leaves behind -- the peer-credential front's private inner-socket directory -- is cleaned
at the next start, and nothing else is: not a live instance's directory, not a symlink's target, not a file
svidgate did not make.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from svidgate.config import load_config
from svidgate.peercred import INNER_DIR_PREFIX, make_inner_dir, remove_stale_inner_dir
from svidgate.runtime.listeners import ListenerError
from svidgate.runtime.server import Server
from tests.support.runtime import APP, Layout, ServeProcess, fetch_x509_svid, workload_channel
from tests.support.server import running_server
from tests.support.tempdir import short_dir


def _inner_dir(process: ServeProcess) -> Path:
    (directory,) = {Path(event["inner"]).parent for event in process.events("peercred.listening")}
    return directory


def _socket_in(directory: Path, name: str = "x.sock") -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(directory / name))
    sock.close()


async def test_kill_9_leftover_is_removed_at_the_next_start(layout: Layout) -> None:
    first = ServeProcess(layout.config)
    second = ServeProcess(layout.config)
    try:
        await first.start()
        leftover = _inner_dir(first)
        assert leftover.name.startswith(INNER_DIR_PREFIX)
        first.signal(signal.SIGKILL)
        assert await first.wait_exit(timeout=10) == -signal.SIGKILL
        assert leftover.is_dir(), "kill -9 ran no cleanup, so its inner directory is still there"

        await second.start()
        assert not leftover.exists()
        assert second.events("peercred.stale_inner_dir_removed")[0]["path"] == str(leftover)
        current = _inner_dir(second)
        assert current != leftover
        assert current.is_dir()
        # The new instance serves through its fronts.
        async with workload_channel(layout) as channel:
            response = await fetch_x509_svid(channel)
        assert [svid.spiffe_id for svid in response.svids] == [APP]
        second.signal(signal.SIGTERM)
        assert await second.wait_exit(timeout=15) == 0
        assert not current.exists()
    finally:
        first.kill()
        second.kill()


async def test_a_live_instances_inner_directory_is_never_touched(layout: Layout) -> None:
    async with running_server(layout.config) as live:
        inner = live._listeners._inner
        assert inner is not None
        before = sorted(os.listdir(inner))
        # Another state_dir (its lock is free), the same sockets: the socket lock is what refuses it.
        other = layout.root / "other.yaml"
        other.write_text(layout.config.read_text().replace(str(layout.state), str(layout.root / "state2")))
        second = Server(load_config(other), other, registry=CollectorRegistry())
        with pytest.raises(ListenerError, match="another svidgate instance"):
            await second.start()
        assert sorted(os.listdir(inner)) == before


def test_only_a_private_directory_of_sockets_is_removed(tmp_path: Path) -> None:
    # What svidgate made: removed.
    ours = make_inner_dir()
    _socket_in(ours, "grpc-1.sock")
    _socket_in(ours, "peer-0123456789abcdef")
    assert remove_stale_inner_dir(ours)
    assert not ours.exists()
    # Already gone: nothing to do.
    assert not remove_stale_inner_dir(ours)

    # A directory holding anything but sockets: kept, and so is its content.
    mixed = make_inner_dir()
    try:
        _socket_in(mixed)
        (mixed / "notes.txt").write_text("not svidgate's")
        assert not remove_stale_inner_dir(mixed)
        assert (mixed / "notes.txt").exists()
        assert (mixed / "x.sock").exists()
    finally:
        (mixed / "notes.txt").unlink()
        (mixed / "x.sock").unlink()
        mixed.rmdir()

    # A directory that is not private: kept.
    loose = make_inner_dir()
    try:
        os.chmod(loose, 0o755)  # noqa: S103 -- the point of the test
        assert not remove_stale_inner_dir(loose)
        assert loose.is_dir()
    finally:
        loose.rmdir()


def test_a_symlink_is_never_followed(tmp_path: Path) -> None:
    with short_dir() as root:
        target = root / "precious"
        target.mkdir(mode=0o700)
        _socket_in(target)
        link = root / f"{INNER_DIR_PREFIX}planted"
        link.symlink_to(target)
        assert not remove_stale_inner_dir(link)
        assert (target / "x.sock").exists()
        assert link.is_symlink()
        # A name svidgate never gives its directories: kept even when it looks like one.
        foreign = root / "svidgate-0"
        foreign.mkdir(mode=0o700)
        assert not remove_stale_inner_dir(foreign)
        assert foreign.is_dir()
