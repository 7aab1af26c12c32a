"""The test suite's own layout (issue 10): unit tests load no gRPC, tests mirror the package layout, and
helpers live in one support package.

- tests/unit/<package>/test_<module>.py for svidgate/<package>/<module>.py; tests/unit/test_<module>.py for a
  top-level module. No gRPC: a test that needs a gRPC server is a component test.
- tests/component/<package>/ (real gRPC servers); tests/component/runtime/ runs whole servers.
- tests/e2e/ (real Envoy).
- tests/support/: the one place for helpers; test modules never import each other across these directories.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PACKAGE = REPO / "svidgate"

#: Unit tests that load gRPC through a third party, and why that is not a gRPC dependency of theirs.
LOADS_GRPC_THROUGH_A_PEER = {
    # py-spiffe's package __init__ imports its Workload API client (grpc); these tests use only its parsers.
    "tests.unit.identity.test_pyspiffe_peer": "py-spiffe",
    "tests.unit.identity.test_pyspiffe_peer_jwt": "py-spiffe",
}

_LOAD_UNIT_TESTS = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print("\\n".join(sorted(m for m in sys.modules if m == "grpc" or m.startswith(("grpc.", "grpc_")))))
"""


def _unit_test_modules() -> list[str]:
    files = sorted(p for p in (TESTS / "unit").rglob("*.py") if p.name.startswith(("test_", "conftest")))
    return [".".join(p.relative_to(REPO).with_suffix("").parts) for p in files]


def test_unit_tests_load_no_grpc() -> None:
    # A fresh interpreter: this process has long loaded grpc for the component tests.
    modules = ["tests.conftest", *(m for m in _unit_test_modules() if m not in LOADS_GRPC_THROUGH_A_PEER)]
    command = [sys.executable, "-c", _LOAD_UNIT_TESTS, *modules]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"unit tests loaded gRPC modules: {result.stdout.split()}"


def test_unit_test_directories_mirror_svidgate_packages() -> None:
    for directory in sorted(p for p in (TESTS / "unit").iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert (PACKAGE / directory.name / "__init__.py").is_file(), f"tests/unit/{directory.name}/"
        assert (directory / "__init__.py").is_file(), f"tests/unit/{directory.name}/__init__.py"


def test_component_test_directories_mirror_svidgate_packages() -> None:
    directories = (p for p in (TESTS / "component").iterdir() if p.is_dir() and p.name != "__pycache__")
    for directory in sorted(directories):
        assert (PACKAGE / directory.name / "__init__.py").is_file(), f"tests/component/{directory.name}/"
        assert (directory / "__init__.py").is_file(), f"tests/component/{directory.name}/__init__.py"


def test_tests_are_named_for_what_they_test_not_where_they_came_from() -> None:
    # Hardening tests live in the test file of what they harden, under a name that says what they prove.
    assert sorted(p.relative_to(TESTS).as_posix() for p in TESTS.rglob("test_hardening_*.py")) == []


def test_helpers_live_in_tests_support() -> None:
    # Outside tests/support/ every module is a test module, a conftest or a package marker.
    strays = [
        p.relative_to(TESTS).as_posix()
        for p in TESTS.rglob("*.py")
        if "support" not in p.relative_to(TESTS).parts[:1]
        and not p.name.startswith(("test_", "conftest", "__init__"))
    ]
    assert strays == []
