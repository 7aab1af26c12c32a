"""Whole-server helpers (component and e2e tests): a config on disk (`Layout`), a whole server as a
subprocess, and small real clients (SDS stream, Check, Workload API, HTTP scrape). A whole server in-process:
`tests.support.server.running_server(layout.config)`.

Every server listens on 127.0.0.1 port 0 and on unix sockets in a short private directory (unix socket paths
are limited to 108 bytes, and pytest's tmp_path can be longer than that).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2
from prometheus_client.parser import text_string_to_metric_families

from svidgate._gen import workload_pb2, workload_pb2_grpc
from svidgate.peercred import remove_stale_inner_dir
from svidgate.runtime.server import Server

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
TRUST_DOMAIN = "example.org"
WEB = "spiffe://example.org/web"
BACKEND = "spiffe://example.org/backend"
APP = "spiffe://example.org/app"
AUDIENCE = "backend"
WORKLOAD_HEADER = (("workload.spiffe.io", "true"),)


@dataclass
class Layout:
    """Where one test server keeps its files."""

    root: Path
    config: Path = field(init=False)
    state: Path = field(init=False)
    run: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config = self.root / "svidgate.yaml"
        self.state = self.root / "state"
        self.run = self.root / "run"

    @property
    def sds_socket(self) -> Path:
        return self.run / "sds.sock"

    @property
    def workload_socket(self) -> Path:
        return self.run / "workload.sock"


def config_text(
    layout: Layout,
    *,
    allow: Sequence[str] = ("spiffe://example.org/*",),
    http_port: int = 0,
    drain_grace: str = "5s",
    poll: str = "0s",
    log_level: str = "info",
    extra: str = "",
    check: str = "tcp://127.0.0.1:0",
) -> str:
    """A complete config: SDS on a unix socket and TCP, Check's own listener, the Workload API, HTTP, one
    validate policy."""
    uid = os.getuid()
    allow_yaml = json.dumps(list(allow))
    return f"""\
trust_domain: {TRUST_DOMAIN}
state_dir: {layout.state}
listen:
  grpc: [unix://{layout.sds_socket}, tcp://127.0.0.1:0]
  check: {check}
  workload_api: unix://{layout.workload_socket}
  http: 127.0.0.1:{http_port}
workloads:
  - spiffe_id: {WEB}
    selectors: [envoy:node_id:web]
  - spiffe_id: {BACKEND}
    selectors: [envoy:node_id:backend]
  - spiffe_id: {APP}
    selectors: [unix:uid:{uid}]
authz:
  policies:
    - name: health
      match: {{path_exact: /healthz}}
      audiences: [{AUDIENCE}]
      allow: ["*"]
      require_token: false
    - name: api
      match: {{path_prefix: /api}}
      audiences: [{AUDIENCE}]
      allow: {allow_yaml}
log:
  level: {log_level}
server:
  drain_grace: {drain_grace}
  config_poll_interval: {poll}
{extra}"""


def write_config(layout: Layout, **kwargs: Any) -> Path:
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.config.write_text(config_text(layout, **kwargs))
    return layout.config


def tcp_grpc_target(server: Server) -> str:
    (address,) = [a for a in server.bound("grpc") if a.startswith("tcp://")]
    return address.removeprefix("tcp://")


# -- clients ------------------------------------------------------------------------------------------------


def sds_request(
    node_id: str,
    names: Sequence[str],
    *,
    version: str = "",
    nonce: str = "",
    error: str | None = None,
) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(
        node=base_pb2.Node(id=node_id, cluster="test"),
        resource_names=list(names),
        type_url=SECRET_TYPE_URL,
        version_info=version,
        response_nonce=nonce,
    )
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


class SdsStream:
    """A real SDS (state of the world) stream: send requests, read responses."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        self.call = stub.StreamSecrets(self._iterate())

    async def _iterate(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            request = await self._requests.get()
            if request is None:
                return
            yield request

    def send(self, request: discovery_pb2.DiscoveryRequest) -> None:
        self._requests.put_nowait(request)

    def close_requests(self) -> None:
        self._requests.put_nowait(None)

    async def receive(self, timeout: float = 10.0) -> discovery_pb2.DiscoveryResponse:
        response = await asyncio.wait_for(self.call.read(), timeout)
        assert response is not grpc.aio.EOF, "the SDS stream ended"
        return response


def check_request(
    path: str, token: str | None = None, *, host: str = "backend.local", method: str = "GET"
) -> external_auth_pb2.CheckRequest:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    id="req-1", method=method, host=host, path=path, headers=headers, protocol="HTTP/1.1"
                )
            )
        )
    )


