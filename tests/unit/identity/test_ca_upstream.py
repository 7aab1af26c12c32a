"""`ca.upstream`: the built-in CA as an intermediate under a root shared by several svidgates."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from svidgate.config import parse_config
from svidgate.errors import CaError, ConfigError
from svidgate.identity.ca import ACTIVATE_AT, PREPARE_AT, BuiltinCa
from svidgate.identity.ca_upstream import UpstreamAuthority
from svidgate.identity.clock import FakeClock
from svidgate.identity.jwtsvid import validate_jwt_svid
from svidgate.identity.keys import KeyType
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import verify_x509_svid
from tests.support.ca import NOW, TestCA

TD = TrustDomain("example.org")
WEB = SpiffeId.parse("spiffe://example.org/web")
CA_TTL = 6000.0


def write_root(directory: Path, root: TestCA, name: str = "root") -> tuple[Path, Path]:
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert_file.write_bytes(root.certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        root.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def root() -> TestCA:
    return TestCA(TD, not_before=NOW - 3600, not_after=NOW + 100 * CA_TTL)


@pytest.fixture
def upstream(tmp_path: Path, root: TestCA, clock: FakeClock) -> UpstreamAuthority:
    return UpstreamAuthority.load(*write_root(tmp_path, root), clock())


def node(tmp_path: Path, name: str, upstream: UpstreamAuthority | None, clock: FakeClock) -> BuiltinCa:
    return BuiltinCa.load_or_create(
        tmp_path / name, TD, KeyType.EC_P256, clock, ca_ttl=CA_TTL, upstream=upstream
    )


def test_two_nodes_under_one_root_trust_each_others_svids(
    tmp_path: Path, root: TestCA, upstream: UpstreamAuthority, clock: FakeClock
) -> None:
    a, b = node(tmp_path, "a", upstream, clock), node(tmp_path, "b", upstream, clock)
    # Each node has its own intermediate (own key), both signed by the shared root.
    assert a.current.certificate.public_key() != b.current.certificate.public_key()
    for ca in (a, b):
        intermediate = ca.current.certificate
        assert intermediate.issuer == root.certificate.subject
        intermediate.verify_directly_issued_by(root.certificate)
        constraints = intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert (constraints.ca, constraints.path_length) == (True, 0)
        # The bundle publishes the shared root only: identical on every node.
        assert ca.bundle().x509_authorities == (root.certificate,)
    svid = a.mint_x509_svid(WEB, 600)
    assert svid.cert_chain == (svid.leaf, a.current.certificate)
    # Node a's SVID verifies against node b's bundle, and the other way round.
    assert verify_x509_svid(svid.cert_chain, {TD: b.bundle()}, clock()) == WEB
    other = b.mint_x509_svid(WEB, 600)
    assert verify_x509_svid(other.cert_chain, {TD: a.bundle()}, clock()) == WEB
    # JWT keys stay per node (SPIRE's disk UpstreamAuthority cannot publish them either).
    token = a.mint_jwt_svid(WEB, ["backend"], 60)
    assert validate_jwt_svid(token, {TD: a.bundle()}, ["backend"], clock()).spiffe_id == WEB


def test_the_intermediate_is_persisted_and_rotated_under_the_root(
    tmp_path: Path, root: TestCA, upstream: UpstreamAuthority, clock: FakeClock
) -> None:
    ca = node(tmp_path, "a", upstream, clock)
    first = ca.current.certificate
    assert node(tmp_path, "a", upstream, clock).current.certificate == first  # restart: same intermediate
    clock.advance(CA_TTL * PREPARE_AT)
    assert ca.rotate_if_due()
    clock.advance(CA_TTL * (ACTIVATE_AT - PREPARE_AT))
    assert ca.rotate_if_due()
    second = ca.current.certificate
    assert second != first
    second.verify_directly_issued_by(root.certificate)
    assert ca.bundle().x509_authorities == (root.certificate,)
    svid = ca.mint_x509_svid(WEB, 600)
    assert svid.cert_chain[1] == second
    assert verify_x509_svid(svid.cert_chain, {TD: ca.bundle()}, clock()) == WEB


def test_no_intermediate_outlives_the_root(tmp_path: Path, clock: FakeClock) -> None:
    short = TestCA(TD, not_before=NOW - 3600, not_after=NOW + 1000)
    ca = node(tmp_path, "a", UpstreamAuthority.load(*write_root(tmp_path, short), clock()), clock)
    assert ca.current.certificate.not_valid_after_utc == short.certificate.not_valid_after_utc
    assert ca.mint_x509_svid(WEB, 3600).leaf.not_valid_after_utc <= short.certificate.not_valid_after_utc
    clock.advance(1000)
    with pytest.raises(CaError, match=r"ca\.upstream: the root expires"):
        ca.rotate_if_due()


def test_state_of_another_root_or_of_a_self_signed_ca_is_refused(
    tmp_path: Path, upstream: UpstreamAuthority, clock: FakeClock
) -> None:
    node(tmp_path, "self-signed", None, clock)
    with pytest.raises(CaError, match=r"was not issued by ca\.upstream"):
        node(tmp_path, "self-signed", upstream, clock)
    node(tmp_path, "under-root", upstream, clock)
    with pytest.raises(CaError, match=r"ca\.upstream is not set"):
        node(tmp_path, "under-root", None, clock)
    other = TestCA(TD, not_before=NOW - 3600, not_after=NOW + 100 * CA_TTL)
    other_upstream = UpstreamAuthority.load(*write_root(tmp_path, other, "other"), clock())
    with pytest.raises(CaError, match=r"was not issued by ca\.upstream"):
        node(tmp_path, "under-root", other_upstream, clock)


def _bad_roots(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    good = TestCA(TD)
    cert, key = write_root(tmp_path, good, "good")
    cases = {
        "not a CA": write_root(tmp_path, TestCA(TD, is_ca=False, usage=None), "leaf"),
        "pathlen 0": write_root(tmp_path, TestCA(TD, path_length=0), "pathlen0"),
        "keyCertSign": write_root(
            tmp_path,
            TestCA(TD, usage=x509.KeyUsage(True, False, False, False, False, False, False, False, False)),
            "nosign",
        ),
        "not valid now": write_root(tmp_path, TestCA(TD, not_before=NOW - 7200, not_after=NOW - 3600), "old"),
        "not self-signed": write_root(tmp_path, good.child_ca(), "intermediate"),
    }
    other_cert, other_key = write_root(tmp_path, TestCA(TD), "other")
    cases["is not the private key"] = (cert, other_key)
    both = tmp_path / "two.pem"
    both.write_bytes(cert.read_bytes() + other_cert.read_bytes())
    cases["holds 2 certificates"] = (both, key)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LW1hdGVyaWFs\n-----END PRIVATE KEY-----\n")
    cases["not an unencrypted EC"] = (cert, garbage)
    cases["cannot read"] = (tmp_path / "missing.pem", key)
    return cases


def test_a_bad_upstream_is_one_precise_error(tmp_path: Path) -> None:
    for expected, (cert_file, key_file) in _bad_roots(tmp_path).items():
        with pytest.raises(CaError) as info:
            UpstreamAuthority.load(cert_file, key_file, NOW)
        message = str(info.value)
        assert expected in message, (expected, message)
        assert message.startswith("ca.upstream: ")
        assert "c2VjcmV0" not in message  # key file content never appears
        assert "\n" not in message


def test_config_checks_the_upstream_at_load(tmp_path: Path) -> None:
    # The configuration checks the root against the real clock (check-config and serve run now).
    now = time.time()
    cert_file, key_file = write_root(tmp_path, TestCA(TD, not_before=now - 60, not_after=now + 3600))
    relative = f"{{cert_file: {cert_file.name}, key_file: {key_file.name}}}"
    config = parse_config(
        f"trust_domain: example.org\nca:\n  upstream: {relative}\n",
        "svidgate.yaml",
        base_dir=tmp_path,
    )
    assert config.ca.upstream is not None
    assert config.ca.upstream.cert_file == cert_file
    other = write_root(tmp_path, TestCA(TD, not_before=now - 60, not_after=now + 3600), "other")[1]
    with pytest.raises(ConfigError, match=r"ca\.upstream: .*is not the private key"):
        parse_config(
            f"trust_domain: example.org\nca: {{upstream: {{cert_file: {cert_file}, key_file: {other}}}}}\n",
            "svidgate.yaml",
        )
    with pytest.raises(ConfigError, match=r"ca\.upstream\.key_file: required"):
        parse_config(f"trust_domain: example.org\nca: {{upstream: {{cert_file: {cert_file}}}}}\n", "x.yaml")
