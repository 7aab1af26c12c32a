"""The `svidgate` command as a real subprocess at its edges: every failure is one plain line on stderr and a
non-zero exit, never a traceback; `check-config` and `serve` refuse the same configurations with the same
line; `mint`, `bundle` and `explain` never create CA state.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from svidgate.identity.bundle import pem_bundle
from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import system_clock
from svidgate.identity.keys import KeyType
from svidgate.identity.spiffe_id import TrustDomain
from tests.support.ca import TestCA
from tests.support.tempdir import short_dir

SVIDGATE = Path(sys.executable).parent / "svidgate"
TD = TrustDomain("example.org")


def svidgate(*argv: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONUNBUFFERED": "1"}
    # cwd: a relative path in argv (mint x509 --out out) must land in the test's directory, never the repo.
    return subprocess.run(
        [str(SVIDGATE), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=home,
        timeout=timeout,
        check=False,
    )


def error_lines(stderr: str) -> list[str]:
    """The plain lines of stderr (the structured JSON log lines of `serve` aside)."""
    return [line for line in stderr.splitlines() if not line.startswith("{")]


def assert_one_error_line(proc: subprocess.CompletedProcess[str], message: str) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert line.startswith("svidgate: error: "), line
    assert message in line, line
    return line


@pytest.fixture
def root() -> Iterator[Path]:
    with short_dir() as path:
        yield path


def config(root: Path, extra: str = "", *, state: str = "state", listen: str = "") -> Path:
    path = root / "svidgate.yaml"
    listen = listen or f"grpc: 'unix://{root}/run/sds.sock', check: null, workload_api: null, http: null"
    path.write_text(
        f"""\
