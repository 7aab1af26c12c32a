"""Pure conversions between identity snapshots and the Workload API's protobuf messages.

Server side: an `IdentitySnapshot` plus the identities a caller is entitled to become an `X509SVIDResponse`,
`X509BundlesResponse` or `JWTBundlesResponse`, exactly as SPIFFE_Workload_API.md sections 5 and 6 lay them
out. Client side: the same messages parse back into `X509Svid` and `Bundle` values, with every rule the domain
types enforce. No I/O and no gRPC here, so all of it is unit-testable with plain values.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from svidgate._gen import workload_pb2
from svidgate.errors import BundleError, SvidgateError, X509SvidError
from svidgate.identity.bundle import Bundle, jwt_authority_from_jwk, public_key_to_jwk, x509_bundle
from svidgate.identity.snapshot import IdentitySnapshot
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import X509Svid, load_certificates, parse_x509_svid

__all__ = [
    "Identity",
    "X509Context",
    "claims_struct",
    "jwt_bundle_jwks",
    "jwt_bundles_response",
    "parse_jwt_bundles_response",
    "parse_jwt_jwks",
    "parse_x509_bundles_response",
    "parse_x509_svid_response",
    "unique_hints",
    "x509_bundles_response",
    "x509_svid_response",
]

log = logging.getLogger(__name__)

#: RFC 7517 `use` value of JWT-SVID authorities in SPIFFE bundles (SPIFFE_Trust_Domain_and_Bundle.md 4.2.1).
JWT_SVID_USE = "jwt-svid"


@dataclass(frozen=True, slots=True)
class Identity:
    """One identity a caller is entitled to, in the order the caller should see it (the first is the default).

    Attributes:
        spiffe_id: the SVID's SPIFFE ID.
        hint: the Workload API `hint` ("" for none).
    """

    spiffe_id: SpiffeId
    hint: str = ""


@dataclass(frozen=True, slots=True, eq=False)
class X509Context:
    """What one `X509SVIDResponse` carries, parsed.

    Attributes:
        svids: the X.509-SVIDs, the default (first) one first.
        bundles: the X.509 bundles (each SVID's own trust domain and the federated ones), by trust domain.
    """

    svids: tuple[X509Svid, ...]
    bundles: Mapping[TrustDomain, Bundle]


def unique_hints(identities: Iterable[Identity]) -> tuple[Identity, ...]:
    """Drop every identity whose non-empty hint an earlier identity already has.

    SPIFFE_Workload_API.md 5.2.1/6.2.1: a server MUST keep hints unique within a response. Like SPIRE, the
    first (the one listed earlier in the configuration) wins; clients would pick it anyway.

    Args:
        identities: in the order they would be served.

    Returns:
        The identities to serve, order kept.
    """
    seen: set[str] = set()
    kept: list[Identity] = []
    for identity in identities:
        if identity.hint:
            if identity.hint in seen:
                log.warning(
                    "workloadapi.duplicate_hint",
                    extra={"fields": {"spiffe_id": str(identity.spiffe_id), "hint": identity.hint}},
                )
                continue
            seen.add(identity.hint)
        kept.append(identity)
    return tuple(kept)


def _der(bundle: Bundle | None) -> bytes:
    if bundle is None:
        return b""
    return b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in bundle.x509_authorities)


def x509_svid_response(
    snapshot: IdentitySnapshot, identities: Sequence[Identity]
) -> workload_pb2.X509SVIDResponse | None:
    """The `X509SVIDResponse` for a caller entitled to `identities`.

    Each entry carries the SVID's chain (DER, leaf first), its PKCS#8 key, and the X.509 authorities of its
    own trust domain; `federated_bundles` carries every other trust domain's X.509 authorities (section 4.6).
    Identities the snapshot holds no SVID for yet, or whose trust domain has no X.509 bundle, are left out:
    serving an SVID no peer can verify helps nobody.

    Args:
        snapshot: the current identity snapshot.
        identities: what the caller is entitled to, default first, hints already unique.

    Returns:
        The response, or None when not one identity can be served (the caller then gets PermissionDenied).
    """
    response = workload_pb2.X509SVIDResponse()
    own_domains: set[TrustDomain] = set()
    for identity in identities:
        svid = snapshot.svids.get(identity.spiffe_id)
        if svid is None:
            continue
        bundle_der = _der(snapshot.bundles.get(identity.spiffe_id.trust_domain))
        if not bundle_der:
            log.warning(
                "workloadapi.svid_without_bundle",
                extra={"fields": {"spiffe_id": str(identity.spiffe_id)}},
            )
            continue
        response.svids.append(
            workload_pb2.X509SVID(
                spiffe_id=str(identity.spiffe_id),
                x509_svid=svid.cert_chain_der(),
                x509_svid_key=svid.private_key_der(),
                bundle=bundle_der,
                hint=identity.hint or svid.hint,
            )
        )
        own_domains.add(identity.spiffe_id.trust_domain)
    if not response.svids:
        return None
    for trust_domain, bundle in sorted(snapshot.bundles.items(), key=lambda item: item[0].name):
        der = _der(bundle)
        if trust_domain not in own_domains and der:
            response.federated_bundles[str(trust_domain.id)] = der
    return response


def x509_bundles_response(snapshot: IdentitySnapshot) -> workload_pb2.X509BundlesResponse:
    """The `X509BundlesResponse`: every trust domain's X.509 authorities, keyed by trust domain SPIFFE ID.

    Trust domains whose bundle has no X.509 authority (a JWT-only federation) are left out: an empty DER
    bundle is not a bundle.
    """
    response = workload_pb2.X509BundlesResponse()
    for trust_domain, bundle in snapshot.bundles.items():
        der = _der(bundle)
        if der:
            response.bundles[str(trust_domain.id)] = der
    return response


def jwt_bundle_jwks(bundle: Bundle) -> bytes:
    """The JWT authorities of `bundle` as a JWK Set (RFC 7517), as `JWTBundlesResponse` carries them.

    Only `jwt-svid` keys: section 6.2.2 forbids keys with other uses. Each key keeps its `kid` and is marked
    ``"use": "jwt-svid"`` as SPIRE does; standard JWKS readers (go-jose, PyJWT) ignore the member. Keys are
    sorted by `kid` and the JSON is compact, so equal bundles give equal bytes (streams compare them).

    Raises:
        BundleError: a key has a type a JWK cannot express.
    """
    keys = [
        {"use": JWT_SVID_USE, "kid": kid, **public_key_to_jwk(key, f"jwt authority {kid!r}")}
        for kid, key in sorted(bundle.jwt_authorities.items())
    ]
    return json.dumps({"keys": keys}, separators=(",", ":"), sort_keys=True).encode("utf-8")


def jwt_bundles_response(snapshot: IdentitySnapshot) -> workload_pb2.JWTBundlesResponse:
    """The `JWTBundlesResponse`: a JWKS per trust domain (own and federated), keyed by trust domain SPIFFE ID.

    Every trust domain is listed, even one without JWT authorities (an empty key set), as SPIRE does: "no
    keys" then reads as "nothing of that trust domain validates", which is true.

    Raises:
        BundleError: a key has a type a JWK cannot express.
    """
    response = workload_pb2.JWTBundlesResponse()
    for trust_domain, bundle in snapshot.bundles.items():
        response.bundles[str(trust_domain.id)] = jwt_bundle_jwks(bundle)
    return response


#: Deepest JSON nesting of a claim copied into `ValidateJWTSVIDResponse.claims`; a deeper array or object is
#: replaced by a placeholder string. Why: python-protobuf's `Struct.update` recurses once per level and raised
#: RecursionError at ~900 levels (a signed token of 8 KiB can nest ~3000), and protobuf parsers cap message
#: nesting (upb, behind Python clients, at 100 messages; every JSON level is two: a Value and a Struct or
#: ListValue), so a client could not even decode a deeper response. Real claims nest two or three levels.
MAX_CLAIM_DEPTH = 32


def _struct_value(value: Any, depth: int) -> Any:
    """A JSON value (as `json.loads` returns it) in the shapes `Struct.update` accepts without failing."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            # JSON integers are unbounded (and jwtsvid keeps them exact); beyond double range the exact
            # decimal digits are the only faithful value.
            return str(value)
    if isinstance(value, float):
        # `1e400` parses as inf; protobuf's JSON mapping refuses a non-finite Value (it would read back as a
        # string), so it becomes that string here.
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list | dict):
        if depth >= MAX_CLAIM_DEPTH:
            kind = "array" if isinstance(value, list) else "object"
            return f"<JSON {kind} nested deeper than {MAX_CLAIM_DEPTH} levels, not shown>"
        if isinstance(value, list):
            return [_struct_value(item, depth + 1) for item in value]
        return {str(key): _struct_value(item, depth + 1) for key, item in value.items()}
    return str(value)  # not produced by json.loads; never fail on it


