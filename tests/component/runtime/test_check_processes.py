"""Check worker processes (`server.check_processes`): real worker processes, real gRPC, the real channel.

Each test drives `CheckProcesses` (what `svidgate serve` runs) and checks behaviour through the shared Check
port: a worker denies until it has state, applies a reload and a bundle without a key (each confirmed by every
worker before the Checks), and a worker killed with SIGKILL is replaced while Check keeps being answered.
Tokens are minted for the real clock: the workers validate with it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest

from svidgate.config import Address, parse_config
from svidgate.identity.bundle import Bundle
from svidgate.metrics import Metrics
from svidgate.runtime.checkprocs import CheckProcesses, MergedRegistry, WorkerCounts, _receive
from tests.component.extauthz.test_servicer import request
from tests.support.ca import TestCA
from tests.support.runtime import (
    APP,
    AUDIENCE,
    Layout,
    ServeProcess,
    check_request,
    fetch_jwt_svid,
    scrape,
    value,
    workload_channel,
    write_config,
)
from tests.support.server import running_server

CONFIG = """
trust_domain: example.org
authz:
  policies:
    - name: api
      audiences: [api]
      allow: [{allowed}]
"""
WEB = "spiffe://example.org/web"  # the same as runtime_support's WEB


def authz(allowed: str = WEB) -> object:
    return parse_config(CONFIG.format(allowed=allowed), "test").authz


def check(port: int, token: str) -> tuple[int, str]:
    """One Check on a new connection (a local subchannel pool: SO_REUSEPORT picks a worker per connection)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        response = stub.Check(request(token, host="api.example.org"), timeout=10)
    if response.WhichOneof("http_response") == "ok_response":
        return 200, ""
    return response.denied_response.status.code, response.status.message


async def checks(port: int, token: str, count: int = 8) -> set[int]:
    return {(await asyncio.to_thread(check, port, token))[0] for _ in range(count)}


@pytest.fixture
async def workers() -> AsyncIterator[tuple[CheckProcesses, TestCA]]:
    ca = TestCA("example.org")
    procs = CheckProcesses(2, Address("tcp", host="127.0.0.1", port=0), 2, authz(), "logfmt", "warning")  # type: ignore[arg-type]
    procs.publish_bundles(ca.bundles())
    await procs.start()
    try:
        yield procs, ca
    finally:
        await procs.stop(grace=1.0)


async def test_workers_serve_the_policy_and_apply_a_reload(workers: tuple[CheckProcesses, TestCA]) -> None:
    procs, ca = workers
    assert len(procs.pids()) == 2
    token = ca.create_jwt_svid(WEB, ["api"], now=time.time())
    assert await checks(procs.port, token) == {200}

    generation = procs.publish_authz(authz("spiffe://example.org/other"))  # type: ignore[arg-type]
    await asyncio.wait_for(procs.wait_applied(generation, 0), 30)
    assert await checks(procs.port, token) == {403}


async def test_workers_apply_a_key_removal(workers: tuple[CheckProcesses, TestCA]) -> None:
    procs, ca = workers
    token = ca.create_jwt_svid(WEB, ["api"], now=time.time())
    assert await checks(procs.port, token) == {200}

    bundle = ca.bundle()
    without_key = Bundle(trust_domain=ca.trust_domain, x509_authorities=bundle.x509_authorities)
    generation = procs.publish_bundles({ca.trust_domain: without_key})
    await asyncio.wait_for(procs.wait_applied(0, generation), 30)
    assert await checks(procs.port, token) == {401}


async def test_a_killed_worker_comes_back_and_check_keeps_being_answered(
    workers: tuple[CheckProcesses, TestCA],
) -> None:
    procs, ca = workers
    token = ca.create_jwt_svid(WEB, ["api"], now=time.time())
    victim = procs.pids()[0]
    os.kill(victim, signal.SIGKILL)
    await asyncio.wait_for(procs.wait_exited(victim), 30)
    # The port stays open: the surviving worker answers every new connection meanwhile.
    assert await checks(procs.port, token) == {200}
    replacement = await asyncio.wait_for(procs.wait_restarted(victim), 30)
    assert replacement != victim
    assert replacement in procs.pids()
    assert len(procs.pids()) == 2
    assert await checks(procs.port, token) == {200}


