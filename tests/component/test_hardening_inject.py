"""Inject mode over a real server: Check over TCP mints nothing; over the unix socket the kernel says who.

The review's inj/ repro, end to end through svidgate's own listeners: with `listen.grpc` on a unix socket and
on TCP, an inject-mode Check from TCP carried no peer credentials and received a JWT-SVID of the policy's
identity (for any audience it asked for). Also: an ambiguous request path is denied even with
`authz.default: allow`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from svidgate.identity.jwtsvid import parse_jwt_svid_insecure
from svidgate.runtime.server import Server
from tests.support.server import running_server
from tests.support.tempdir import short_dir

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
async def server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Server, Path]]:
    extra = getattr(request, "param", "")
    with short_dir("hinj-") as directory:
        config = directory / "svidgate.yaml"
        config.write_text(CONFIG.format(dir=directory, uid=os.getuid(), extra=extra))
        async with running_server(config) as running:
            yield running, directory


def check_request(
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


def tcp_target(server: Server) -> str:
    (address,) = [a for a in server.bound("grpc") if a.startswith("tcp://")]
    return address.removeprefix("tcp://")


def reason(response: Any) -> str:
    return str(response.dynamic_metadata.fields["reason"].string_value)


def injected(response: Any) -> str:
    (option,) = [h for h in response.ok_response.headers if h.header.key == "authorization"]
    return str(option.header.value).removeprefix("Bearer ")


async def test_inject_over_tcp_is_denied(server: tuple[Server, Path]) -> None:
    running, _ = server
    for extensions in ({"policy": "egress"}, {"policy": "egress", "node_id": "frontend-egress"}):
        response = await check(tcp_target(running), check_request(extensions))
        assert response.status.code != 0
        assert response.denied_response.status.code == 403
        assert reason(response) == "unverified_caller"
        assert not response.ok_response.headers


async def test_inject_over_the_unix_socket_checks_the_kernel_verified_caller(
    server: tuple[Server, Path],
) -> None:
    _, directory = server
    target = f"unix:{directory / 'svidgate.sock'}"
    ok = await check(target, check_request({"policy": "egress", "node_id": "frontend-egress"}))
    assert ok.status.code == 0, reason(ok)
    svid = parse_jwt_svid_insecure(injected(ok))
    assert (str(svid.spiffe_id), svid.audience) == (FRONTEND, ("backend",))
    # Same uid, but the workload also needs the frontend's node id.
    other = await check(target, check_request({"policy": "egress", "node_id": "backend-ingress"}))
    assert reason(other) == "not_entitled"


async def test_ambiguous_path_is_denied_despite_default_allow(server: tuple[Server, Path]) -> None:
    running, _ = server
    target = tcp_target(running)
    assert (await check(target, check_request({}, path="/public/x"))).status.code == 0  # default: allow
    for path in ("/public/..;/admin", "/a%2Fb", "/a\\b"):
        response = await check(target, check_request({}, path=path))
        assert response.status.code != 0, path
        assert response.dynamic_metadata.fields["policy"].string_value == AMBIGUOUS_REQUEST
    response = await check(target, check_request({}, host="evil.com:80@backend"))
    assert response.dynamic_metadata.fields["policy"].string_value == AMBIGUOUS_REQUEST


async def test_requested_audience_must_be_listed(server: tuple[Server, Path]) -> None:
    _, directory = server
    target = f"unix:{directory / 'svidgate.sock'}"
    extensions = {"policy": "egress", "node_id": "frontend-egress", "audience": "payments-prod"}
    response = await check(target, check_request(extensions))
    assert reason(response) == "audience_not_allowed"


@pytest.mark.parametrize("server", ["      inject_allow_unverified_callers: true\n"], indirect=True)
async def test_opt_in_allows_tcp(server: tuple[Server, Path]) -> None:
    running, _ = server
    response = await check(tcp_target(running), check_request({"policy": "egress"}))
    assert response.status.code == 0, reason(response)