def claims_struct(claims: Mapping[str, Any]) -> Any:
    """JWT claims as a `google.protobuf.Struct` (ValidateJWTSVIDResponse.claims).

    JSON numbers become doubles, as `Struct` can hold nothing else (SPIRE behaves the same). What a double
    cannot hold becomes a string instead of an error: an integer beyond double range its decimal digits, a
    non-finite number ``inf``/``-inf``; an array or object nested deeper than `MAX_CLAIM_DEPTH` a placeholder.
    The token is signed, so its issuer chose these values: the response must still be well-formed.

    Args:
        claims: the validated token's claims (`JwtSvid.claims`).

    Returns:
        The `Struct` message (typed Any: the generated code is not type-checked).
    """
    response = workload_pb2.ValidateJWTSVIDResponse()
    response.claims.update({str(key): _struct_value(value, 1) for key, value in claims.items()})
    return response.claims


# ----------------------------------------------------------------------------------------------------
# Client side


def _trust_domain_key(key: str, where: str) -> TrustDomain:
    try:
        return TrustDomain.parse(key)
    except SvidgateError as exc:
        raise BundleError(f"{where}: invalid trust domain key {key[:80]!r}: {exc}") from None


def _x509_bundle(trust_domain: TrustDomain, der: bytes, where: str) -> Bundle:
    try:
        certificates = load_certificates(der)
    except X509SvidError as exc:
        raise BundleError(f"{where}: X.509 bundle of {trust_domain}: {exc}") from None
    # A certificate that cannot be a trust anchor (a leaf, a weak key) is left out with its reason, as in a
    # SPIFFE bundle document; the source decides whether what remains may replace the bundle it holds.
    return x509_bundle(trust_domain, certificates, "bundle certificate")


