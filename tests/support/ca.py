"""A test CA built in code, in the spirit of go-spiffe's internal/test/ca.go.

`TestCA(trust_domain)` is a self-signed root; `child_ca()` an intermediate below it. Both mint X.509-SVIDs and
JWT-SVIDs and can break every rule on request, so negative tests say what they break instead of loading
fixture files:

    ca = TestCA("example.org")
    good = ca.create_x509_svid("spiffe://example.org/web")
    bad = ca.create_x509_svid("spiffe://example.org/web", is_ca=True)           # a CA leaf
    expired = ca.create_x509_svid("spiffe://example.org/web", not_after=NOW - 1)
    token = ca.create_jwt_svid("spiffe://example.org/web", ["api"], header={"alg": "none"}, sign=False)
    bundles = {ca.trust_domain: ca.bundle()}

Times are epoch seconds around `NOW` (the default of `FakeClock`), so tests pass ``now=NOW`` and never depend
on the wall clock.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from svidgate.identity.bundle import Bundle
from svidgate.identity.clock import FakeClock
from svidgate.identity.jwtsvid import jwt_algorithm_for_key
from svidgate.identity.keys import KeyType, SigningKey, generate_private_key, key_id
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import X509Svid

#: The instant every TestCA certificate is valid around (FakeClock's default).
NOW: float = FakeClock().now

_UNSET: Any = object()

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_EC_SIZES = {"ES256": 32, "ES384": 48, "ES512": 66}


def _dt(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    """A KeyUsage with only the named bits set."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def sign_jws(signing_input: bytes, alg: str, key: Any) -> bytes:
    """Sign `signing_input` the way JWS `alg` does (RS/PS/ES 256-512, HS with a bytes key, ``none``)."""
    if alg == "none":
        return b""
    bits = alg[2:]
    if alg.startswith("HS"):
        return hmac.new(key, signing_input, getattr(hashlib, f"sha{bits}")).digest()
    hash_alg = _HASHES[bits]()
    if alg.startswith("ES"):
        der = key.sign(signing_input, ec.ECDSA(hash_alg))
        r, s = utils.decode_dss_signature(der)
        size = _EC_SIZES[alg]
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    if alg.startswith("RS"):
        return bytes(key.sign(signing_input, padding.PKCS1v15(), hash_alg))
    if alg.startswith("PS"):
        pss = padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)
        return bytes(key.sign(signing_input, pss, hash_alg))
    raise ValueError(f"sign_jws: unknown alg {alg!r}")


def make_jws(
    header: Mapping[str, Any], claims: Mapping[str, Any] | str | bytes, key: Any, *, sign: bool = True
) -> str:
    """A compact JWS with exactly this header and payload (a dict is JSON-encoded; str/bytes are used raw).

    With ``sign=False`` the signature part is empty (for ``alg: none`` tests).
    """
    payload = claims if isinstance(claims, bytes) else claims.encode() if isinstance(claims, str) else None
    if payload is None:
        payload = json.dumps(claims, separators=(",", ":")).encode()
    signing_input = f"{_b64url(json.dumps(header, separators=(',', ':')).encode())}.{_b64url(payload)}"
    signature = sign_jws(signing_input.encode("ascii"), str(header.get("alg")), key) if sign else b""
    return f"{signing_input}.{_b64url(signature)}"


