"""Reload at its edges: YAML the parser chokes on, an empty file, any exception during one reload (logged,
counted as rejected, the last good configuration and the file watcher both survive), and changes that need a
restart named by key path.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc.aio
import pytest

import svidgate.runtime.reload
from svidgate.runtime.server import Server
from tests.support.runtime import (
    APP,
    AUDIENCE,
    WEB,
    Layout,
    ServeProcess,
    check,
    fetch_jwt_svid,
    scrape,
    value,
    workload_channel,
    write_config,
)
from tests.support.server import running_server

DEEP_YAML = "authz: " + "[" * 600 + "]" * 600 + "\n"


async def _app_token(layout: Layout) -> str:
    async with workload_channel(layout) as channel:
        return await fetch_jwt_svid(channel, AUDIENCE)


async def _allowed(target: str, token: str) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        return bool((await check(channel, "/api/x", token)).status.code == 0)


async def test_sighup_with_unreadable_or_empty_yaml_is_rejected_and_counted(layout: Layout) -> None:
    write_config(layout, allow=[WEB, APP])
    process = ServeProcess(layout.config)
    try:
        await process.start()
        token = await _app_token(layout)
        target = process.grpc_tcp_target()
        assert await _allowed(target, token)

        layout.config.write_text(DEEP_YAML)
        process.signal(signal.SIGHUP)
        rejected = await process.wait_for_event("config.reload_rejected", timeout=10)
        assert rejected["trigger"] == "SIGHUP"
        assert rejected["error"] == f"{layout.config}: line 1, column 71: nested deeper than 64 levels"
        assert "traceback" not in rejected

        # An empty (truncated) file would have dropped every policy and workload.
        layout.config.write_text("")
        process.signal(signal.SIGHUP)
        rejected = await process.wait_for_event("config.reload_rejected", after=1, timeout=10)
        assert "holds no YAML document" in rejected["error"]
        assert await _allowed(target, token)  # the app's workload and the policy allowing it are still there

        samples = await scrape(process.http_port())
        assert value(samples, "svidgate_config_reloads_total", result="rejected") == 2
        assert not process.events("config.reloaded")

        write_config(layout, allow=[WEB])
        process.signal(signal.SIGHUP)
        await process.wait_for_event("config.reloaded", timeout=10)
        assert not await _allowed(target, token)
        process.signal(signal.SIGTERM)
        assert await process.wait_exit(timeout=15) == 0
    finally:
        process.kill()


async def test_the_file_watcher_survives_yaml_it_cannot_read(layout: Layout) -> None:
    write_config(layout, allow=[WEB, APP], poll="100ms")
    process = ServeProcess(layout.config)
    try:
        await process.start()
        layout.config.write_text(DEEP_YAML)
        rejected = await process.wait_for_event("config.reload_rejected", timeout=10)
        assert rejected["trigger"] == "file_change"
        # A later valid edit still applies: the watcher kept going.
        write_config(layout, allow=[WEB], poll="100ms")
        reloaded = await process.wait_for_event("config.reloaded", timeout=10)
        assert reloaded["trigger"] == "file_change"
        token = await _app_token(layout)
        assert not await _allowed(process.grpc_tcp_target(), token)
    finally:
        process.kill()


# -- in-process: any exception, not only bad input ---------------------------------------------------


def _reloads(server: Server, result: str) -> float:
    return server.registry.get_sample_value("svidgate_config_reloads_total", {"result": result}) or 0.0


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == name]


async def test_any_exception_in_a_reload_is_rejected_and_the_watcher_keeps_going(
    layout: Layout, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="svidgate")
    write_config(layout, allow=[WEB, APP], poll="50ms")
    real_load = svidgate.runtime.reload.load_config
    real_stat_key = svidgate.runtime.reload.stat_key
    failures = {"load": 1, "stat": 1}

    def broken_load(path: Path) -> Any:
        if failures["load"]:
            failures["load"] -= 1
            raise RuntimeError("a bug in one reload")
        return real_load(path)

    def broken_stat_key(path: Path) -> Any:
        if failures["stat"]:
            failures["stat"] -= 1
            raise OSError("a bug while watching")
        return real_stat_key(path)

    async with running_server(layout.config) as server:
        monkeypatch.setattr(svidgate.runtime.reload, "load_config", broken_load)
        write_config(layout, allow=[WEB], poll="50ms")
        await _until(lambda: _reloads(server, "rejected") == 1)
        (rejected,) = _events(caplog, "config.reload_rejected")
        assert rejected.fields["error"] == "RuntimeError: a bug in one reload"  # type: ignore[attr-defined]
        assert rejected.exc_info is not None  # a bug: its traceback is logged (in the one JSON line)

        # The watcher itself fails once, logs it, and goes on.
        monkeypatch.setattr(svidgate.runtime.reload, "stat_key", broken_stat_key)
        await _until(lambda: bool(_events(caplog, "config.watch_failed")))
        write_config(layout, allow=[APP], poll="50ms")
        await _until(lambda: _reloads(server, "applied") == 1)
        assert [str(rule) for rule in server.config.authz.policies[1].allow] == [APP]


async def test_a_reload_names_each_key_that_needs_a_restart(
    layout: Layout, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(layout.config) as server:
        caplog.set_level(logging.INFO, logger="svidgate")
        write_config(
            layout,
            allow=[WEB, APP],
            drain_grace="7s",
            extra="ca: {x509_svid_ttl: 30m}\nsds: {validation: trusted_ca}\n",
        )
        caplog.clear()
        assert await server.reload("SIGHUP")
        config_events = [r for r in caplog.records if r.getMessage().startswith("config.")]
        assert [r.getMessage() for r in config_events] == ["config.reload_partial"], "one line"
        (partial,) = config_events
        assert partial.getMessage() == "config.reload_partial"
        assert partial.levelno == logging.WARNING
        assert partial.fields["restart_required"] == [  # type: ignore[attr-defined]
            "ca.x509_svid_ttl",
            "sds.validation",
            "server.drain_grace",
        ]
        assert _reloads(server, "restart_required") == 1
        # The live part applied; the rest waits for the next start.
        assert [str(rule) for rule in server.config.authz.policies[1].allow] == [WEB, APP]
        assert server.config.ca.x509_svid_ttl == 3600
        assert server.config.sds.validation == "spiffe"
