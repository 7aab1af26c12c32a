"""No listener choice turns a deny into an allow (issue 9, item 1), through real Envoys.

One `svidgate serve` (in-process) with every gRPC listener the contract has: ``listen.check`` (TCP, the
threaded server), ``listen.grpc`` on a unix socket and on TCP, and ``listen.workload_api``. One Envoy per
listener, each from envoy-examples/ext-authz/envoy.yaml with ``failure_mode_allow: true`` -- the setting
under which an UNIMPLEMENTED (what ``listen.grpc`` answered for Check while ``listen.check`` was set) becomes
an allow.
Every Envoy must answer: no token 401, a bad token 401, a valid JWT-SVID 200.

The Envoy in front of the Workload API socket sends the Workload Endpoint's ``workload.spiffe.io: true`` with
its Checks, as every client of that socket must (without it svidgate denies; see
tests/component/runtime/test_listeners.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from svidgate.runtime.server import Server
from tests.support.checkserver import echo_backend
from tests.support.envoy import EXAMPLES, EnvoyProcess, shipped_config
from tests.support.runtime import AUDIENCE, Layout, fetch_jwt_svid, workload_channel, write_config
from tests.support.server import running_server
from tests.support.tempdir import short_dir

pytestmark = pytest.mark.e2e


def envoy_config(bound: str, backend_port: int, *, workload_api: bool) -> str:
    """The ext-authz example's Envoy, fail-open on RPC errors, with its svidgate cluster at `bound`."""
    target: int | str = (
        bound[len("unix://") :] if bound.startswith("unix://") else int(bound.rsplit(":", 1)[1])
    )
    data: dict[str, Any] = yaml.safe_load(
        shipped_config(
            EXAMPLES / "ext-authz" / "envoy.yaml",
            listeners={"ingress": 0},
            clusters={"backend": backend_port, "svidgate": target},
            everywhere={"failure_mode_allow": True},
        )
    )
    if workload_api:
        (listener,) = data["static_resources"]["listeners"]
        (manager,) = listener["filter_chains"][0]["filters"]
        (ext_authz,) = [f for f in manager["typed_config"]["http_filters"] if "ext_authz" in f["name"]]
        grpc_service = ext_authz["typed_config"]["grpc_service"]
        grpc_service["initial_metadata"] = [{"key": "workload.spiffe.io", "value": "true"}]
    return str(yaml.safe_dump(data))


def http_get(port: int, token: str | None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/orders")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


async def test_envoy_with_failure_mode_allow_is_denied_on_every_listener(tmp_path: Path) -> None:
    with short_dir("lfc-") as root, echo_backend() as backend:
        layout = Layout(root)
        write_config(layout)
        async with running_server(layout.config) as server:
            await _each_listener_fails_closed(server, layout, backend.server_address[1], tmp_path)


async def _each_listener_fails_closed(
    server: Server, layout: Layout, backend_port: int, tmp_path: Path
) -> None:
    async with workload_channel(layout) as channel:
        token = await fetch_jwt_svid(channel, AUDIENCE)
    listeners = [(name, bound) for name, bound in server.listeners if name != "http"]
    assert sorted(name for name, _ in listeners) == ["check", "grpc", "grpc", "workload_api"]
    async with contextlib.AsyncExitStack() as stack:
        envoys: dict[str, EnvoyProcess] = {}
        for i, (name, bound) in enumerate(listeners):
            config = envoy_config(bound, backend_port, workload_api=name == "workload_api")
            envoy = EnvoyProcess(config, tmp_path, name=f"{name}-{i}")
            await stack.enter_async_context(envoy)
            envoys[f"{name} {bound}"] = envoy
        for listener, envoy in envoys.items():
            port = envoy.listener_port("ingress")
            results = await asyncio.gather(
                asyncio.to_thread(http_get, port, None),
                asyncio.to_thread(http_get, port, token[:-4] + "AAAA"),
                asyncio.to_thread(http_get, port, token),
            )
            assert results == [401, 401, 200], f"{listener}: no token, bad token, valid token"