async def test_workers_are_counted_on_the_main_metrics(workers: tuple[CheckProcesses, TestCA]) -> None:
    procs, ca = workers
    token = ca.create_jwt_svid(WEB, ["api"], now=time.time())
    await checks(procs.port, token, count=6)
    registry = CollectorRegistry()
    Metrics(registry, process_metrics=False)
    merged = MergedRegistry(registry, procs.counts)

    def allowed() -> float:
        for line in generate_latest(merged).decode().splitlines():  # type: ignore[arg-type]
            if line.startswith("svidgate_authz_decisions_total{") and 'result="allow"' in line:
                return float(line.split()[-1])
        return 0.0

    await procs.refresh_counts(timeout=30)
    assert allowed() == 6


def test_worker_counts_keep_a_restarted_workers_last_report() -> None:
    counts = WorkerCounts()
    key = ("svidgate_authz_decisions_total", (("result", "allow"),))
    counts.report(0, [(key[0], key[1], 5.0)])
    counts.report(1, [(key[0], key[1], 2.0)])
    counts.retire(0)
    counts.report(0, [(key[0], key[1], 1.0)])
    assert counts.totals()[key] == 8.0


def test_a_worker_without_state_denies() -> None:
    # Fail closed: before the main process's first messages a worker answers denials, never UNIMPLEMENTED.
    ca = TestCA("example.org")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    main_end, worker_end = socket.socketpair()
    worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "svidgate.runtime.checkprocs", "--channel-fd", str(worker_end.fileno())),
            *("--address", f"127.0.0.1:{port}", "--threads", "1", "--cache-size", "10"),
            *("--log-level", "warning", "--parent-pid", str(os.getpid())),
        ],
        pass_fds=(worker_end.fileno(),),
    )
    worker_end.close()
    try:
        main_end.settimeout(30)
        assert _receive(main_end) == ("applied", "serving", 1)
        token = ca.create_jwt_svid(WEB, ["api"], now=time.time())
        code, _ = check(port, token)
        assert code in (401, 403)
    finally:
        main_end.close()  # the channel's EOF ends the worker
        worker.wait(30)


async def test_serve_with_check_processes(layout: Layout) -> None:
    # The whole server: Check on listen.check from two worker processes, a reload confirmed by both before
    # reload() returns, the workers' Checks on the one /metrics, and workers gone with the server.
    write_config(layout, allow=[APP], extra="  check_processes: 2\n")
    async with running_server(layout.config) as server:
        (address,) = server.bound("check")
        port = int(address.rsplit(":", 1)[1])
        async with workload_channel(layout) as channel:
            token = await fetch_jwt_svid(channel, AUDIENCE)
        assert await served(port, token) == {0}
        pids = server._check_procs.pids()  # type: ignore[union-attr]
        assert len(pids) == 2
        assert server.readiness() == (True, "ok")  # both workers confirmed the policy and the bundles

        write_config(layout, allow=[WEB], extra="  check_processes: 2\n")
        assert await server.reload("SIGHUP")
        assert await served(port, token) == {7}  # PERMISSION_DENIED: the reload is in force in both

        (http,) = server.bound("http")
        samples = await scrape(int(http.rsplit(":", 1)[1]))
        labels = {"policy": "api", "dry_run": "false"}
        allowed = value(samples, "svidgate_authz_decisions_total", **labels, result="allow", reason="allowed")
        denied = value(
            samples, "svidgate_authz_decisions_total", **labels, result="deny", reason="subject_not_allowed"
        )
        assert (allowed, denied) == (8, 8)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def served(port: int, token: str, count: int = 8) -> set[int]:
    """The gRPC status codes of `count` Checks, each on a new connection."""

    def one() -> int:
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            response = stub.Check(check_request("/api/x", token), timeout=10)
        return int(response.status.code)

    return {await asyncio.to_thread(one) for _ in range(count)}


async def test_workers_die_with_the_main_process(layout: Layout) -> None:
    write_config(layout, extra="  check_processes: 2\n")
    process = ServeProcess(layout.config)
    try:
        await process.start()
        assert process.proc is not None
        started = process.events("check_process.started")
        workers = [event["pid"] for event in started]
        assert len(workers) == 2
        process.signal(signal.SIGKILL)  # no drain, no goodbye: PR_SET_PDEATHSIG ends the workers
        await process.wait_exit(30)
        deadline = time.monotonic() + 30
        for pid in workers:
            while _alive(pid):  # polled: the kernel ends it at once, init reaps it
                assert time.monotonic() < deadline, f"worker {pid} outlived the main process"
                await asyncio.sleep(0.05)
    finally:
        process.kill()


def _alive(pid: int) -> bool:
    """`pid` still runs (not reaped, not a zombie); False once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
