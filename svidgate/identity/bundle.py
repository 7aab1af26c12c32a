"""Trust bundles: the X.509 and JWT authorities of one trust domain, and the rules for accepting them.

Parsing and writing of the SPIFFE bundle format (SPIFFE_Trust_Domain_and_Bundle.md, a JWKS with `use`
`x509-svid`/`jwt-svid`) and of PEM bundles lives here. A bundle never names its own trust domain on the wire
(section 3 of the spec): every parser takes the trust domain from the caller's configuration.

Two layers of acceptance rules, both here so that every source (federation files and endpoints, the files
source, the SPIRE agent) applies the same ones:

- **Per authority** (while parsing): an X.509 authority must be a CA certificate (basicConstraints cA true,
  keyUsage keyCertSign: X509-SVID.md 4.1, 4.3), and every authority's key must meet the floor below. An
  authority that fails is left out of the bundle and its reason kept in `Bundle.rejected_authorities`: it can
  never be a trust anchor, and like an entry of unknown `use` (section 4.2.2) it must not sink the others.
  A malformed entry (bad base64, two certificates in `x5c`, a `kid` on an X.509 entry) still fails the whole
  document: it means the publisher is broken, and nothing in it is trustworthy.
- **Per update** (`bundle_update_rejection`): a new bundle must not leave the trust domain without a usable
  authority for a use (X.509-SVID, JWT-SVID) it had, and its `spiffe_sequence` must not go back. The source
  that applies updates keeps the last good bundle and reports the rejection (`report_bundle_rejection`).

Accepted authority keys: RSA of at least `MIN_RSA_BITS` (2048) bits, and EC on P-256, P-384 or P-521 -- what
JWT-SVID's RS/PS/ES algorithms verify and what SPIRE and svidgate's own CA issue. Ed25519/Ed448 keys have no
JWT-SVID algorithm (JWT-SVID.md 2.1) and are rejected for both uses.

Why one module (over 600 lines): the parsers, the writers and both layers of acceptance rules are one contract
(what a bundle may hold); the per-authority rules run inside the parsers, and a parser in one module with
its rules in another is how the two drift apart. The sections below follow that contract: format, PEM, JWK
keys, per-authority rules, per-update rules, bundle map.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from svidgate.errors import BundleError
from svidgate.identity.spiffe_id import TrustDomain

log = logging.getLogger(__name__)

X509_SVID_USE = "x509-svid"
JWT_SVID_USE = "jwt-svid"

#: Smallest RSA modulus accepted for any authority (NIST SP 800-131A disallows less since 2013).
MIN_RSA_BITS: Final = 2048
#: Elliptic curves accepted for any authority: those of JWT-SVID's ES256/ES384/ES512 (RFC 7518 3.4).
ACCEPTED_EC_CURVES: Final = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
#: Largest bundle document (file or endpoint body) svidgate reads; real bundles are a few kilobytes.
MAX_BUNDLE_BYTES: Final = 1 << 20
#: Rejected authorities named per log line or rejection detail; the rest are counted.
MAX_REASONS_LOGGED: Final = 10

# JSON integers are unbounded; the spec asks for at least 64 bits (4.1.1), and more than that is nonsense that
# would break every Go peer, so it is rejected rather than carried along.
_MAX_UINT64 = 2**64 - 1
_MAX_INT64 = 2**63 - 1


@dataclass(frozen=True, slots=True, eq=False)
class Bundle:
    """The trust bundle of one trust domain.

    Attributes:
        trust_domain: whose bundle this is; a key here never verifies an SVID of another trust domain.
        x509_authorities: root (or signing) certificates for X.509-SVID path validation.
        jwt_authorities: JWT-SVID verification keys by key ID (`kid`).
        sequence: `spiffe_sequence`, when the bundle carries one.
        refresh_hint: `spiffe_refresh_hint` in seconds, when the bundle carries one.
        rejected_authorities: authorities the document listed that can never be used (not a CA, a weak or
            unsupported key), one sentence each naming the entry and the reason; they are not in the bundle.
    """

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...] = ()
    jwt_authorities: Mapping[str, PublicKeyTypes] = field(default_factory=dict)
    sequence: int | None = None
    refresh_hint: int | None = None
    rejected_authorities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "jwt_authorities", MappingProxyType(dict(self.jwt_authorities)))


# ----------------------------------------------------------------------------------------------------
# SPIFFE bundle (JWKS)


def parse_spiffe_bundle(trust_domain: TrustDomain, data: bytes) -> Bundle:
    """Parse a SPIFFE bundle (an RFC 7517 JWK Set with SPIFFE parameters).

    Entries whose `use` or `kty` svidgate does not know are ignored, as section 4.1.3/4.2 require, so a bundle
    from a newer implementation still loads. Everything svidgate does use is checked strictly: an `x509-svid`
    entry carries exactly one certificate in `x5c` (as go-spiffe and SPIRE require) whose key matches the
    JWK's, and a `jwt-svid` entry has a `kid` that no other entry has.

    Args:
        trust_domain: the trust domain the bundle belongs to (from configuration, never from the document).
        data: the JSON document.

    Returns:
        The bundle, with `sequence` and `refresh_hint` when the document sets them.

    Raises:
        BundleError: the document is not JSON, not a JWK Set, or an entry svidgate uses is malformed. The
            message names the entry's index and the rule it breaks.
    """
    try:
        doc = json.loads(data, object_pairs_hook=_no_duplicate_members)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and Python's 4300-digit integer limit.
        raise BundleError(f"SPIFFE bundle for {trust_domain}: not valid JSON: {exc}") from None
    except _DuplicateMemberError as exc:
        raise BundleError(f"SPIFFE bundle for {trust_domain}: duplicate JSON member {exc.name!r}") from None
    where = f"SPIFFE bundle for {trust_domain}"
    if not isinstance(doc, dict):
        raise BundleError(f"{where}: the document must be a JSON object, not {_json_type(doc)}")
    sequence = _optional_int(doc, "spiffe_sequence", 0, _MAX_UINT64, where)
    refresh_hint = _optional_int(doc, "spiffe_refresh_hint", 0, _MAX_INT64, where)
    if "keys" not in doc:
        # 4.1.3: "The parameter keys MUST be present."
        raise BundleError(f"{where}: the 'keys' member is missing")
    keys = doc["keys"]
    if not isinstance(keys, list):
        raise BundleError(f"{where}: 'keys' must be an array, not {_json_type(keys)}")

    x509_authorities: list[x509.Certificate] = []
    jwt_authorities: dict[str, PublicKeyTypes] = {}
    rejected: list[str] = []
    kids: set[str] = set()
    for index, jwk in enumerate(keys):
        entry = f"{where}: keys[{index}]"
        if not isinstance(jwk, dict):
            raise BundleError(f"{entry}: must be a JSON object, not {_json_type(jwk)}")
        use = jwk.get("use")
        if use not in (X509_SVID_USE, JWT_SVID_USE):
            continue  # 4.2.2: unknown (or absent) use -> ignore the entire element
        kty = jwk.get("kty")
        if not isinstance(kty, str):
            raise BundleError(f"{entry}: 'kty' must be set (section 4.2.1)")
        if kty not in _KNOWN_KTY:
            continue  # 4.2.1: unknown key type -> ignore the entire element
        if use == X509_SVID_USE:
            cert, problem = _x509_authority_from_jwk(jwk, entry)
            if problem is not None:
                rejected.append(f"keys[{index}] ({X509_SVID_USE}): {problem}")
            elif all(cert != known for known in x509_authorities):
                x509_authorities.append(cert)
        else:
            kid = jwk.get("kid")
            if not isinstance(kid, str) or not kid:
                raise BundleError(
                    f"{entry}: a jwt-svid key must have a non-empty string 'kid' (JWT-SVID.md 6)"
                )
            if kid in kids:
                raise BundleError(f"{entry}: duplicate 'kid' {kid!r}")
            kids.add(kid)
            key, problem = jwt_authority_from_jwk(jwk, entry)
            if key is not None:
                jwt_authorities[kid] = key
            else:
                rejected.append(f"keys[{index}] ({JWT_SVID_USE} {kid!r}): {problem}")
    return Bundle(
        trust_domain=trust_domain,
        x509_authorities=tuple(x509_authorities),
        jwt_authorities=jwt_authorities,
        sequence=sequence,
        refresh_hint=refresh_hint,
        rejected_authorities=tuple(rejected),
    )


def spiffe_bundle_json(bundle: Bundle) -> bytes:
    """Write `bundle` as a SPIFFE bundle document (what a bundle endpoint serves).

    X.509 authorities become `x509-svid` entries without `kid` and with exactly one certificate in `x5c`
    (X509-SVID.md 6.1); JWT authorities become `jwt-svid` entries with their `kid` (JWT-SVID.md 6). The output
    is deterministic for equal input, so it can be hashed into a resource version.

    Args:
        bundle: the bundle to write.

    Returns:
        UTF-8 JSON, indented for humans, ending in a newline.

    Raises:
        BundleError: an authority has a key type a JWK cannot express.
    """
    keys: list[dict[str, Any]] = []
    for index, cert in enumerate(bundle.x509_authorities):
        der = cert.public_bytes(serialization.Encoding.DER)
        key_members = public_key_to_jwk(cert.public_key(), f"x509 authority {index}")
        keys.append({"use": X509_SVID_USE, **key_members, "x5c": [base64.b64encode(der).decode("ascii")]})
    for kid, key in bundle.jwt_authorities.items():
        keys.append({"use": JWT_SVID_USE, "kid": kid, **public_key_to_jwk(key, f"jwt authority {kid!r}")})
    doc: dict[str, Any] = {"keys": keys}
    if bundle.sequence is not None:
        doc["spiffe_sequence"] = bundle.sequence
    if bundle.refresh_hint is not None:
        doc["spiffe_refresh_hint"] = bundle.refresh_hint
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------------------------------
# PEM bundles (X.509 authorities only)

_PEM_BLOCK_RE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END ([A-Z0-9 ]+)-----",
    re.DOTALL,
)


def parse_pem_bundle(trust_domain: TrustDomain, data: bytes) -> Bundle:
    """Parse a PEM file of CA certificates into a bundle with X.509 authorities only.

    Any PEM block that is not a ``CERTIFICATE`` (a private key, a CSR) is an error rather than skipped: it
    almost always means the wrong file was configured.

    Args:
        trust_domain: the trust domain the certificates are authorities for.
        data: one or more PEM ``CERTIFICATE`` blocks.

    Returns:
        The bundle (no JWT authorities, no sequence, no refresh hint).

    Raises:
        BundleError: no certificate, a non-certificate block, or a block that does not parse.
    """
    return x509_bundle(trust_domain, _pem_certificates(data, f"PEM bundle for {trust_domain}"), "certificate")


def x509_bundle(trust_domain: TrustDomain, certificates: Iterable[x509.Certificate], label: str) -> Bundle:
    """A bundle of the X.509 authorities among `certificates` that can be trust anchors.

    Every certificate that `x509_authority_problem` refuses is left out and recorded in
    `rejected_authorities` as ``"<label> <index>: <reason>"``.

    Args:
        trust_domain: whose authorities these are.
        certificates: the candidate CA certificates (a PEM file's, a Workload API response's).
        label: what one certificate is called in the reasons (``certificate``, ``bundle certificate``).

    Returns:
        The bundle (no JWT authorities).
    """
    kept: list[x509.Certificate] = []
    rejected: list[str] = []
    for index, cert in enumerate(certificates):
        problem = x509_authority_problem(cert)
        if problem is not None:
            rejected.append(f"{label} {index}: {problem}")
        elif all(cert != known for known in kept):
            kept.append(cert)
    return Bundle(trust_domain, x509_authorities=tuple(kept), rejected_authorities=tuple(rejected))


def pem_bundle(bundle: Bundle) -> bytes:
    """The X.509 authorities of `bundle` as concatenated PEM ``CERTIFICATE`` blocks (what Envoy's
    `trusted_ca` and most TLS stacks read). JWT authorities are not representable and are left out.
    """
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in bundle.x509_authorities)


def x509_authorities_pem(bundle: Bundle) -> bytes:
    """Alias of `pem_bundle`: the X.509 authorities of `bundle` as PEM."""
    return pem_bundle(bundle)


def _pem_certificates(data: bytes, where: str) -> tuple[x509.Certificate, ...]:
    if not isinstance(data, bytes):
        raise BundleError(f"{where}: expected bytes, not {type(data).__name__}")
    certs: list[x509.Certificate] = []
    for index, match in enumerate(_PEM_BLOCK_RE.finditer(data)):
        label, end_label = match.group(1).decode("ascii"), match.group(3).decode("ascii")
        if label != end_label:
            raise BundleError(f"{where}: PEM block {index} begins as {label!r} but ends as {end_label!r}")
        if label != "CERTIFICATE":
            raise BundleError(f"{where}: PEM block {index} is a {label!r}, expected only CERTIFICATE blocks")
        try:
            cert = x509.load_pem_x509_certificate(match.group(0))
        except ValueError as exc:
            raise BundleError(f"{where}: PEM block {index} is not a valid certificate: {exc}") from None
        if all(cert != known for known in certs):
            certs.append(cert)
    if not certs:
        raise BundleError(f"{where}: no PEM CERTIFICATE block found")
    return tuple(certs)


# ----------------------------------------------------------------------------------------------------
# JWK <-> public key

_KNOWN_KTY = frozenset({"EC", "RSA", "OKP"})
_EC_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}


def public_key_from_jwk(jwk: Mapping[str, Any], where: str = "JWK") -> PublicKeyTypes:
    """Build a public key from the key members of a JWK (``EC``, ``RSA`` or ``OKP`` Ed25519/Ed448).

    Args:
        jwk: the JWK object.
        where: names the JWK in error messages.

    Returns:
        The public key.

    Raises:
        BundleError: a member is missing, of the wrong type, not base64url, or does not describe a valid key.
    """
    kty = jwk.get("kty")
    try:
        if kty == "EC":
            crv = jwk.get("crv")
            if not isinstance(crv, str) or crv not in _EC_CURVES:
                raise BundleError(f"{where}: unsupported EC curve {crv!r}")
            curve, size = _EC_CURVES[crv]
            x, y = _b64url_member(jwk, "x", where), _b64url_member(jwk, "y", where)
            if len(x) != size or len(y) != size:
                raise BundleError(f"{where}: EC coordinates must be {size} bytes for {crv}")
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
            ).public_key()
        if kty == "RSA":
            n, e = _b64url_member(jwk, "n", where), _b64url_member(jwk, "e", where)
            return rsa.RSAPublicNumbers(int.from_bytes(e, "big"), int.from_bytes(n, "big")).public_key()
        if kty == "OKP":
            crv = jwk.get("crv")
            x = _b64url_member(jwk, "x", where)
            if crv == "Ed25519":
                return ed25519.Ed25519PublicKey.from_public_bytes(x)
            if crv == "Ed448":
                return ed448.Ed448PublicKey.from_public_bytes(x)
            raise BundleError(f"{where}: unsupported OKP curve {crv!r}")
    except ValueError as exc:
        # cryptography raises ValueError for points off the curve, tiny RSA moduli and the like.
        raise BundleError(f"{where}: not a valid {kty} public key: {exc}") from None
    raise BundleError(f"{where}: unsupported key type {kty!r}")


def public_key_to_jwk(key: PublicKeyTypes, where: str = "key") -> dict[str, str]:
    """The RFC 7517/7518/8037 key members (``kty`` and its parameters) of a public key.

    Raises:
        BundleError: the key type has no JWK representation svidgate supports.
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        for crv, (curve, size) in _EC_CURVES.items():
            if curve.name == key.curve.name:
                numbers = key.public_numbers()
                return {"kty": "EC", "crv": crv, "x": _b64url(numbers.x, size), "y": _b64url(numbers.y, size)}
        raise BundleError(f"{where}: unsupported EC curve {key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        return {"kty": "RSA", "n": _b64url(rsa_numbers.n), "e": _b64url(rsa_numbers.e)}
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        crv = "Ed25519" if isinstance(key, ed25519.Ed25519PublicKey) else "Ed448"
        return {"kty": "OKP", "crv": crv, "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")}
    raise BundleError(f"{where}: {type(key).__name__} has no JWK representation")


