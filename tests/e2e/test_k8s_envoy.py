"""Per-pod identity end to end: real Envoys (and a py-spiffe client) in kubelet-named pod cgroups.

svidgate runs whole and in-process from a config file with one templated workload,
``spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}`` for pods in namespace ``shop``, attesting callers through
`FakeKubelet` (HTTPS, bearer token, `kubelet_ca_file`). Each Envoy is started inside its pod's container
cgroup (the shell that execs it joins the cgroup first), so svidgate sees exactly what it sees on a node.
"""

from __future__ import annotations

import asyncio
import http.server
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from svidgate.runtime.server import Server
from tests.support.envoy import EXAMPLES, EnvoyProcess, shipped_config
from tests.support.k8s import V1_HIERARCHY, FakeKubelet, PodCgroup, pod, skip_reason_for, v2_hierarchy
from tests.support.server import running_server
from tests.support.tempdir import short_dir

V2 = v2_hierarchy()
_SKIP = skip_reason_for(V1_HIERARCHY) or skip_reason_for(V2)
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

TEMPLATES = EXAMPLES / "sds-mtls"
FRONTEND = "spiffe://example.org/ns/shop/sa/frontend"
BACKEND = "spiffe://example.org/ns/shop/sa/backend"
WORKER = "spiffe://example.org/ns/shop/sa/worker"


class _Backend(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.seen.append(self.headers.get("x-forwarded-client-cert", ""))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class Node:
    """A node: svidgate (whole, from a config file), the kubelet, the run directory."""

    def __init__(self, directory: Path, kubelet: FakeKubelet, server: Server) -> None:
        self.dir = directory
        self.kubelet = kubelet
        self.server = server
        self.sds_socket = directory / "sds.sock"
        self.workload_socket = directory / "workload.sock"

    def sample(self, name: str, **labels: str) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    with short_dir("sgk8s-") as directory, FakeKubelet(directory) as kubelet:
        config = directory / "svidgate.yaml"
        config.write_text(
            f"""\
trust_domain: example.org
state_dir: {directory}/state
listen:
  grpc: [unix://{directory}/sds.sock]
  workload_api: unix://{directory}/workload.sock
  check: tcp://127.0.0.1:0
  http: null
workloads:
  - spiffe_id: "spiffe://example.org/ns/{{k8s:ns}}/sa/{{k8s:sa}}"
    selectors: [k8s:ns:shop]
server:
  config_poll_interval: 0s
{kubelet.config(attest_timeout="1500ms")}"""
        )
        async with running_server(config) as server:
            yield Node(directory, kubelet, server)


def envoy_in(
    node: Node,
    example: str,
    name: str,
    tmp_path: Path,
    procs: Path | None,
    *,
    listener: str,
    upstream: tuple[str, int],
    peer: str,
    sds_api: str,
) -> EnvoyProcess:
    """A shipped sds-mtls Envoy pointed at this node's svidgate, in the cgroup of `procs` (None: no pod).

    Args:
        listener: the Envoy's listener (moved to a free port).
        upstream: (cluster, port) of what it forwards to.
        peer: the one SPIFFE ID it accepts from the other side (exact URI SAN match).
    """
    config = shipped_config(
        TEMPLATES / example,
        listeners={listener: 0},
        clusters={"svidgate": node.sds_socket, upstream[0]: upstream[1]},
        everywhere={
            "api_type": sds_api,
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer}}],
        },
    )
    return EnvoyProcess(config, tmp_path, name=name, cgroup_procs=procs, component_log_level="secret:debug")


def get(port: int) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        return response.status, response.read().decode()


def xfcc_uri(xfcc: str) -> str:
    return dict(part.split("=", 1) for part in xfcc.split(";") if "=" in part).get("URI", "")


def has_certificate(envoy: EnvoyProcess) -> bool:
    return any(entry.get("cert_chain") for entry in envoy.admin_json("/certs").get("certificates", []))


