"""ca.upstream end to end: two svidgates under one root, Envoys fed by different svidgates doing mTLS.

tests/e2e/test_examples.py runs envoy-examples/shared-root as its README says (two `svidgate serve`
processes, two Envoys, curl). This test runs the same files in-process (paths and ports moved in code) to look
at what was served: each Envoy's SDS secret is leaf + its node's intermediate, it trusts the root alone, and a
Workload API client (py-spiffe) gets the same chain and the root as the bundle.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient

from tests.support.ca import TestCA
from tests.support.envoy import EXAMPLES, EnvoyProcess, shipped_config
from tests.support.examples import load_backend
from tests.support.server import running_server
from tests.support.tempdir import short_dir

pytestmark = pytest.mark.e2e

EXAMPLE = EXAMPLES / "shared-root"
APP = "spiffe://example.org/app"


@contextlib.contextmanager
def backend() -> Iterator[Any]:
    server = load_backend().make_server(port=0, log=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.asynccontextmanager
async def node(directory: Path, name: str, root: tuple[Path, Path]) -> AsyncIterator[Path]:
    """svidgate from the example's node-<name>.yaml, its paths moved under `directory`; yields its run dir."""
    run = directory / name
    run.mkdir(mode=0o700)
    config = yaml.safe_load((EXAMPLE / f"node-{name}.yaml").read_text())
    config["state_dir"] = str(run / "state")
    config["ca"]["upstream"] = {"cert_file": str(root[0]), "key_file": str(root[1])}
    config["listen"].update(
        grpc=f"unix://{run}/svidgate.sock", workload_api=f"unix://{run}/workload.sock", http=None
    )
    # A Workload API caller: this test process, by its kernel-verified uid.
    config["workloads"].append({"spiffe_id": APP, "selectors": [f"unix:uid:{os.getuid()}"]})
    path = run / "svidgate.yaml"
    path.write_text(yaml.safe_dump(config))
    async with running_server(path):
        yield run


def write_root(directory: Path) -> tuple[TestCA, tuple[Path, Path]]:
    now = time.time()
    root = TestCA("example.org", not_before=now - 60, not_after=now + 30 * 86400)
    cert, key = directory / "root.pem", directory / "root.key"
    cert.write_bytes(root.certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        root.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return root, (cert, key)


def served_chain(envoy: EnvoyProcess) -> list[x509.Certificate]:
    """The certificate chain of the ``default`` SDS secret Envoy holds (admin config dump, keys redacted)."""
    dump = envoy.admin_json("/config_dump?resource=dynamic_active_secrets")
    for entry in dump["configs"]:
        if entry["name"] == "default":
            chain = entry["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"]
            return x509.load_pem_x509_certificates(base64.b64decode(chain))
    raise AssertionError("no 'default' secret in the config dump")


def trusted(envoy: EnvoyProcess) -> list[int]:
    """Serial numbers of the CA certificates Envoy validates peers with (admin /certs prints them in hex)."""
    entries = envoy.admin_json("/certs").get("certificates", [])
    return sorted({int(c["serial_number"], 16) for e in entries for c in e.get("ca_cert", [])})


async def test_envoys_fed_by_two_svidgates_under_one_root_do_mtls(tmp_path: Path) -> None:
    with short_dir("root-") as directory, backend() as app:
        root, files = write_root(directory)
        async with node(directory, "a", files) as node_a, node(directory, "b", files) as node_b:
            server_config = shipped_config(
                EXAMPLE / "server-envoy.yaml",
                listeners={"ingress": 0},
                clusters={"svidgate": node_b / "svidgate.sock", "backend": app.server_address[1]},
            )
            async with EnvoyProcess(server_config, tmp_path, name="server") as server:
                port = await asyncio.to_thread(server.listener_port, "ingress")
                client_config = shipped_config(
                    EXAMPLE / "client-envoy.yaml",
                    listeners={"egress": 0},
                    clusters={"svidgate": node_a / "svidgate.sock", "server": port},
                )
                async with EnvoyProcess(client_config, tmp_path, name="client") as client:
                    url = f"http://127.0.0.1:{await asyncio.to_thread(client.listener_port, 'egress')}/"
                    status = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).status)
                    client_chain = await asyncio.to_thread(served_chain, client)
                    server_chain = await asyncio.to_thread(served_chain, server)
                    client_trust = await asyncio.to_thread(trusted, client)
                    server_trust = await asyncio.to_thread(trusted, server)
            with WorkloadApiClient(socket_path=f"unix://{node_a}/workload.sock") as workload_api:
                context = await asyncio.to_thread(workload_api.fetch_x509_context)

    assert status == 200
    assert "URI=spiffe://example.org/client" in app.received[-1]["x-forwarded-client-cert"].split(";")
    # Each Envoy holds leaf + its own node's intermediate, and trusts the root alone.
    for chain, trust in ((client_chain, client_trust), (server_chain, server_trust)):
        assert len(chain) == 2
        chain[0].verify_directly_issued_by(chain[1])
        chain[1].verify_directly_issued_by(root.certificate)
        assert trust == [root.certificate.serial_number]
    assert client_chain[1] != server_chain[1]  # two intermediates, one per node
    # The Workload API serves the same shape: x509_svid = leaf + intermediate, the bundle = the root.
    svid = context.default_svid
    assert str(svid.spiffe_id) == APP
    assert len(svid.cert_chain) == 2
    assert svid.cert_chain[1] == client_chain[1]
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert [c.serial_number for c in bundle.x509_authorities] == [root.certificate.serial_number]