# ----------------------------------------------------------------------------------------------------
# Acceptance rules: per authority


def authority_key_problem(key: PublicKeyTypes) -> str | None:
    """Why `key` can never be an authority (of either use), or None when it meets the floor.

    Args:
        key: an authority's public key.

    Returns:
        A sentence naming the key's type and size and what is accepted, or None.
    """
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return f"RSA key of {key.key_size} bits is below the {MIN_RSA_BITS}-bit floor"
        return None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ACCEPTED_EC_CURVES:
            return f"EC curve {key.curve.name} is not accepted (P-256, P-384 and P-521 are)"
        return None
    kind = type(key).__name__.removeprefix("_").replace("PublicKey", "")
    return f"{kind} keys are not accepted (RSA of at least {MIN_RSA_BITS} bits and EC P-256/P-384/P-521 are)"


def x509_authority_problem(cert: x509.Certificate) -> str | None:
    """Why `cert` can never be an X.509 trust anchor, or None when it can.

    X509-SVID.md 4.1 and 4.3: a signing certificate sets basicConstraints cA true and keyUsage keyCertSign
    (both extensions present). A leaf, or a certificate whose key misses the floor, is refused: put in a
    validation context it would either verify nothing or be a trust anchor nobody meant to create.

    Args:
        cert: a candidate X.509 authority.

    Returns:
        A sentence naming what is missing, or None.
    """
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "not a CA certificate: it has no basicConstraints extension (X509-SVID.md 4.1)"
    except ValueError as exc:  # a duplicate or undecodable extension
        return f"its extensions do not parse: {exc}"
    if not constraints.ca:
        return "not a CA certificate: basicConstraints cA is false (X509-SVID.md 4.1)"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return "not a signing certificate: it has no keyUsage extension (X509-SVID.md 4.3: keyCertSign)"
    if not usage.key_cert_sign:
        return "not a signing certificate: keyUsage lacks keyCertSign (X509-SVID.md 4.3)"
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        return f"its public key cannot be read: {exc}"
    return authority_key_problem(key)