async def eventually(
    predicate: object,
    timeout: float = 15.0,
    what: str = "condition",
    detail: Callable[[], object] | None = None,
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (predicate() if callable(predicate) else predicate):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {detail() if detail else ''}")
        await asyncio.sleep(0.05)


async def test_each_pod_gets_its_templated_identity_over_sds_and_the_workload_api(
    node: Node, backend: http.server.ThreadingHTTPServer, tmp_path: Path
) -> None:
    seen: list[str] = backend.seen  # type: ignore[attr-defined]
    assert V2 is not None
    # Both cgroup drivers, on cgroup v1 and v2.
    with (
        PodCgroup(V1_HIERARCHY, "cgroupfs", "containerd") as backend_pod,
        PodCgroup(V2, "systemd", "containerd") as frontend_pod,
        PodCgroup(V1_HIERARCHY, "systemd", "cri-o") as worker_pod,
    ):
        node.kubelet.pods = [
            pod(
                uid=backend_pod.pod_uid,
                name="backend-1",
                namespace="shop",
                service_account="backend",
                containers=[("envoy", "envoy:1", backend_pod.container_id)],
            ),
            pod(
                uid=frontend_pod.pod_uid,
                name="frontend-1",
                namespace="shop",
                service_account="frontend",
                containers=[("envoy", "envoy:1", frontend_pod.container_id)],
            ),
            pod(
                uid=worker_pod.pod_uid,
                name="worker-1",
                namespace="shop",
                service_account="worker",
                containers=[("app", "worker:1", worker_pod.container_id)],
                runtime="cri-o",
            ),
        ]
        server_envoy = envoy_in(
            node,
            "server-envoy.yaml",
            "backend",
            tmp_path,
            backend_pod.procs,
            listener="ingress",
            upstream=("backend", backend.server_address[1]),
            peer=FRONTEND,
            sds_api="GRPC",
        )
        async with server_envoy as server:
            client_envoy = envoy_in(
                node,
                "client-envoy.yaml",
                "frontend",
                tmp_path,
                frontend_pod.procs,
                listener="egress",
                upstream=("server", server.listener_port("ingress")),
                peer=BACKEND,
                sds_api="DELTA_GRPC",
            )
            async with client_envoy as client:
                # The client Envoy verified the server's SVID as BACKEND (exact SAN match), and the server
                # Envoy let the client in as FRONTEND: both SVIDs were minted from the template.
                status, body = await asyncio.to_thread(get, client.listener_port("egress"))
                assert (status, body) == (200, "ok")
                assert xfcc_uri(seen[-1]) == FRONTEND

        # py-spiffe, a real Workload API client, in a third pod (CRI-O, systemd driver).
        fetch = (
            "from spiffe import WorkloadApiClient\n"
            f"with WorkloadApiClient(socket_path='unix://{node.workload_socket}', default_timeout=10) as c:\n"
            "    print(c.fetch_x509_svid().spiffe_id)\n"
        )
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            'echo $$ > "$0" && exec "$@"',
            str(worker_pod.procs),
            sys.executable,
            "-c",
            fetch,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert out.decode().strip() == WORKER
    assert node.sample("svidgate_k8s_attestations_total", result="attested") >= 3
    assert node.sample("svidgate_sds_nacks_total", resource="default") == 0


async def test_callers_of_another_namespace_an_unlisted_pod_or_no_pod_get_no_svid(
    node: Node, tmp_path: Path
) -> None:
    with PodCgroup(V1_HIERARCHY) as other_ns, PodCgroup(V1_HIERARCHY) as unlisted:
        node.kubelet.pods = [
            pod(
                uid=other_ns.pod_uid,
                name="intruder",
                namespace="other",
                service_account="frontend",
                containers=[("envoy", "envoy:1", other_ns.container_id)],
            ),
        ]
        envoys = [
            envoy_in(
                node,
                "server-envoy.yaml",
                name,
                tmp_path,
                procs,
                listener="ingress",
                upstream=("backend", 1),
                peer=FRONTEND,
                sds_api="GRPC",
            )
            for name, procs in (("other-ns", other_ns.procs), ("unlisted", unlisted.procs), ("no-pod", None))
        ]
        try:
            for envoy in envoys:
                envoy.start()
            await eventually(
                lambda: (
                    node.sample("svidgate_k8s_attestations_total", result="attested") == 1
                    and node.sample("svidgate_k8s_attestations_total", result="pod_not_listed") == 1
                    and node.sample("svidgate_k8s_attestations_total", result="not_in_pod") == 1
                    and node.sample("svidgate_sds_streams", api="sotw") >= 3
                ),
                what="three attempts attested (one pod of another namespace, one unlisted, one outside pods)",
                detail=lambda: {
                    (m.name, tuple(m.labels.values())): m.value
                    for f in node.server.metrics.registry.collect()
                    for m in f.samples
                    if "k8s" in m.name or "sds_streams" in m.name
                },
            )
            for envoy in envoys:
                await eventually(lambda e=envoy: e._poll_ready() or e._admin is not None, what="admin")
                assert not await asyncio.to_thread(has_certificate, envoy), envoy.name
            # Bundles were served (a caller with no identity may still verify others); no SVID was.
            assert node.sample("svidgate_sds_pushes_total", resource="default") == 0
        finally:
            for envoy in envoys:
                await asyncio.to_thread(envoy.stop)
