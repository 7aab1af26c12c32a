"""Unix sockets of a whole server: modes, cleanup, a stale socket from a crash, a second instance."""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from svidgate.config import load_config
from svidgate.runtime.listeners import ListenerError, UnixSocketClaim
from svidgate.runtime.server import Server
from tests.support.runtime import Layout
from tests.support.server import running_server


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _crashed_socket(path: Path) -> None:
    """What a killed process leaves: a socket file nobody accepts on."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


async def test_sockets_have_safe_modes_and_are_removed_on_exit(layout: Layout) -> None:
    async with running_server(layout.config):
        assert stat.S_ISSOCK(os.lstat(layout.sds_socket).st_mode)
        assert _mode(layout.sds_socket) == 0o660
        assert _mode(layout.workload_socket) == 0o660
        # svidgate created the directory, so it is private.
        assert _mode(layout.run) == 0o700
    assert not layout.sds_socket.exists()
    assert not layout.workload_socket.exists()


async def test_existing_directory_keeps_its_mode(layout: Layout) -> None:
    layout.run.mkdir(mode=0o755)
    os.chmod(layout.run, 0o755)  # noqa: S103 -- the operator's choice, which svidgate must keep
    async with running_server(layout.config):
        assert _mode(layout.run) == 0o755
        assert _mode(layout.sds_socket) == 0o660


async def test_stale_socket_from_a_crash_does_not_block_the_start(layout: Layout) -> None:
    _crashed_socket(layout.sds_socket)
    _crashed_socket(layout.workload_socket)
    async with running_server(layout.config):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(layout.sds_socket))  # the new server accepts
        probe.close()


async def test_second_instance_on_the_same_socket_is_refused(layout: Layout) -> None:
    async with running_server(layout.config):
        # Its own state_dir, so that the socket's lock (not the state_dir's) is what refuses it.
        config = dataclasses.replace(load_config(layout.config), state_dir=layout.root / "state-2")
        second = Server(config, layout.config, registry=CollectorRegistry())
        with pytest.raises(ListenerError, match="another svidgate instance is already serving"):
            await second.start()
        # The refused instance removed nothing of the first one's.
        assert layout.sds_socket.exists()
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(layout.sds_socket))
        probe.close()


def test_a_live_socket_of_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        claim = UnixSocketClaim(path)
        with pytest.raises(ListenerError, match="another process is accepting connections"):
            claim.claim()
        assert path.exists()
        # The failed claim released its lock: a later claim gets the same answer, not a lock error.
        with pytest.raises(ListenerError, match="another process is accepting connections"):
            UnixSocketClaim(path).claim()
    finally:
        listener.close()


def test_a_regular_file_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    path.write_text("not a socket")
    with pytest.raises(ListenerError, match="not a socket"):
        UnixSocketClaim(path).claim()
    assert path.read_text() == "not a socket"


def test_release_leaves_a_successors_socket_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    claim = UnixSocketClaim(path, 0o600)
    claim.claim()
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.bind(str(path))
    claim.bound()
    assert _mode(path) == 0o600
    first.close()
    # Someone replaced the socket (a new instance after ours was declared dead); renamed into place, as a
    # careful server does, so the two files exist at once and cannot share an inode number.
    _crashed_socket(tmp_path / "new.sock")
    os.rename(tmp_path / "new.sock", path)
    claim.release()
    assert path.exists()


async def test_failed_start_cleans_up_what_it_bound(layout: Layout) -> None:
    # The Workload API path is a regular file: the start fails after the SDS socket was bound.
    layout.run.mkdir(mode=0o700)
    layout.workload_socket.write_text("x")
    server = Server(load_config(layout.config), layout.config, registry=CollectorRegistry())
    with pytest.raises(ListenerError, match="not a socket"):
        await server.start()
    assert not layout.sds_socket.exists()
    # ... and the next start (once the path is fixed) works.
    layout.workload_socket.unlink()
    async with running_server(layout.config):
        assert layout.sds_socket.exists()


def test_a_socket_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    os.chmod(directory, 0o777)  # noqa: S103 -- the unsafe directory under test
    with pytest.raises(ListenerError, match="writable by every user"):
        UnixSocketClaim(directory / "s.sock").claim()
    assert not (directory / "s.sock.lock").exists()


def test_a_socket_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a directory owned by another user")
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    os.chown(directory, 4343, 4343)
    with pytest.raises(ListenerError, match="owned by uid 4343"):
        UnixSocketClaim(directory / "s.sock").claim()


def test_a_symlinked_lock_file_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "s.sock.lock").symlink_to(target)
    with pytest.raises(ListenerError, match="cannot open lock file"):
        UnixSocketClaim(tmp_path / "s.sock").claim()
    assert not target.exists()