class TestCA:
    """A root (or, via `child_ca`, intermediate) CA for one trust domain, with a JWT signing key.

    Attributes:
        trust_domain: the trust domain.
        certificate: this CA's certificate.
        key: this CA's X.509 signing key.
        jwt_key: the JWT-SVID signing key; `jwt_kid` its key ID in `bundle()`.
        parent: the issuing CA, None for a root.
    """

    __test__ = False  # not a pytest test class, despite the name

    certificate: x509.Certificate
    _depth: int

    def __init__(
        self,
        trust_domain: TrustDomain | str,
        *,
        key_type: KeyType = KeyType.EC_P256,
        parent: TestCA | None = None,
        not_before: float = NOW - 3600,
        not_after: float = NOW + 30 * 86400,
        uris: Sequence[str] | None = None,
        is_ca: bool = True,
        path_length: int | None = None,
        usage: x509.KeyUsage | None = _UNSET,
        name_constraints: x509.NameConstraints | None = None,
        jwt_key_type: KeyType | None = None,
    ) -> None:
        self.trust_domain = (
            trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
        )
        self.parent = parent
        self.key: SigningKey = generate_private_key(key_type)
        self.jwt_key: SigningKey = generate_private_key(jwt_key_type or key_type)
        self.jwt_kid = key_id(self.jwt_key.public_key())
        depth = 0 if parent is None else parent._depth + 1
        self._depth = depth
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TestCA"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{self.trust_domain} CA {depth} {id(self):x}"),
            ]
        )
        issuer_key = parent.key if parent is not None else self.key
        issuer_name = parent.certificate.subject if parent is not None else subject
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_dt(not_before))
            .not_valid_after(_dt(not_after))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length if is_ca else None), True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(u)
                        for u in (uris if uris is not None else [str(self.trust_domain.id)])
                    ]
                ),
                False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False)
        )
        if usage is _UNSET:
            usage = key_usage(key_cert_sign=True, crl_sign=True)
        if usage is not None:
            builder = builder.add_extension(usage, True)
        if name_constraints is not None:
            builder = builder.add_extension(name_constraints, True)
        self.certificate = builder.sign(issuer_key, _hash_for(issuer_key))

    # -- hierarchy -----

    def child_ca(self, trust_domain: TrustDomain | str | None = None, **options: Any) -> TestCA:
        """An intermediate CA signed by this one (same trust domain unless given); options as for `TestCA`."""
        return TestCA(trust_domain if trust_domain is not None else self.trust_domain, parent=self, **options)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """This CA's certificate and its ancestors' below the root (what a leaf's chain carries after it)."""
        if self.parent is None:
            return ()
        return (self.certificate, *self.parent.chain)

    @property
    def root(self) -> TestCA:
        return self if self.parent is None else self.parent.root

    # -- X.509-SVIDs -----

    def create_x509_certificate(
        self,
        spiffe_id: SpiffeId | str | None,
        *,
        key: SigningKey | None = None,
        key_type: KeyType = KeyType.EC_P256,
        not_before: float = NOW - 60,
        not_after: float = NOW + 3600,
        uris: Sequence[str] | None = None,
        dns_names: Sequence[str] = (),
        is_ca: bool = False,
        omit_basic_constraints: bool = False,
        usage: x509.KeyUsage | None = _UNSET,
        eku: Sequence[x509.ObjectIdentifier] | None = (
            ExtendedKeyUsageOID.SERVER_AUTH,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
        omit_san: bool = False,
        san_critical: bool = False,
        subject: x509.Name | None = None,
        signer: SigningKey | None = None,
    ) -> tuple[x509.Certificate, SigningKey]:
        """A leaf certificate and its key; every keyword breaks (or keeps) one rule.

        Args:
            spiffe_id: the URI SAN (ignored when `uris` is given; None for no URI SAN).
            key: the leaf key (a fresh `key_type` key by default).
            uris: the exact URI SANs (e.g. two, or a non-SPIFFE URI).
            is_ca / omit_basic_constraints: basicConstraints cA true / no basicConstraints at all.
            usage: keyUsage (default digitalSignature only; None for no keyUsage extension).
            eku: extended key usages (None for no EKU extension).
            omit_san: no subjectAltName extension.
            signer: sign with this key instead of the CA's (a bad signature).
        """
        leaf_key = key if key is not None else generate_private_key(key_type)
        if uris is None:
            uris = [] if spiffe_id is None else [str(spiffe_id)]
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                subject
                if subject is not None
                else x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TestCA leaf")])
            )
            .issuer_name(self.certificate.subject)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_dt(not_before))
            .not_valid_after(_dt(not_after))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), False)
        )
        if not omit_basic_constraints:
            builder = builder.add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), True)
        if usage is _UNSET:
            usage = key_usage(digital_signature=True)
        if usage is not None:
            builder = builder.add_extension(usage, True)
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), False)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns_names]
        if not omit_san and names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), san_critical)
        signing_key = signer if signer is not None else self.key
        return builder.sign(signing_key, _hash_for(signing_key)), leaf_key

    def create_x509_svid(self, spiffe_id: SpiffeId | str, *, hint: str = "", **options: Any) -> X509Svid:
        """An X509Svid (leaf + this CA's chain below the root), built with `create_x509_certificate` options.

        The SVID object is built without validation, so broken SVIDs can reach the code under test.
        """
        cert, key = self.create_x509_certificate(spiffe_id, **options)
        sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else _lenient_id(spiffe_id, self.trust_domain)
        return X509Svid(spiffe_id=sid, cert_chain=(cert, *self.chain), private_key=key, hint=hint)

    # -- JWT-SVIDs -----

    def create_jwt_svid(
        self,
        spiffe_id: SpiffeId | str,
        audience: Sequence[str] | str,
        *,
        ttl: float = 300,
        now: float = NOW,
        header: Mapping[str, Any] | None = None,
        extra_header: Mapping[str, Any] | None = None,
        claims: Mapping[str, Any] | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        drop_claims: Sequence[str] = (),
        drop_header: Sequence[str] = (),
        key: Any = None,
        sign: bool = True,
    ) -> str:
        """A JWT-SVID signed with this CA's JWT key, or anything else on request.

        Args:
            spiffe_id: the ``sub`` claim.
            audience: the ``aud`` claim (a string stays a string, a sequence becomes an array).
            ttl / now: ``exp = int(now + ttl)``, ``iat = int(now)``.
            header: the exact header (default ``{"alg": <key's alg>, "kid": jwt_kid, "typ": "JWT"}``).
            extra_header / drop_header: members to add/override or remove from the header.
            claims: the exact claims (default ``sub``, ``aud``, ``exp``, ``iat``).
            extra_claims / drop_claims: members to add/override or remove from the claims.
            key: sign with this key (any private key; bytes for HS*) instead of the CA's JWT key.
            sign: False leaves the signature empty.
        """
        signing_key = key if key is not None else self.jwt_key
        if header is None:
            alg = jwt_algorithm_for_key(signing_key) if not isinstance(signing_key, bytes) else "HS256"
            header = {"alg": alg, "kid": self.jwt_kid, "typ": "JWT"}
        full_header = {k: v for k, v in {**header, **(extra_header or {})}.items() if k not in drop_header}
        if claims is None:
            aud: Any = audience if isinstance(audience, str) else list(audience)
            claims = {"sub": str(spiffe_id), "aud": aud, "exp": int(now + ttl), "iat": int(now)}
        full_claims = {k: v for k, v in {**claims, **(extra_claims or {})}.items() if k not in drop_claims}
        return make_jws(full_header, full_claims, signing_key, sign=sign)

    # -- bundles -----

    def bundle(
        self,
        *,
        sequence: int | None = None,
        refresh_hint: int | None = None,
        extra_x509: Sequence[x509.Certificate] = (),
        extra_jwt: Mapping[str, PublicKeyTypes] | None = None,
    ) -> Bundle:
        """The trust bundle of this CA's trust domain: the root certificate and this CA's JWT key."""
        root = self.root
        jwt: dict[str, PublicKeyTypes] = {self.jwt_kid: self.jwt_key.public_key()}
        if root is not self:
            jwt[root.jwt_kid] = root.jwt_key.public_key()
        jwt.update(extra_jwt or {})
        return Bundle(
            trust_domain=self.trust_domain,
            x509_authorities=(root.certificate, *extra_x509),
            jwt_authorities=jwt,
            sequence=sequence,
            refresh_hint=refresh_hint,
        )

    def bundles(self) -> dict[TrustDomain, Bundle]:
        """``{trust_domain: bundle()}``, the mapping the verifiers take."""
        return {self.trust_domain: self.bundle()}


def _hash_for(key: SigningKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _lenient_id(text: str, fallback: TrustDomain) -> SpiffeId:
    # Negative tests put invalid IDs into certificates; the X509Svid object still needs some SpiffeId.
    try:
        return SpiffeId.parse(text)
    except Exception:
        return SpiffeId(fallback, "/invalid")


__all__ = ["NOW", "TestCA", "key_usage", "make_jws", "sign_jws"]
