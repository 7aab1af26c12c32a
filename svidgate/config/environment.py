"""Defaults that depend on the environment (``XDG_*``, ``HOME``), and the embedded default configuration."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from svidgate.config.model import DEFAULT_CHECK_ADDRESS, DEFAULT_TRUST_DOMAIN


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/svidgate``, else ``~/.local/state/svidgate`` (the CA state lives here)."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME")
    if base and os.path.isabs(base):
        return Path(base) / "svidgate"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".local" / "state" / "svidgate"


def default_runtime_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_RUNTIME_DIR/svidgate``, else ``/tmp/svidgate-<uid>`` (the unix sockets live here)."""
    env = os.environ if env is None else env
    base = env.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base):
        return Path(base) / "svidgate"
    return Path(f"/tmp/svidgate-{os.getuid()}")


def default_config_text(env: Mapping[str, str] | None = None) -> str:
    """The embedded default configuration as YAML (what `load_config(None)` parses).

    Development only: its one workload uses the ``any`` selector, so every caller that can reach the sockets
    receives ``spiffe://svidgate.local/default``. SDS and the Workload API are served on unix sockets only
    (0660 in a 0700 directory: svidgate's own user), Check on `DEFAULT_CHECK_ADDRESS`: nothing that hands out
    a private key is reachable over TCP.
    """
    runtime = default_runtime_dir(env)
    return f"""\
# svidgate embedded default configuration (development only).
trust_domain: {DEFAULT_TRUST_DOMAIN}
state_dir: {json.dumps(str(default_state_dir(env)))}
listen:
  grpc: {json.dumps(f"unix://{runtime}/svidgate.sock")}
  check: {DEFAULT_CHECK_ADDRESS}
  workload_api: {json.dumps(f"unix://{runtime}/workload.sock")}
  http: 127.0.0.1:8082
workloads:
  - spiffe_id: spiffe://{DEFAULT_TRUST_DOMAIN}/default
    selectors: [any]   # every caller; never use this outside development
"""


__all__ = ["default_config_text", "default_runtime_dir", "default_state_dir"]
