"""A default `svidgate serve` hands its SVID to no other local user (issue 9, item 2).

The old default also served SDS on tcp://127.0.0.1:8081 and its one workload is selected by ``any``, so any
local user (tried as uid 65534) fetched the SVID and its private key. Now SDS and the Workload API are on unix
sockets only (0660 in a 0700 directory) and the TCP listener answers Check alone.

The server is the real `svidgate serve` with no configuration, in its own network namespace (so its fixed
default ports 8081/8082 never meet another test's), with its runtime directory under a world-traversable
directory: only svidgate's own modes keep the other user out. uid 65534 then tries every listener the server
reports; svidgate's own user, as a control, does get the SVID over the unix socket.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc.aio
import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from tests.support.runtime import SdsStream, ServeProcess, sds_request

NOBODY = 65534
DEFAULT_ID = "spiffe://svidgate.local/default"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="needs root, unshare and nsenter (network namespace, another uid)",
)

#: Run as uid 65534 inside the server's network namespace: try to obtain the default SVID from each listener.
#: Prints one JSON object {listener: what happened}.
PROBE = r"""
import json, socket, sys
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from svidgate._gen import workload_pb2, workload_pb2_grpc

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
result = {}
for listener in json.loads(sys.argv[1]):
    name, address = listener.split(" ", 1)
    if address.startswith("unix://"):
        path = address[len("unix://"):]
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            target = "unix:" + path
        except OSError as exc:
            result[listener] = f"connect: {type(exc).__name__}"
            continue
        finally:
            probe.close()
    elif name == "http":
        continue  # /metrics, /healthz, /readyz: no gRPC, no keys
    else:
        target = address[len("tcp://"):]
    outcome = []
    with grpc.insecure_channel(target) as channel:
        request = discovery_pb2.DiscoveryRequest(
            node=base_pb2.Node(id="intruder", cluster="intruder"), resource_names=["default"], type_url=SECRET
        )
        try:
            sds = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
            response = next(sds.StreamSecrets(iter([request]), timeout=5))
            keys = any(b"PRIVATE KEY" in r.value for r in response.resources)
            outcome.append("sds: SVID" if keys else "sds: no key")
        except grpc.RpcError as err:
            outcome.append(f"sds: {err.code().name}")
        try:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            header = [("workload.spiffe.io", "true")]
            response = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=header, timeout=5))
            outcome.append("workload_api: SVID" if response.svids else "workload_api: none")
        except grpc.RpcError as err:
            outcome.append(f"workload_api: {err.code().name}")
    result[listener] = ", ".join(outcome)
print(json.dumps(result))
"""


@pytest.fixture
def world_readable_home() -> Iterator[Path]:
    """HOME, XDG_RUNTIME_DIR and XDG_STATE_HOME under a directory every user may enter (mode 0755)."""
    root = Path(tempfile.mkdtemp(prefix="sgd-", dir="/tmp"))
    try:
        for name in ("", "home", "run", "state"):
            (root / name).mkdir(exist_ok=True)
            os.chmod(root / name, 0o755)  # noqa: S103 -- the point: only svidgate's own modes protect it
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_no_other_local_user_obtains_the_default_svid(world_readable_home: Path) -> None:
    root = world_readable_home
    env = {k: v for k, v in os.environ.items() if k != "SVIDGATE_CONFIG"}
    env.update(HOME=str(root / "home"), XDG_RUNTIME_DIR=str(root / "run"), XDG_STATE_HOME=str(root / "state"))
    netns = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "svidgate-netns"]
    server = ServeProcess(None, prefix=netns, env=env)
    try:
        await server.start()
        (started,) = server.events("server.started")
        listeners: list[str] = started["listeners"]
        run = root / "run" / "svidgate"
        assert server.proc is not None
        result = subprocess.run(
            [
                "nsenter",
                f"--net=/proc/{server.proc.pid}/ns/net",
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                sys.executable,
                "-c",
                PROBE,
                json.dumps(listeners),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            cwd="/",
        )
        assert json.loads(result.stdout) == {
            "check tcp://127.0.0.1:8081": "sds: UNIMPLEMENTED, workload_api: UNIMPLEMENTED",
            f"grpc unix://{run}/svidgate.sock": "connect: PermissionError",
            f"workload_api unix://{run}/workload.sock": "connect: PermissionError",
        }
        # The contract's defaults, as bound.
        assert sorted(listeners) == [
            "check tcp://127.0.0.1:8081",
            f"grpc unix://{run}/svidgate.sock",
            "http 127.0.0.1:8082",
            f"workload_api unix://{run}/workload.sock",
        ]
        # Control: svidgate's own user is entitled (selector `any`) and receives it over the unix socket.
        async with grpc.aio.insecure_channel(f"unix:{run}/svidgate.sock") as channel:
            stream = SdsStream(channel)
            stream.send(sds_request("envoy", ["default"]))
            response = await stream.receive()
            stream.call.cancel()
        (secret,) = [secret_pb2.Secret.FromString(r.value) for r in response.resources]
        assert secret.name == "default"
        assert b"PRIVATE KEY" in secret.tls_certificate.private_key.inline_bytes
    finally:
        server.kill()