trust_domain: example.org
state_dir: {root / state}
listen: {{{listen}}}
workloads: [{{spiffe_id: 'spiffe://example.org/web', selectors: ['envoy:node_id:web']}}]
log: {{format: json}}
server: {{config_poll_interval: 0s, drain_grace: 1s}}
{extra}"""
    )
    return path


# -- YAML the parser chokes on, an empty file ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: " + "[" * 600 + "]" * 600 + "\n", "line 1, column 67: nested deeper than 64 levels"),
        ("", "the file holds no YAML document (it is empty or only comments)"),
    ],
    ids=["600-levels", "empty"],
)
def test_check_config_and_serve_refuse_unreadable_yaml_in_one_line(
    root: Path, text: str, message: str
) -> None:
    path = root / "bad.yaml"
    path.write_text(text)
    for argv in (["check-config", str(path)], ["serve", "--config", str(path)]):
        proc = svidgate(*argv, home=root)
        assert_one_error_line(proc, f"{path}: {message}")
        assert proc.stderr.count("\n") == 1  # nothing else: the config never loaded, so no log either


# -- one validation: what check-config accepts, serve starts with; what it refuses, serve refuses alike


def _files_source(root: Path) -> str:
    return (
        "source: {kind: files, cert_file: missing/svid.pem, key_file: missing/key.pem, "
        "bundle_file: missing/bundle.pem}\n"
    )


def _foreign_ca(root: Path) -> str:
    BuiltinCa.load_or_create(root / "foreign", TrustDomain("other.org"), KeyType.EC_P256, system_clock)
    return ""


def _expired_svid_files(root: Path) -> str:
    now = system_clock()
    ca = TestCA(TD, not_before=now - 3600, not_after=now + 86400)
    svid = ca.create_x509_svid("spiffe://example.org/web", not_before=now - 120, not_after=now - 10)
    (root / "svid.pem").write_bytes(svid.cert_chain_pem())
    (root / "key.pem").write_bytes(svid.private_key_pem())
    (root / "bundle.pem").write_bytes(pem_bundle(ca.bundle()))
    return "source: {kind: files, cert_file: svid.pem, key_file: key.pem, bundle_file: bundle.pem}\n"


def _regular_file_at_the_socket(root: Path) -> str:
    (root / "run").mkdir(mode=0o700)
    (root / "run" / "sds.sock").write_text("not a socket")
    return ""


def _world_writable_socket_dir(root: Path) -> str:
    (root / "run").mkdir()
    (root / "run").chmod(0o777)  # the point of the test: anyone could swap the socket
    return ""


CASES = {
    "socket-path-is-a-regular-file": (
        _regular_file_at_the_socket,
        "state",
        "listen.grpc[0]: {root}/run/sds.sock exists and is not a socket",
    ),
    "socket-dir-writable-by-everyone": (
        _world_writable_socket_dir,
        "state",
        "listen.grpc[0]: {root}/run: is writable by every user (mode 0777)",
    ),
    "ca-ttl-the-ca-refuses": (
        lambda root: "ca: {ca_ttl: 120s, x509_svid_ttl: 60s, jwt_svid_ttl: 10s}\n",
        "state",
        "ca.ca_ttl: must be more than 120s",
    ),
    "state-dir-is-a-file": (lambda root: "", "svidgate.yaml/state", "state_dir: "),
    "ca-state-of-another-trust-domain": (_foreign_ca, "foreign", "state_dir: "),
    "files-source-missing": (_files_source, "state", "source.cert_file: cannot read "),
    "files-source-expired": (_expired_svid_files, "state", "source.cert_file: "),
    "bundle-endpoint-ca-file-missing": (
        lambda root: (
            "federation: {partner.org: {bundle_endpoint: "
            "{url: 'https://127.0.0.1:9/b', profile: https_web, ca_file: missing.pem}}}\n"
        ),
        "state",
        "federation.partner.org.bundle_endpoint.ca_file: cannot read ",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_config_refuses_what_serve_refuses_with_the_same_line(root: Path, case: str) -> None:
    extra, state, message = CASES[case]
    message = message.format(root=root)
    path = config(root, extra(root), state=state)
    checked = svidgate("check-config", str(path), home=root)
    line = assert_one_error_line(checked, message)
    assert line.startswith(f"svidgate: error: {path}: ")
    served = svidgate("serve", "--config", str(path), home=root)
    assert assert_one_error_line(served, message) == line
    # A problem in the file stops serve before logging starts; one on disk is logged too.
    events = [json.loads(x)["event"] for x in served.stderr.splitlines() if x.startswith("{")]
    assert events[-1:] in ([], ["server.failed"])


def test_check_config_reads_but_never_creates_the_ca(root: Path) -> None:
    path = config(root)
    proc = svidgate("check-config", str(path), home=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"OK: {path}: ")
    assert not (root / "state").exists()


# -- mint, bundle and explain never create CA state -----------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["mint", "jwt", "--spiffe-id", "spiffe://svidgate.local/x", "--audience", "backend"],
        ["mint", "x509", "--spiffe-id", "spiffe://svidgate.local/x", "--out", "out"],
        ["bundle"],
        ["explain", "--host", "h", "--path", "/"],
    ],
    ids=["mint-jwt", "mint-x509", "bundle", "explain"],
)
def test_without_a_ca_commands_fail_saying_where_they_looked(root: Path, argv: list[str]) -> None:
    # Another HOME (or sudo) than the server's: no CA there. Creating one would print what the server rejects.
    proc = svidgate(*argv, home=root)
    state_file = root / ".local/state/svidgate/ca/ca.json"
    assert_one_error_line(proc, f"no built-in CA at {state_file}: `svidgate serve` creates it")
    assert proc.stdout == ""
    assert sorted(p.name for p in root.iterdir()) == [], "nothing may be created"


# -- start-up failures: one plain line besides the structured log ---------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("listener", ["check", "grpc", "http"])
def test_an_address_in_use_is_reported_as_that(root: Path, taken_port: int, listener: str) -> None:
    address = f"127.0.0.1:{taken_port}"
    sds = f"unix://{root}/run/sds.sock"
    listen = {
        "check": f"grpc: '{sds}', check: 'tcp://{address}', workload_api: null, http: null",
        "grpc": f"grpc: ['{sds}', 'tcp://{address}'], check: null, workload_api: null, http: null",
        "http": f"grpc: '{sds}', check: null, workload_api: null, http: '{address}'",
    }[listener]
    proc = svidgate("serve", "--config", str(config(root, listen=listen)), home=root)
    line = assert_one_error_line(proc, f"listen.{listener}: {address}: address already in use")
    assert line == (
        f"svidgate: error: listen.{listener}: {address}: address already in use "
        "(another process listens there: a second svidgate?); stop it or choose another address"
    )
    assert "add_port" not in proc.stderr
    assert not (root / "run" / "sds.sock").exists(), "what was bound before the failure is released"
