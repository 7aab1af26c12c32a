"""Kubernetes as the kubelet and the container runtime make it look to a node process, for real.

- `PodCgroup`: a cgroup named the way the kubelet names a pod container's (cgroupfs or systemd driver, on a
  cgroup v1 hierarchy or the v2 one), created under /sys/fs/cgroup; a process moved into it shows the
  kubelet-style path in ``/proc/<pid>/cgroup``. Removed afterwards (its processes moved back to the root).
- `FakeKubelet`: an HTTPS server on 127.0.0.1 answering ``GET /pods`` with a PodList like the kubelet's, after
  checking the bearer token; its certificate comes from a CA built in code.
- `pod()`: one PodList item.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import os
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from tests.support.ca import TestCA

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: A cgroup v1 hierarchy every kernel here has, and the v2 (unified) one.
V1_HIERARCHY = CGROUP_ROOT / "pids"
V2_HIERARCHY_CANDIDATES = (CGROUP_ROOT / "unified", CGROUP_ROOT)

RUNTIME_PREFIX = {"containerd": "cri-containerd", "cri-o": "crio", "docker": "docker"}


def v2_hierarchy() -> Path | None:
    """The mounted cgroup2 hierarchy (hybrid: /sys/fs/cgroup/unified; pure v2: /sys/fs/cgroup)."""
    for path in V2_HIERARCHY_CANDIDATES:
        if (path / "cgroup.controllers").exists():
            return path
    return None


def cgroup_skip_reason(hierarchy: Path | None) -> str | None:
    """Why pod cgroups cannot be created under `hierarchy` here, or None when they can."""
    if hierarchy is None or not (hierarchy / "cgroup.procs").exists():
        return f"no writable cgroup hierarchy at {hierarchy}"
    probe = hierarchy / f"svidgate-probe-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"cannot create cgroups under {hierarchy}: {exc.strerror}"
    probe.rmdir()
    return None


def new_pod_uid() -> str:
    return str(uuid.uuid4())


def new_container_id() -> str:
    return secrets.token_hex(32)


@dataclass
class PodCgroup:
    """A pod container's cgroup, kubelet-style. Use as a context manager.

    Args:
        hierarchy: the cgroup mount (`V1_HIERARCHY` or `v2_hierarchy()`).
        driver: ``cgroupfs`` (``/kubepods/besteffort/pod<uid>/<id>``) or ``systemd``
            (``/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/<rt>-<id>.scope``).
        runtime: ``containerd``, ``cri-o`` or ``docker`` (the systemd scope's prefix).
    """

    hierarchy: Path
    driver: str = "cgroupfs"
    runtime: str = "containerd"
    pod_uid: str = field(default_factory=new_pod_uid)
    container_id: str = field(default_factory=new_container_id)
    # A unique top so that concurrent tests (and other worktrees' tests) never share a directory.
    top: str = field(default_factory=lambda: f"kubepods-t{secrets.token_hex(3)}")
    _created: list[Path] = field(default_factory=list)

    @property
    def relative(self) -> str:
        if self.driver == "systemd":
            uid = self.pod_uid.replace("-", "_")
            return (
                f"{self.top}.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/"
                f"{RUNTIME_PREFIX[self.runtime]}-{self.container_id}.scope"
            )
        return f"{self.top}/besteffort/pod{self.pod_uid}/{self.container_id}"

    @property
    def path(self) -> Path:
        return self.hierarchy / self.relative

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def __enter__(self) -> PodCgroup:
        current = self.hierarchy
        for part in self.relative.split("/"):
            current = current / part
            current.mkdir()
            self._created.append(current)
        return self

    def add(self, pid: int) -> None:
        self.procs.write_text(str(pid))

    def __exit__(self, *exc: object) -> None:
        root_procs = self.hierarchy / "cgroup.procs"
        for directory in reversed(self._created):
            for _ in range(50):
                with contextlib.suppress(OSError):
                    for pid in (directory / "cgroup.procs").read_text().split():
                        with contextlib.suppress(OSError):
                            root_procs.write_text(pid)
                try:
                    directory.rmdir()
                    break
                except OSError as err:
                    if err.errno == errno.ENOENT:
                        break
                    time.sleep(0.02)  # an exiting process leaves its cgroup a moment after it is reaped


def pod(
    *,
    uid: str,
    name: str,
    namespace: str = "default",
    service_account: str = "default",
    node: str = "node-1",
    labels: dict[str, str] | None = None,
    containers: Sequence[tuple[str, str, str]] = (),
    init_containers: Sequence[tuple[str, str, str]] = (),
    runtime: str = "containerd",
) -> dict[str, Any]:
    """A PodList item as the kubelet writes it; containers are ``(name, image, container id)``."""

    def statuses(items: Sequence[tuple[str, str, str]]) -> list[dict[str, Any]]:
        return [
            {
                "name": n,
                "image": image,
                "imageID": f"{image.split(':')[0]}@sha256:{'ab' * 32}",
                "containerID": f"{runtime}://{cid}",
                "ready": True,
            }
            for n, image, cid in items
        ]

    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "labels": labels or {},
        },
        "spec": {
            "serviceAccountName": service_account,
            "nodeName": node,
            "containers": [{"name": n, "image": image} for n, image, _ in containers],
            "initContainers": [{"name": n, "image": image} for n, image, _ in init_containers],
        },
        "status": {
            "phase": "Running",
            "containerStatuses": statuses(containers),
            "initContainerStatuses": statuses(init_containers),
        },
    }


class _KubeletHandler(http.server.BaseHTTPRequestHandler):
    server: _KubeletServer

    def do_GET(self) -> None:
        kubelet = self.server.kubelet
        kubelet.requests += 1
        if self.headers.get("Authorization") != f"Bearer {kubelet.token}":
            self._answer(401, b"Unauthorized")
            return
        if self.path != "/pods":
            self._answer(404, b"not found")
            return
        kubelet.release.wait(10)
        body = json.dumps({"kind": "PodList", "apiVersion": "v1", "items": list(kubelet.pods)}).encode()
        self._answer(200, body)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _KubeletServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    kubelet: FakeKubelet


class FakeKubelet:
    """The kubelet's ``GET /pods`` over HTTPS on 127.0.0.1 (certificate for ``localhost``, from a CA built
    here). Use as a context manager; files go to `directory`.

    Attributes:
        pods: the PodList items served (replace or append at any time).
        token: the bearer token it accepts (written to `token_file`).
        ca_file: the PEM CA that verifies it (`kubernetes.kubelet_ca_file`).
        requests: how many requests it answered.
        release: cleared to hold answers (a slow kubelet) until set again.
    """

    def __init__(self, directory: Path) -> None:
        self.pods: list[dict[str, Any]] = []
        self.token = secrets.token_urlsafe(24)
        self.requests = 0
        self.release = threading.Event()
        self.release.set()
        now = time.time()  # the TLS stack checks validity against the real clock
        ca = TestCA("kubelet.test", not_before=now - 3600, not_after=now + 86400)
        cert, key = ca.create_x509_certificate(
            None, dns_names=["localhost"], not_before=now - 3600, not_after=now + 86400
        )
        self.ca_file = directory / "kubelet-ca.pem"
        self.ca_file.write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
        self.token_file = directory / "token"
        self.token_file.write_text(self.token + "\n")
        cert_file = directory / "kubelet.pem"
        cert_file.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert_file)
        self._server: _KubeletServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"https://localhost:{self._server.server_address[1]}"

    def __enter__(self) -> FakeKubelet:
        server = _KubeletServer(("127.0.0.1", 0), _KubeletHandler)
        server.kubelet = self
        server.socket = self._context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def config(self, proc_root: str = "/proc", *, attest_timeout: str = "3s", ttl: str = "5s") -> str:
        """The `kubernetes:` section that points svidgate at this kubelet (YAML)."""
        return (
            "kubernetes:\n"
            f"  kubelet_url: {self.url}\n"
            f"  token_file: {self.token_file}\n"
            f"  kubelet_ca_file: {self.ca_file}\n"
            f"  proc_root: {proc_root}\n"
            f"  pod_cache_ttl: {ttl}\n"
            f"  attest_timeout: {attest_timeout}\n"
        )


def skip_reason_for(driver_hierarchy: Path | None) -> str | None:
    """`cgroup_skip_reason`, plus not being root (moving other processes needs it)."""
    if os.geteuid() != 0:
        return "creating and joining cgroups needs root"
    return cgroup_skip_reason(driver_hierarchy)