def jwt_authority_from_jwk(jwk: Mapping[str, Any], where: str) -> tuple[PublicKeyTypes | None, str]:
    """The JWT authority a JWK describes, or why it can never be one.

    A well-formed JWK of a kind that can never verify a JWT-SVID (an EC curve outside the floor, an OKP key,
    a short RSA modulus) is refused with its reason rather than failing the document, as an unknown `kty` is
    ignored (SPIFFE_Trust_Domain_and_Bundle.md 4.2.1).

    Args:
        jwk: the JWK (its `use` and `kid` already checked by the caller).
        where: names the JWK in error messages.

    Returns:
        ``(key, "")``, or ``(None, reason)``.

    Raises:
        BundleError: the JWK is malformed (a member missing or not base64url, a point off its curve).
    """
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "EC" and isinstance(crv, str) and crv not in _EC_CURVES:
        return None, f"EC curve {crv!r} is not accepted (P-256, P-384 and P-521 are)"
    if kty == "OKP":
        return None, f"OKP ({crv!r}) keys have no JWT-SVID algorithm (JWT-SVID.md 2.1: RS, ES and PS only)"
    key = public_key_from_jwk(jwk, where)
    problem = authority_key_problem(key)
    return (None, problem) if problem is not None else (key, "")


# ----------------------------------------------------------------------------------------------------
# Acceptance rules: per update

