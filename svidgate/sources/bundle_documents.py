"""What the bundle endpoint serves, as bytes: pure functions of a bundle (no I/O, no server).

- ``GET /``: the own trust domain's bundle in the SPIFFE bundle format with the served ``spiffe_sequence``
  and ``spiffe_refresh_hint`` (SPIFFE_Federation.md 4, SPIFFE_Trust_Domain_and_Bundle.md 4).
- OpenID Connect discovery beside it: ``<issuer path>/.well-known/openid-configuration`` and the JWKS of the
  JWT-SVID keys at ``<issuer path>/keys``, with the fields SPIRE's oidc-discovery-provider serves.

`svidgate.sources.bundle_server` renders these once per snapshot and serves the bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import urllib.parse

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from svidgate.identity.bundle import Bundle, public_key_to_jwk, spiffe_bundle_json


def authorities_digest(bundle: Bundle) -> str:
    """A digest of a bundle's authorities alone (sequence and hint left out): equal iff the keys are equal."""
    plain = dataclasses.replace(bundle, sequence=None, refresh_hint=None)
    return hashlib.sha256(spiffe_bundle_json(plain)).hexdigest()


def bundle_document(bundle: Bundle, sequence: int, refresh_hint: int) -> bytes:
    """The SPIFFE bundle endpoint's response body: `bundle` with the served sequence and refresh hint.

    Raises:
        BundleError: an authority has a key type a JWK cannot express.
    """
    return spiffe_bundle_json(dataclasses.replace(bundle, sequence=sequence, refresh_hint=refresh_hint))


def jwt_algorithm(key: PublicKeyTypes) -> str | None:
    """The JWS ``alg`` svidgate signs with for a key of this type (as `jwtsvid.jwt_algorithm_for_key`)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}.get(key.curve.name)
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "EdDSA"
    return None


def jwks_document(bundle: Bundle) -> bytes:
    """The JWKS of the JWT-SVID keys, as SPIRE's OIDC discovery provider serves it (``use: sig`` and ``alg``).

    Raises:
        BundleError: a key type a JWK cannot express.
    """
    keys: list[dict[str, str]] = []
    for kid, key in bundle.jwt_authorities.items():
        jwk: dict[str, str] = {**public_key_to_jwk(key, f"jwt authority {kid!r}"), "kid": kid, "use": "sig"}
        alg = jwt_algorithm(key)
        if alg is not None:
            jwk["alg"] = alg
        keys.append(jwk)
    return (json.dumps({"keys": keys}, indent=2) + "\n").encode("utf-8")


def oidc_paths(issuer: str) -> tuple[str, str]:
    """``(discovery path, JWKS path)`` for an issuer: OpenID Connect Discovery 1.0 section 4 puts the document
    at the issuer's path + ``/.well-known/openid-configuration``; the JWKS sits beside it at ``keys``."""
    base = urllib.parse.urlsplit(issuer).path.rstrip("/")
    return f"{base}/.well-known/openid-configuration", f"{base}/keys"


def openid_configuration(issuer: str, bundle: Bundle) -> bytes:
    """The OpenID Connect discovery document for `issuer`, with the fields SPIRE's provider serves.

    ``id_token_signing_alg_values_supported`` lists the algorithms of the keys actually in the bundle.
    """
    algorithms = sorted({alg for key in bundle.jwt_authorities.values() if (alg := jwt_algorithm(key))})
    doc = {
        "issuer": issuer,
        "jwks_uri": issuer.rstrip("/") + "/keys",
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": [],
        "id_token_signing_alg_values_supported": algorithms,
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")
