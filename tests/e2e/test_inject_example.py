"""End to end: the envoy-examples/inject example with real Envoys and one in-process svidgate.

    app --HTTP--> egress Envoy --(ext_authz inject: + JWT-SVID)--mTLS (SDS)--> ingress Envoy
        --(ext_authz validate: - token, + x-spiffe-id)--> backend

The application sends no token at all; the backend receives the caller's SPIFFE ID, proven by a JWT-SVID that
svidgate minted for the egress side and validated on the ingress side, over an mTLS hop whose certificates
svidgate served to both Envoys over SDS. The example's files are used as a user reads them; only their ports
and socket paths are moved (in the parsed YAML), so that this test can look inside the backend.
tests/e2e/test_examples.py runs the same files untouched, as the README says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.envoy import EXAMPLES, EnvoyProcess, shipped_config
from tests.support.examples import load_backend
from tests.support.server import running_server
from tests.support.tempdir import short_dir

pytestmark = pytest.mark.e2e

EXAMPLE = EXAMPLES / "inject"
FRONTEND = "spiffe://example.org/frontend"


@contextlib.contextmanager
def backend_app() -> Iterator[Any]:
    """Run envoy-examples/backend.py on a free port; yield its server (``.received``: headers)."""
    server = load_backend().make_server(port=0, log=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.asynccontextmanager
async def svidgate(directory: Path) -> AsyncIterator[Path]:
    """Run svidgate with the example's config (its paths moved under `directory`); yield its socket."""
    run_dir = directory / "run"
    run_dir.mkdir(mode=0o700)
    config = yaml.safe_load((EXAMPLE / "svidgate.yaml").read_text())
    config["state_dir"] = str(directory / "state")
    config["listen"].update(
        grpc=f"unix://{run_dir}/svidgate.sock", workload_api=f"unix://{run_dir}/workload.sock", http=None
    )
    config_path = directory / "svidgate.yaml"
    config_path.write_text(yaml.safe_dump(config))
    async with running_server(config_path):
        yield run_dir / "svidgate.sock"


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 -- a local test URL
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def test_backend_sees_the_callers_spiffe_id_without_the_app_sending_a_token(tmp_path: Path) -> None:
    with short_dir("inj-") as directory, backend_app() as backend:
        async with svidgate(directory) as socket:
            ingress_config = shipped_config(
                EXAMPLE / "ingress-envoy.yaml",
                listeners={"ingress": 0},
                clusters={"svidgate": socket, "backend": backend.server_address[1]},
            )
            async with EnvoyProcess(ingress_config, tmp_path, name="ingress") as ingress:
                ingress_port = await asyncio.to_thread(ingress.listener_port, "ingress")
                egress_config = shipped_config(
                    EXAMPLE / "egress-envoy.yaml",
                    listeners={"egress": 0},
                    clusters={"svidgate": socket, "backend_via_ingress": ingress_port},
                )
                async with EnvoyProcess(egress_config, tmp_path, name="egress") as egress:
                    url = f"http://127.0.0.1:{await asyncio.to_thread(egress.listener_port, 'egress')}/hello"
                    first = await asyncio.to_thread(http_get, url)
                    second = await asyncio.to_thread(http_get, url)
                    # A token the application sends itself is replaced, never forwarded alongside ours.
                    forged = await asyncio.to_thread(http_get, url, {"authorization": "Bearer forged"})
                    # Neither can a caller smuggle its own x-spiffe-id to the backend.
                    spoofed = await asyncio.to_thread(
                        http_get, url, {"x-spiffe-id": "spiffe://example.org/admin"}
                    )
                    # Without injection (the example's demonstration route) the ingress refuses.
                    no_token = await asyncio.to_thread(http_get, url.replace("/hello", "/no-token/hello"))
                    egress_stats = await asyncio.to_thread(egress.stats, "ext_authz")
                    ingress_stats = await asyncio.to_thread(ingress.stats, "ext_authz")

    for status, body in (first, second, forged, spoofed):
        assert status == 200, body
        assert json.loads(body)["x-spiffe-id"] == FRONTEND
    assert len(backend.received) == 4
    for headers in backend.received:
        assert headers["x-spiffe-id"] == FRONTEND
        # The ingress side removes the validated token: the backend never handles credentials.
        assert "authorization" not in headers
        # The mTLS hop between the Envoys used the frontend's X.509-SVID, served by svidgate over SDS.
        assert f"URI={FRONTEND}" in headers["x-forwarded-client-cert"].split(";")
    assert no_token[0] == 401, no_token
    assert egress_stats.get("http.egress.ext_authz.ok", 0) == 4
    assert ingress_stats.get("http.ingress.ext_authz.ok", 0) == 4
    assert ingress_stats.get("http.ingress.ext_authz.denied", 0) == 1