#: Why a bundle update was not applied (the `reason` label of svidgate_bundle_updates_rejected_total).
BundleRejectReason = Literal[
    "malformed",
    "too_large",
    "no_usable_authority",
    "no_usable_x509_authority",
    "no_usable_jwt_authority",
    "sequence_regressed",
]

#: Told of every rejected bundle update, with the trust domain and the reason; the runtime counts them.
BundleRejectionSink = Callable[[TrustDomain, BundleRejectReason], None]


@dataclass(frozen=True, slots=True)
class BundleRejection:
    """A bundle update that must not replace the bundle held.

    Attributes:
        reason: the reason code (a bounded set: it is a metric label).
        detail: a sentence for the log line.
    """

    reason: BundleRejectReason
    detail: str


def bundle_update_rejection(current: Bundle | None, candidate: Bundle) -> BundleRejection | None:
    """Whether `candidate` may replace `current` (the last good bundle of the same trust domain).

    Refused: a `spiffe_sequence` lower than the one held (SPIFFE_Federation.md: sequence numbers only go up;
    a lower one is a stale replica or a replay); a bundle with no usable authority at all; and a bundle that
    would leave the trust domain with no usable authority for a use it had (X.509-SVID or JWT-SVID): with the
    good keys dropped and none usable in their place, every SVID of that trust domain would fail, and keeping
    the last good bundle is what the spec asks of a failed refresh. Rotation adds the new authority before
    the old one leaves, so a genuine update never trips this; to stop trusting a trust domain, remove it
    from the configuration.

    Args:
        current: the bundle held now, None when there is none yet.
        candidate: the parsed update (its `rejected_authorities` name what parsing left out).

    Returns:
        Why the update is refused, or None to apply it.
    """
    because = f" ({_summary(candidate.rejected_authorities)})" if candidate.rejected_authorities else ""
    if (
        current is not None
        and current.sequence is not None
        and candidate.sequence is not None
        and candidate.sequence < current.sequence
    ):
        return BundleRejection(
            "sequence_regressed",
            f"spiffe_sequence {candidate.sequence} is lower than the {current.sequence} held",
        )
    if not candidate.x509_authorities and not candidate.jwt_authorities:
        return BundleRejection("no_usable_authority", f"the bundle has no usable authority{because}")
    if current is not None and current.x509_authorities and not candidate.x509_authorities:
        return BundleRejection(
            "no_usable_x509_authority",
            f"the bundle would leave no usable X.509 authority where there were "
            f"{len(current.x509_authorities)}{because}",
        )
    if current is not None and current.jwt_authorities and not candidate.jwt_authorities:
        return BundleRejection(
            "no_usable_jwt_authority",
            f"the bundle would leave no usable JWT authority where there were "
            f"{len(current.jwt_authorities)}{because}",
        )
    return None