def parse_x509_svid_response(response: workload_pb2.X509SVIDResponse) -> X509Context:
    """Parse an `X509SVIDResponse` into SVIDs and bundles.

    Raises:
        X509SvidError: the response has no SVID, or an SVID breaks a rule of X509-SVID.md, or its `spiffe_id`
            field disagrees with its leaf certificate.
        BundleError: a bundle is not concatenated DER certificates, or a trust domain key is invalid.
    """
    if not response.svids:
        raise X509SvidError("the X509SVIDResponse has no SVID")
    svids: list[X509Svid] = []
    bundles: dict[TrustDomain, Bundle] = {}
    for index, entry in enumerate(response.svids):
        svid = parse_x509_svid(bytes(entry.x509_svid), bytes(entry.x509_svid_key), hint=str(entry.hint))
        if str(svid.spiffe_id) != entry.spiffe_id:
            raise X509SvidError(
                f"svids[{index}]: spiffe_id {str(entry.spiffe_id)[:80]!r} is not the leaf's {svid.spiffe_id}"
            )
        svids.append(svid)
        trust_domain = svid.spiffe_id.trust_domain
        if trust_domain not in bundles:
            bundles[trust_domain] = _x509_bundle(trust_domain, bytes(entry.bundle), f"svids[{index}]")
    for key, der in response.federated_bundles.items():
        trust_domain = _trust_domain_key(key, "federated_bundles")
        bundles.setdefault(trust_domain, _x509_bundle(trust_domain, bytes(der), "federated_bundles"))
    return X509Context(tuple(svids), MappingProxyType(bundles))


def parse_x509_bundles_response(response: workload_pb2.X509BundlesResponse) -> dict[TrustDomain, Bundle]:
    """Parse an `X509BundlesResponse` into X.509-only bundles by trust domain.

    Raises:
        BundleError: a bundle is not concatenated DER certificates, or a trust domain key is invalid.
    """
    bundles: dict[TrustDomain, Bundle] = {}
    for key, der in response.bundles.items():
        trust_domain = _trust_domain_key(key, "bundles")
        bundles[trust_domain] = _x509_bundle(trust_domain, bytes(der), "bundles")
    return bundles


def parse_jwt_jwks(trust_domain: TrustDomain, data: bytes) -> Bundle:
    """Parse the JWKS of one trust domain (as `JWTBundlesResponse` carries it) into a JWT-only `Bundle`.

    Lenient where the Workload API is: SPIRE and go-spiffe write plain RFC 7517 keys without `use`, so a key
    without `use` is a JWT authority; a key with another `use` (an X.509 entry) is skipped. Every JWT
    authority needs a `kid` that no other key has, as JWT-SVID validation selects keys by it. A key below the
    floor of `svidgate.identity.bundle` (RSA < 2048 bits, other curves, OKP) is left out and named in
    `rejected_authorities`.

    Raises:
        BundleError: not a JSON JWK Set, a key without `kid`, a duplicate `kid`, or a key that does not parse.
    """
    where = f"JWT bundle of {trust_domain}"
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{where}: not valid JSON: {exc}") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise BundleError(f"{where}: not a JWK Set (no 'keys' array)")
    authorities: dict[str, PublicKeyTypes] = {}
    rejected: list[str] = []
    kids: set[str] = set()
    for index, jwk in enumerate(keys):
        if not isinstance(jwk, dict):
            raise BundleError(f"{where}: keys[{index}] is not a JSON object")
        if jwk.get("use", JWT_SVID_USE) != JWT_SVID_USE:
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise BundleError(f"{where}: keys[{index}] has no 'kid'")
        if kid in kids:
            raise BundleError(f"{where}: keys[{index}] repeats the kid {kid[:80]!r}")
        kids.add(kid)
        key, problem = jwt_authority_from_jwk(jwk, f"{where}: keys[{index}]")
        if key is not None:
            authorities[kid] = key
        else:
            rejected.append(f"keys[{index}] ({JWT_SVID_USE} {kid[:80]!r}): {problem}")
    return Bundle(trust_domain, jwt_authorities=authorities, rejected_authorities=tuple(rejected))


def parse_jwt_bundles_response(response: workload_pb2.JWTBundlesResponse) -> dict[TrustDomain, Bundle]:
    """Parse a `JWTBundlesResponse` into JWT-only bundles by trust domain.

    Raises:
        BundleError: a trust domain key or a JWKS is invalid.
    """
    return {
        (trust_domain := _trust_domain_key(key, "bundles")): parse_jwt_jwks(trust_domain, bytes(jwks))
        for key, jwks in response.bundles.items()
    }
