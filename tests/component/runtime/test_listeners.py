"""The listener contract of a whole server (issue 9, items 1 and 3).

- Every gRPC listener answers Check with the same decision: ``listen.check`` (threaded), ``listen.grpc``
  (unix and TCP) and ``listen.workload_api`` (which also requires the Workload Endpoint's security header, and
  refuses without it with a denial, never an RPC error). An Envoy with ``failure_mode_allow: true`` turns an
  UNIMPLEMENTED into an allow; before, ``listen.grpc`` answered Check with UNIMPLEMENTED once ``listen.check``
  was set (tests/e2e/test_listeners_fail_closed.py shows it through real Envoys).
- TCP listeners are exclusive: grpcio's default SO_REUSEPORT let a second process bind the same port and take
  part of the connections. A second `svidgate serve` on the same port or the same ``state_dir`` exits with
  one plain line saying so, and the first keeps serving.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from svidgate.identity.jwtsvid import parse_jwt_svid_insecure
from svidgate.runtime.listeners import StateDirLock, StateDirLockedError
from svidgate.runtime.server import Server
from tests.support.runtime import (
    AUDIENCE,
    WORKLOAD_HEADER,
    Layout,
    ServeProcess,
    check_request,
    config_text,
    fetch_jwt_svid,
    scrape,
    value,
    workload_channel,
)
from tests.support.server import running_server
from tests.support.tempdir import short_dir

#: svidgate.extauthz.servicer.MISSING_SECURITY_HEADER (spelled out: the test also runs against older code).
MISSING_SECURITY_HEADER = "missing_security_header"


def _target(bound: str) -> str:
    return bound.replace("tcp://", "").replace("unix://", "unix:")


def _every_grpc_listener(server: Server) -> dict[str, str]:
    """``{listener: gRPC target}`` for each gRPC address the server bound."""
    targets = {f"{name} {bound}": _target(bound) for name, bound in server.listeners if name != "http"}
    assert sorted(name.split()[0] for name in targets) == ["check", "grpc", "grpc", "workload_api"]
    return targets


async def _check(
    target: str, path: str, token: str | None, metadata: object = ()
) -> external_auth_pb2.CheckResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return await stub.Check(check_request(path, token), metadata=metadata, timeout=10)


@pytest.fixture
async def server(layout: Layout) -> AsyncIterator[Server]:
    async with running_server(layout.config) as server:
        yield server


async def test_every_grpc_listener_answers_check_with_the_same_decision(
    server: Server, layout: Layout
) -> None:
    async with workload_channel(layout) as channel:
        token = await fetch_jwt_svid(channel, AUDIENCE)
    for listener, target in _every_grpc_listener(server).items():
        # The Workload API socket wants its security header on every call, Check included.
        metadata = WORKLOAD_HEADER if listener.startswith("workload_api") else ()
        missing = await _check(target, "/api/orders", None, metadata)
        assert missing.denied_response.status.code == 401, listener
        assert missing.dynamic_metadata.fields["reason"].string_value == "missing_token", listener
        bad = await _check(target, "/api/orders", token[:-4] + "AAAA", metadata)
        assert bad.denied_response.status.code == 401, listener
        allowed = await _check(target, "/api/orders", token, metadata)
        assert allowed.status.code == 0, listener
        assert allowed.dynamic_metadata.fields["spiffe_id"].string_value == "spiffe://example.org/app", (
            listener
        )


async def test_check_on_the_workload_api_socket_without_its_header_is_a_counted_denial(
    server: Server, layout: Layout
) -> None:
    async with workload_channel(layout) as channel:
        token = await fetch_jwt_svid(channel, AUDIENCE)
    (workload_api,) = server.bound("workload_api")
    for metadata in ((), (("workload.spiffe.io", "TRUE"),)):
        # A valid token changes nothing: the call itself is refused, with a response, not an RPC error.
        response = await _check(_target(workload_api), "/api/orders", token, metadata)
        assert response.denied_response.status.code == 403
        assert response.dynamic_metadata.fields["reason"].string_value == MISSING_SECURITY_HEADER
    assert server.http_port is not None
    samples = await scrape(server.http_port)
    labels = {"policy": "", "result": "deny", "reason": MISSING_SECURITY_HEADER, "dry_run": "false"}
    assert value(samples, "svidgate_authz_decisions_total", **labels) == 2


async def test_tcp_listeners_are_exclusive(server: Server) -> None:
    # grpcio's default (SO_REUSEPORT on every listener) let any process of the same user that also sets it
    # bind svidgate's port and receive part of its connections.
    tcp = [bound for name, bound in server.listeners if name != "http" and bound.startswith("tcp://")]
    assert len(tcp) == 2  # listen.check and the TCP listen.grpc
    for bound in tcp:
        host, port = bound.removeprefix("tcp://").rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as intruder:
            intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError, match="in use") as err:
                intruder.bind((host, int(port)))
            assert err.value.errno == errno.EADDRINUSE, bound


# -- a second `svidgate serve` ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _serve_and_fail(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "svidgate", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def _plain_lines(stderr: str) -> list[str]:
    """The stderr lines that are not the structured (JSON) log."""
    return [line for line in stderr.splitlines() if line and not line.startswith("{")]


async def _still_serves(first: ServeProcess, port: int) -> None:
    assert first.proc is not None
    assert first.proc.poll() is None
    response = await _check(f"127.0.0.1:{port}", "/healthz", None)
    assert response.status.code == 0


async def test_a_second_serve_on_the_same_port_exits_with_one_line(layout: Layout) -> None:
    port = _free_port()
    layout.config.write_text(config_text(layout, check=f"tcp://127.0.0.1:{port}"))
    first = ServeProcess(layout.config)
    try:
        await first.start()
        with short_dir() as root:
            other = Layout(root)
            other.root.mkdir(exist_ok=True)
            other.config.write_text(config_text(other, check=f"tcp://127.0.0.1:{port}"))
            result = _serve_and_fail(other.config)
        assert result.returncode == 1
        assert _plain_lines(result.stderr) == [
            f"svidgate: error: listen.check: 127.0.0.1:{port}: address already in use (another process "
            "listens there: a second svidgate?); stop it or choose another address"
        ]
        assert "add_port.cc" not in result.stderr
        await _still_serves(first, port)
    finally:
        first.kill()


async def test_a_second_serve_on_the_same_state_dir_exits_with_one_line(layout: Layout) -> None:
    port = _free_port()
    layout.config.write_text(config_text(layout, check=f"tcp://127.0.0.1:{port}"))
    first = ServeProcess(layout.config)
    try:
        await first.start()
        assert first.proc is not None
        with short_dir() as root:
            other = Layout(root)
            other.config.write_text(
                config_text(other).replace(f"state_dir: {other.state}", f"state_dir: {layout.state}")
            )
            result = _serve_and_fail(other.config)
        assert result.returncode == 1
        assert _plain_lines(result.stderr) == [
            f"svidgate: error: state_dir {layout.state} is locked by another svidgate instance "
            f"(pid {first.proc.pid}); stop it first or give this one another state_dir"
        ]
        await _still_serves(first, port)
        # The lock dies with its holder, kill -9 included: the next instance may start.
        first.kill()
        lock = StateDirLock(layout.state)
        lock.acquire()
        lock.release()
    finally:
        first.kill()


def test_state_dir_lock_refuses_a_symlink_planted_at_its_path(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    state = tmp_path / "state"
    state.mkdir()
    (state / StateDirLock.FILE_NAME).symlink_to(target)
    with pytest.raises(StateDirLockedError, match="cannot open the lock file"):
        StateDirLock(state).acquire()


# Hardening: inject mode through the listeners.
#
# Inject mode over a real server: Check over TCP mints nothing; over the unix socket the kernel says who.
# The review's inj/ repro, end to end through svidgate's own listeners: with `listen.grpc` on a unix socket
# and on TCP, an inject-mode Check from TCP carried no peer credentials and received a JWT-SVID of the
# policy's identity (for any audience it asked for). Also: an ambiguous request path is denied even with
# `authz.default: allow`.

FRONTEND = "spiffe://example.org/frontend"
AMBIGUOUS_REQUEST = "svidgate/ambiguous_request"  # svidgate.extauthz.policy.AMBIGUOUS_REQUEST

CONFIG = """\
trust_domain: example.org
state_dir: {dir}/state
listen:
  grpc: [unix://{dir}/svidgate.sock, tcp://127.0.0.1:0]
  check: null
  workload_api: null
  http: null
workloads:
  - spiffe_id: spiffe://example.org/frontend
    selectors: ["unix:uid:{uid}", "envoy:node_id:frontend-egress"]
  - spiffe_id: spiffe://example.org/backend
    selectors: ["unix:uid:{uid}", "envoy:node_id:backend-ingress"]
authz:
  default: allow
  policies:
    - name: egress
      mode: inject
      match:
        context_extensions: {{policy: egress}}
      inject_spiffe_id: spiffe://example.org/frontend
      audiences: [backend]
{extra}"""


@pytest.fixture
async def inject_server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Server, Path]]:
    extra = getattr(request, "param", "")
    with short_dir("hinj-") as directory:
        config = directory / "svidgate.yaml"
        config.write_text(CONFIG.format(dir=directory, uid=os.getuid(), extra=extra))
        async with running_server(config) as running:
            yield running, directory


def inject_check_request(
    extensions: dict[str, str], path: str = "/", host: str = "backend"
) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.host, http.path = "GET", host, path
    request.attributes.context_extensions.update(extensions)
    return request


async def check(target: str, request: external_auth_pb2.CheckRequest) -> Any:
    async with grpc.aio.insecure_channel(target) as channel:
        return await external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=10)


def tcp_target(inject_server: Server) -> str:
    (address,) = [a for a in inject_server.bound("grpc") if a.startswith("tcp://")]
    return address.removeprefix("tcp://")


def reason(response: Any) -> str:
    return str(response.dynamic_metadata.fields["reason"].string_value)


def injected(response: Any) -> str:
    (option,) = [h for h in response.ok_response.headers if h.header.key == "authorization"]
    return str(option.header.value).removeprefix("Bearer ")


async def test_inject_over_tcp_is_denied(inject_server: tuple[Server, Path]) -> None:
    running, _ = inject_server
    for extensions in ({"policy": "egress"}, {"policy": "egress", "node_id": "frontend-egress"}):
        response = await check(tcp_target(running), inject_check_request(extensions))
        assert response.status.code != 0
        assert response.denied_response.status.code == 403
        assert reason(response) == "unverified_caller"
        assert not response.ok_response.headers


async def test_inject_over_the_unix_socket_checks_the_kernel_verified_caller(
    inject_server: tuple[Server, Path],
) -> None:
    _, directory = inject_server
    target = f"unix:{directory / 'svidgate.sock'}"
    ok = await check(target, inject_check_request({"policy": "egress", "node_id": "frontend-egress"}))
    assert ok.status.code == 0, reason(ok)
    svid = parse_jwt_svid_insecure(injected(ok))
    assert (str(svid.spiffe_id), svid.audience) == (FRONTEND, ("backend",))
    # Same uid, but the workload also needs the frontend's node id.
    other = await check(target, inject_check_request({"policy": "egress", "node_id": "backend-ingress"}))
    assert reason(other) == "not_entitled"


async def test_ambiguous_path_is_denied_despite_default_allow(inject_server: tuple[Server, Path]) -> None:
    running, _ = inject_server
    target = tcp_target(running)
    assert (
        await check(target, inject_check_request({}, path="/public/x"))
    ).status.code == 0  # default: allow
    for path in ("/public/..;/admin", "/a%2Fb", "/a\\b"):
        response = await check(target, inject_check_request({}, path=path))
        assert response.status.code != 0, path
        assert response.dynamic_metadata.fields["policy"].string_value == AMBIGUOUS_REQUEST
    response = await check(target, inject_check_request({}, host="evil.com:80@backend"))
    assert response.dynamic_metadata.fields["policy"].string_value == AMBIGUOUS_REQUEST


async def test_requested_audience_must_be_listed(inject_server: tuple[Server, Path]) -> None:
    _, directory = inject_server
    target = f"unix:{directory / 'svidgate.sock'}"
    extensions = {"policy": "egress", "node_id": "frontend-egress", "audience": "payments-prod"}
    response = await check(target, inject_check_request(extensions))
    assert reason(response) == "audience_not_allowed"


@pytest.mark.parametrize("inject_server", ["      inject_allow_unverified_callers: true\n"], indirect=True)
async def test_inject_over_tcp_is_allowed_when_the_policy_opts_in(inject_server: tuple[Server, Path]) -> None:
    running, _ = inject_server
    response = await check(tcp_target(running), inject_check_request({"policy": "egress"}))
    assert response.status.code == 0, reason(response)