def report_bundle_rejection(
    trust_domain: TrustDomain,
    rejection: BundleRejection,
    origin: str,
    *,
    kept_last: bool,
    sink: BundleRejectionSink | None,
) -> None:
    """Log a rejected update as one line (trust domain, reason, origin) and tell `sink`.

    Args:
        trust_domain: whose bundle it was.
        rejection: why it was refused.
        origin: where it came from (a file path, an endpoint URL, the SPIRE agent).
        kept_last: whether a previous bundle stays in force.
        sink: counts the rejection (the runtime's metrics), when given.
    """
    log.warning(
        "bundle.update_rejected",
        extra={
            "fields": {
                "trust_domain": str(trust_domain),
                "reason": rejection.reason,
                "detail": rejection.detail,
                "origin": origin,
                "kept_last": kept_last,
            }
        },
    )
    if sink is not None:
        sink(trust_domain, rejection.reason)


def report_rejected_authorities(bundle: Bundle, origin: str) -> None:
    """Log each authority parsing left out of an accepted `bundle`, one line each (once per new document).

    At most `MAX_REASONS_LOGGED` lines; a further line counts the rest (a 1 MiB document holds thousands).
    """
    reasons = bundle.rejected_authorities
    for reason in reasons[:MAX_REASONS_LOGGED]:
        log.warning(
            "bundle.authority_rejected",
            extra={"fields": {"trust_domain": str(bundle.trust_domain), "origin": origin, "reason": reason}},
        )
    if len(reasons) > MAX_REASONS_LOGGED:
        log.warning(
            "bundle.authority_rejected",
            extra={
                "fields": {
                    "trust_domain": str(bundle.trust_domain),
                    "origin": origin,
                    "reason": f"and {len(reasons) - MAX_REASONS_LOGGED} more authorities rejected",
                }
            },
        )


