"""The built-in CA: persistence, the certificates it mints, JWT-SVIDs and rotation driven by a FakeClock."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from svidgate.errors import CaError, JwtSvidError
from svidgate.identity import ca_state
from svidgate.identity.bundle import parse_spiffe_bundle, spiffe_bundle_json
from svidgate.identity.ca import ACTIVATE_AT, BACKDATE_SECONDS, PREPARE_AT, BuiltinCa
from svidgate.identity.clock import FakeClock
from svidgate.identity.jwtsvid import parse_jwt_svid_insecure, validate_jwt_svid
from svidgate.identity.keys import KeyType, key_id
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import parse_x509_svid, verify_x509_svid

TD = TrustDomain("example.org")
WEB = SpiffeId.parse("spiffe://example.org/web")
CA_TTL = 6000.0
_E = TypeVar("_E", bound=x509.ExtensionType)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ca(tmp_path: Path, clock: FakeClock) -> BuiltinCa:
    return BuiltinCa.load_or_create(tmp_path / "state", TD, KeyType.EC_P256, clock, ca_ttl=CA_TTL)


def _ext(cert: x509.Certificate, kind: type[_E]) -> x509.Extension[_E]:
    return cert.extensions.get_extension_for_class(kind)


# -- the root and its persistence -----


def test_root_certificate(ca: BuiltinCa, clock: FakeClock) -> None:
    root = ca.current.certificate
    assert root.issuer == root.subject
    root.verify_directly_issued_by(root)
    assert _ext(root, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    ) == ["spiffe://example.org"]
    constraints = _ext(root, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    usage = _ext(root, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    assert _ext(root, x509.SubjectKeyIdentifier).value.digest
    assert root.not_valid_before_utc.timestamp() == clock.now - BACKDATE_SECONDS
    assert root.not_valid_after_utc.timestamp() == clock.now + CA_TTL


def test_state_is_private_and_reused_after_restart(tmp_path: Path, ca: BuiltinCa, clock: FakeClock) -> None:
    state_file = tmp_path / "state" / "ca" / "ca.json"
    assert ca.state_file == state_file
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_file.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in state_file.parent.iterdir()) == ["ca.json"]  # no temp files left behind
    again = BuiltinCa.load_or_create(tmp_path / "state", TD, KeyType.EC_P256, clock, ca_ttl=CA_TTL)
    assert again.current.certificate == ca.current.certificate
    assert again.current.jwt_key_id == ca.current.jwt_key_id
    assert spiffe_bundle_json(again.bundle()) == spiffe_bundle_json(ca.bundle())
    # An SVID minted before the restart verifies against the bundle after it.
    svid = ca.mint_x509_svid(WEB, 600)
    assert verify_x509_svid(svid.cert_chain, {TD: again.bundle()}, clock()) == WEB


def test_loose_permissions_are_tightened(tmp_path: Path, ca: BuiltinCa, clock: FakeClock) -> None:
    state_file = tmp_path / "state" / "ca" / "ca.json"
    state_file.chmod(0o644)
    state_file.parent.chmod(0o755)
    BuiltinCa.load_or_create(tmp_path / "state", TD, KeyType.EC_P256, clock, ca_ttl=CA_TTL)
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_file.parent.stat().st_mode) == 0o700


def _corrupt(state_file: Path, edit: str) -> None:
    doc = json.loads(state_file.read_text())
    if edit == "other_td":
        doc["trust_domain"] = "other.org"
    elif edit == "no_format":
        del doc["format"]
    elif edit == "bad_cert":
        doc["authorities"][0]["certificate"] = (
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        )
    elif edit == "swapped_keys":
        a = doc["authorities"][0]
        a["private_key"], a["jwt_private_key"] = a["jwt_private_key"], a["private_key"]
    elif edit == "no_current":
        doc["authorities"][0]["role"] = "next"
    elif edit == "bad_role":
        doc["authorities"][0]["role"] = "boss"
    elif edit == "bad_sequence":
        doc["sequence"] = "1"
    elif edit == "missing_key":
        del doc["authorities"][0]["private_key"]
    state_file.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("other_td", "holds the CA of trust domain 'other.org', not 'example.org'"),
        ("no_format", "not a svidgate CA state file"),
        ("bad_cert", "corrupt key or certificate"),
        ("swapped_keys", "private key does not match the certificate"),
        ("no_current", "exactly one current"),
        ("bad_role", "'role' must be"),
        ("bad_sequence", "'sequence' must be"),
        ("missing_key", "'private_key' must be a PEM string"),
    ],
)
def test_bad_state_is_an_error_and_is_left_alone(
    tmp_path: Path, ca: BuiltinCa, clock: FakeClock, edit: str, message: str
) -> None:
    state_file = tmp_path / "state" / "ca" / "ca.json"
    _corrupt(state_file, edit)
    before = state_file.read_bytes()
    with pytest.raises(CaError, match=message):
        BuiltinCa.load_or_create(tmp_path / "state", TD, KeyType.EC_P256, clock, ca_ttl=CA_TTL)
    assert state_file.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "not JSON"), (b"\x00\x01garbage", "not JSON"), (b'{"hello": "world"}', "not a svidgate CA state")],
)
def test_foreign_file_is_never_replaced(
    tmp_path: Path, clock: FakeClock, content: bytes, message: str
) -> None:
    state_file = tmp_path / "ca" / "ca.json"
    state_file.parent.mkdir(mode=0o700)
    state_file.write_bytes(content)
    with pytest.raises(CaError, match=message):
        BuiltinCa.load_or_create(tmp_path, TD, KeyType.EC_P256, clock)
    assert state_file.read_bytes() == content


def test_state_paths_of_the_wrong_kind(tmp_path: Path, clock: FakeClock) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ca").write_text("a file where the directory goes")
    with pytest.raises(CaError, match="not a directory"):
        BuiltinCa.load_or_create(tmp_path / "a", TD, KeyType.EC_P256, clock)
    (tmp_path / "b" / "ca" / "ca.json").mkdir(parents=True)
    with pytest.raises(CaError, match="not a regular file"):
        BuiltinCa.load_or_create(tmp_path / "b", TD, KeyType.EC_P256, clock)
    with pytest.raises(CaError, match="ca_ttl must be"):
        BuiltinCa.load_or_create(tmp_path / "c", TD, KeyType.EC_P256, clock, ca_ttl=0)


def test_create_never_overwrites_a_file_that_appeared_meanwhile(tmp_path: Path) -> None:
    target = tmp_path / "ca.json"
    assert ca_state.create_exclusive(target, b"first")
    assert not ca_state.create_exclusive(target, b"second")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.json"]


# -- X.509-SVIDs -----


@pytest.mark.parametrize("key_type", list(KeyType))
def test_minted_x509_svid(tmp_path: Path, clock: FakeClock, key_type: KeyType) -> None:
    ca = BuiltinCa.load_or_create(tmp_path, TD, key_type, clock, ca_ttl=CA_TTL)
    svid = ca.mint_x509_svid(WEB, 600, dns_names=["web.example.org", "web"])
    leaf = svid.leaf
    assert svid.spiffe_id == WEB
    assert svid.cert_chain == (leaf,)  # the root travels in the bundle, not the chain
    san = _ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
    assert san.get_values_for_type(x509.DNSName) == ["web.example.org", "web"]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web.example.org"
    constraints = _ext(leaf, x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca
    usage = _ext(leaf, x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not usage.value.crl_sign
    assert usage.value.key_encipherment == (key_type is KeyType.RSA_2048)
    assert list(_ext(leaf, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    root_ski = _ext(ca.current.certificate, x509.SubjectKeyIdentifier).value.digest
    assert _ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == root_ski
    assert _ext(leaf, x509.SubjectKeyIdentifier).value.digest
    assert leaf.serial_number.bit_length() > 64
    assert leaf.not_valid_before_utc.timestamp() == clock.now - BACKDATE_SECONDS
    assert leaf.not_valid_after_utc.timestamp() == clock.now + 600
    expected_key = rsa.RSAPrivateKey if key_type is KeyType.RSA_2048 else ec.EllipticCurvePrivateKey
    assert isinstance(svid.private_key, expected_key)
    assert verify_x509_svid(svid.cert_chain, {TD: ca.bundle()}, clock()) == WEB
    assert parse_x509_svid(svid.cert_chain_pem(), svid.private_key_pem()).spiffe_id == WEB


def test_serials_differ_and_no_dns_means_no_cn(ca: BuiltinCa) -> None:
    a, b = ca.mint_x509_svid(WEB, 60), ca.mint_x509_svid(WEB, 60)
    assert a.leaf.serial_number != b.leaf.serial_number
    assert a.private_key.public_key() != b.private_key.public_key()
    assert a.leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []


def test_svid_lifetime_is_capped_by_the_ca(ca: BuiltinCa) -> None:
    svid = ca.mint_x509_svid(WEB, 10 * CA_TTL)
    assert svid.expires_at == ca.current.not_after
    token = ca.mint_jwt_svid(WEB, ["api"], 10 * CA_TTL)
    assert parse_jwt_svid_insecure(token).expiry <= ca.current.not_after


@pytest.mark.parametrize(
    ("spiffe_id", "ttl", "dns", "message"),
    [
        ("spiffe://other.org/web", 60, (), "another trust domain"),
        ("spiffe://example.org", 60, (), "needs a path"),
        ("spiffe://example.org/web", 0, (), "ttl must be positive"),
        ("spiffe://example.org/web", -1, (), "ttl must be positive"),
        ("spiffe://example.org/web", 60, ("bücher.example",), "invalid DNS name"),
        ("spiffe://example.org/web", 60, ("",), "invalid DNS name"),
        ("spiffe://example.org/web", 60, ("a b",), "invalid DNS name"),
    ],
)
def test_mint_x509_errors(
    ca: BuiltinCa, spiffe_id: str, ttl: float, dns: tuple[str, ...], message: str
) -> None:
    with pytest.raises(CaError, match=message):
        ca.mint_x509_svid(SpiffeId.parse(spiffe_id), ttl, dns)


def test_minting_with_an_expired_ca_asks_for_rotation(ca: BuiltinCa, clock: FakeClock) -> None:
    clock.advance(CA_TTL + 1)
    with pytest.raises(CaError, match="rotate_if_due"):
        ca.mint_x509_svid(WEB, 60)
    assert ca.rotate_if_due()
    assert ca.mint_x509_svid(WEB, 60).expires_at == clock.now + 60


# -- JWT-SVIDs -----


@pytest.mark.parametrize(("key_type", "alg"), [(KeyType.EC_P256, "ES256"), (KeyType.EC_P384, "ES384")])
def test_minted_jwt_svid(tmp_path: Path, clock: FakeClock, key_type: KeyType, alg: str) -> None:
    ca = BuiltinCa.load_or_create(tmp_path, TD, key_type, clock, ca_ttl=CA_TTL)
    token = ca.mint_jwt_svid(WEB, ["api", "db"], 300)
    header = json.loads(_b64(token.split(".")[0]))
    assert header == {"alg": alg, "kid": ca.current.jwt_key_id, "typ": "JWT"}
    svid = validate_jwt_svid(token, {TD: ca.bundle()}, ["db"], clock())
    assert svid.spiffe_id == WEB
    assert svid.audience == ("api", "db")
    assert svid.expiry == int(clock.now + 300)
    # One key per SVID type: the JWT key is not the X.509 root key.
    assert ca.current.jwt_key_id != key_id(ca.current.certificate.public_key())
    assert ca.current.jwt_key_id in ca.bundle().jwt_authorities


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_mint_jwt_errors(ca: BuiltinCa) -> None:
    with pytest.raises(CaError, match="another trust domain"):
        ca.mint_jwt_svid(SpiffeId.parse("spiffe://other.org/web"), ["api"], 60)
    with pytest.raises(CaError, match="ttl must be positive"):
        ca.mint_jwt_svid(WEB, ["api"], 0)
    with pytest.raises(JwtSvidError):
        ca.mint_jwt_svid(WEB, [], 60)


# -- rotation -----


def test_rotation_schedule(tmp_path: Path, ca: BuiltinCa, clock: FakeClock) -> None:
    first = ca.current
    bundles = {TD: ca.bundle()}
    assert ca.bundle().sequence == 1
    assert len(ca.bundle().x509_authorities) == 1

    clock.now = first.lifetime_point(PREPARE_AT) - 1
    assert not ca.rotate_if_due()
    old_svid = ca.mint_x509_svid(WEB, CA_TTL)  # lives until the first root's notAfter
    assert old_svid.expires_at == first.not_after

    # Half-way: the next authority is prepared and published, but signing stays with the first.
    clock.now = first.lifetime_point(PREPARE_AT)
    assert ca.rotate_if_due()
    assert not ca.rotate_if_due()
    second = ca.next
    assert second is not None
    assert ca.current is first
    bundle = ca.bundle()
    assert bundle.sequence == 2
    assert bundle.x509_authorities == (first.certificate, second.certificate)
    assert set(bundle.jwt_authorities) == {first.jwt_key_id, second.jwt_key_id}
    assert ca.mint_x509_svid(WEB, 60).leaf.issuer == first.certificate.subject
    # ...and persisted: a restart sees the prepared authority.
    reloaded = BuiltinCa.load_or_create(tmp_path / "state", TD, KeyType.EC_P256, clock, ca_ttl=CA_TTL)
    assert reloaded.next is not None
    assert reloaded.next.certificate == second.certificate

    # 5/6: signing switches; the first stays in the bundle while its SVIDs may be valid.
    clock.now = first.lifetime_point(ACTIVATE_AT)
    assert ca.rotate_if_due()
    assert ca.current is second
    assert ca.next is None
    new_svid = ca.mint_x509_svid(WEB, 60)
    assert new_svid.leaf.issuer == second.certificate.subject
    bundle = ca.bundle()
    assert bundle.sequence == 3
    assert set(bundle.x509_authorities) == {first.certificate, second.certificate}
    assert verify_x509_svid(old_svid.cert_chain, {TD: bundle}, clock()) == WEB
    assert verify_x509_svid(new_svid.cert_chain, {TD: bundle}, clock()) == WEB
    token = ca.mint_jwt_svid(WEB, ["api"], 60)
    assert parse_jwt_svid_insecure(token).spiffe_id == WEB
    assert validate_jwt_svid(token, {TD: bundle}, ["api"], clock()).spiffe_id == WEB
    # Peers holding only the old bundle still verify old SVIDs: nothing breaks at the switch.
    assert verify_x509_svid(old_svid.cert_chain, bundles, clock()) == WEB

    # After the first root's notAfter nothing it signed is valid any more: it is dropped.
    clock.now = first.not_after
    assert ca.rotate_if_due()
    bundle = ca.bundle()
    assert first.certificate not in bundle.x509_authorities
    assert first.jwt_key_id not in bundle.jwt_authorities
    assert second.certificate in bundle.x509_authorities
    reloaded = BuiltinCa.load_or_create(tmp_path / "state", TD, KeyType.EC_P256, clock, ca_ttl=CA_TTL)
    assert reloaded.current.certificate == second.certificate
    assert first.certificate not in reloaded.bundle().x509_authorities


def test_many_rotations_keep_the_bundle_small(ca: BuiltinCa, clock: FakeClock) -> None:
    changes = 0
    for _ in range(100):
        clock.advance(CA_TTL / 20)
        changes += ca.rotate_if_due()
        assert len(ca.bundle().x509_authorities) <= 3
        svid = ca.mint_x509_svid(WEB, 300)
        assert verify_x509_svid(svid.cert_chain, {TD: ca.bundle()}, clock()) == WEB
    assert changes >= 10


def test_restart_after_long_downtime_rotates_at_once(tmp_path: Path, ca: BuiltinCa, clock: FakeClock) -> None:
    old = ca.current.certificate
    clock.advance(5 * CA_TTL)
    later = BuiltinCa.load_or_create(tmp_path / "state", TD, KeyType.EC_P256, clock, ca_ttl=CA_TTL)
    assert later.current.certificate != old
    assert later.current.not_after > clock.now
    assert old not in later.bundle().x509_authorities
    svid = later.mint_x509_svid(WEB, 60)
    assert verify_x509_svid(svid.cert_chain, {TD: later.bundle()}, clock()) == WEB


def test_failed_persist_leaves_state_unchanged(
    ca: BuiltinCa, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    clock.now = ca.current.lifetime_point(PREPARE_AT)
    with pytest.raises(CaError, match="No space left on device"):
        ca.rotate_if_due()
    assert ca.next is None
    assert ca.bundle().sequence == 1
    monkeypatch.undo()
    assert ca.rotate_if_due()


def test_bundle_parses_as_a_spiffe_bundle(ca: BuiltinCa) -> None:
    bundle = ca.bundle()
    assert bundle.refresh_hint is not None
    assert bundle.refresh_hint > 0
    parsed = parse_spiffe_bundle(TD, spiffe_bundle_json(bundle))
    assert parsed.x509_authorities == bundle.x509_authorities
    assert dict(parsed.jwt_authorities) == dict(bundle.jwt_authorities)
    assert parsed.sequence == bundle.sequence


def test_in_memory_ca(clock: FakeClock) -> None:
    ca = BuiltinCa.in_memory(TD, KeyType.EC_P256, clock)
    assert ca.state_file is None
    svid = ca.mint_x509_svid(WEB, 60)
    assert verify_x509_svid(svid.cert_chain, {TD: ca.bundle()}, clock()) == WEB