async def check(
    channel: grpc.aio.Channel, path: str, token: str | None = None
) -> external_auth_pb2.CheckResponse:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    return await stub.Check(check_request(path, token), timeout=10)


def workload_channel(layout: Layout) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"unix:{layout.workload_socket}")


async def fetch_jwt_svid(channel: grpc.aio.Channel, audience: str, spiffe_id: str = "") -> str:
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    response = await stub.FetchJWTSVID(
        workload_pb2.JWTSVIDRequest(audience=[audience], spiffe_id=spiffe_id),
        metadata=WORKLOAD_HEADER,
        timeout=10,
    )
    return str(response.svids[0].svid)


async def fetch_x509_svid(channel: grpc.aio.Channel) -> Any:
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=WORKLOAD_HEADER, timeout=10)
    response = await call.read()
    call.cancel()
    return response


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    """A blocking HTTP request (run it with `asyncio.to_thread` from async tests)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 -- http://127.0.0.1 only
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed into {(sample name, sorted labels): value}."""
    status, body, _ = await asyncio.to_thread(http_get, port, "/metrics")
    assert status == 200
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not scraped; have: {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


# -- a server as a subprocess -------------------------------------------------------------------------------


class ServeProcess:
    """`svidgate serve --config FILE` as a child process, its JSON log lines collected from stderr."""

    def __init__(
        self, config: Path | None, *, prefix: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> None:
        """Args:
        config: the config file (None: the embedded default).
        prefix: a command that runs svidgate (e.g. ``unshare --net``).
        env: the environment (default: this process's).
        """
        self.config = config
        self.prefix = tuple(prefix)
        self.env = env
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, wait_for: str | None = "server.started") -> None:
        """Start the process; wait for the log event `wait_for` (None: return at once)."""
        env = dict(os.environ if self.env is None else self.env, PYTHONUNBUFFERED="1")
        config = () if self.config is None else ("--config", str(self.config))
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "svidgate", "serve", *config],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._reader = asyncio.ensure_future(self._read())
        if wait_for is not None:
            await self.wait_for_event(wait_for, timeout=30)

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        stream = self.proc.stderr
        while True:
            line = await asyncio.to_thread(stream.readline)
            if not line:
                return
            text = line.decode(errors="replace").rstrip("\n")
            self.raw.append(text)
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(text))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def wait_for_event(self, name: str, *, after: int = 0, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) > after:
                return found[after]
            if self.proc is not None and self.proc.poll() is not None and self._reader is not None:
                await asyncio.wait_for(asyncio.shield(self._reader), 5)
                found = self.events(name)
                if len(found) > after:
                    return found[after]
                raise AssertionError(
                    f"svidgate exited ({self.proc.returncode}) before {name}:\n" + self.log()
                )
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {name} event within {timeout}s:\n" + self.log())

    def log(self) -> str:
        return "\n".join(self.raw[-40:])

    def grpc_tcp_target(self) -> str:
        started = self.events("grpc.listening")
        (address,) = [
            e["address"]
            for e in started
            if e["listener"] == "grpc" and str(e["address"]).startswith("tcp://")
        ]
        return str(address).removeprefix("tcp://")

    def http_port(self) -> int:
        return int(self.events("http.listening")[0]["port"])

    def signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        code = await asyncio.to_thread(self.proc.wait, timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code

    def kill(self) -> None:
        """SIGKILL the process if it still runs, and remove what that leaves: its inner-socket directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
            for event in self.events("peercred.listening"):
                remove_stale_inner_dir(Path(str(event["inner"])).parent)