def _summary(reasons: tuple[str, ...]) -> str:
    shown = "; ".join(reasons[:MAX_REASONS_LOGGED])
    more = len(reasons) - MAX_REASONS_LOGGED
    return f"{shown}; and {more} more" if more > 0 else shown


def _x509_authority_from_jwk(jwk: Mapping[str, Any], entry: str) -> tuple[x509.Certificate, str | None]:
    if "kid" in jwk:
        # X509-SVID.md 6.1: "the kid parameter of each JWK entry MUST NOT be set" -- a kid here would let a
        # JWT validator pick an X.509 CA key to verify tokens with (cross-SVID-type key confusion).
        raise BundleError(f"{entry}: an x509-svid entry must not have a 'kid'")
    x5c = jwk.get("x5c")
    if not isinstance(x5c, list) or len(x5c) != 1:
        got = len(x5c) if isinstance(x5c, list) else _json_type(x5c)
        raise BundleError(
            f"{entry}: an x509-svid entry must have exactly one certificate in 'x5c' (got {got})"
        )
    if not isinstance(x5c[0], str):
        raise BundleError(f"{entry}: x5c[0] must be a base64 string")
    try:
        # RFC 7517 4.7: x5c values are standard base64 (not base64url) of the DER.
        der = base64.b64decode(x5c[0], validate=True)
        cert = x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError) as exc:
        raise BundleError(f"{entry}: x5c[0] is not a base64 DER certificate: {exc}") from None
    problem = x509_authority_problem(cert)
    if problem is not None:
        # Judged on the certificate, which is what Envoy would trust; the JWK members are not consulted.
        return cert, problem
    if _has_key_members(jwk) and public_key_from_jwk(jwk, entry) != cert.public_key():
        raise BundleError(f"{entry}: the JWK's key does not match the key of its x5c certificate")
    return cert, None


def _has_key_members(jwk: Mapping[str, Any]) -> bool:
    return any(member in jwk for member in ("x", "y", "n", "e"))


def _b64url_member(jwk: Mapping[str, Any], name: str, where: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise BundleError(f"{where}: member {name!r} must be a non-empty base64url string")
    if "=" in value or not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise BundleError(f"{where}: member {name!r} is not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise BundleError(f"{where}: member {name!r} is not valid base64url") from None


def _b64url(value: int, size: int | None = None) -> str:
    length = size if size is not None else max(1, (value.bit_length() + 7) // 8)
    return base64.urlsafe_b64encode(value.to_bytes(length, "big")).rstrip(b"=").decode("ascii")


def _optional_int(doc: Mapping[str, Any], name: str, low: int, high: int, where: str) -> int | None:
    if name not in doc or doc[name] is None:
        return None
    value = doc[name]
    # bool is an int in Python; `true` is not a sequence number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise BundleError(f"{where}: {name!r} must be an integer, not {_json_type(value)}")
    if not low <= value <= high:
        raise BundleError(f"{where}: {name!r} must be between {low} and {high}, got {value}")
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class _DuplicateMemberError(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _no_duplicate_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of duplicate members silently; two different "x5c" or "kid" in one JWK are an
    # ambiguity that different parsers would resolve differently, so refuse it.
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise _DuplicateMemberError(name)
        result[name] = value
    return result


# ----------------------------------------------------------------------------------------------------
# SPIFFE bundle map


def bundle_map_json(bundles: Mapping[TrustDomain, Bundle], *, x509_only: bool = False) -> bytes:
    """Write bundles as a SPIFFE bundle map (SPIFFE_Trust_Domain_and_Bundle.md 5):
    ``{"trust_domains": {"<name>": <SPIFFE bundle>, ...}}``, trust domains sorted by name.

    Args:
        bundles: the bundles by trust domain.
        x509_only: keep only the ``x509-svid`` authorities (and leave out sequence and refresh hint) -- the
            form Envoy's SPIFFE certificate validator reads from ``trust_bundles``; Envoy 1.40 rejects a map
            holding ``jwt-svid`` keys.

    Returns:
        UTF-8 JSON, indented, ending in a newline.

    Raises:
        BundleError: an authority has a key type a JWK cannot express.
    """
    domains: dict[str, Any] = {}
    for trust_domain in sorted(bundles, key=lambda td: td.name):
        bundle = bundles[trust_domain]
        if x509_only:
            bundle = Bundle(trust_domain=trust_domain, x509_authorities=bundle.x509_authorities)
        domains[trust_domain.name] = json.loads(spiffe_bundle_json(bundle))
    return (json.dumps({"trust_domains": domains}, indent=2) + "\n").encode("utf-8")
