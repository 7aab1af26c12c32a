"""The pure snapshot <-> Workload API message conversions (svidgate.workloadapi.messages)."""

from __future__ import annotations

import base64
import json
import math
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils

from svidgate._gen import workload_pb2
from svidgate.errors import BundleError, X509SvidError
from svidgate.identity.bundle import Bundle, public_key_to_jwk
from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import FakeClock
from svidgate.identity.jwtsvid import validate_jwt_svid
from svidgate.identity.keys import KeyType
from svidgate.identity.snapshot import IdentitySnapshot
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.workloadapi.messages import (
    MAX_CLAIM_DEPTH,
    Identity,
    claims_struct,
    jwt_bundle_jwks,
    jwt_bundles_response,
    parse_jwt_jwks,
    parse_x509_svid_response,
    unique_hints,
    x509_bundles_response,
    x509_svid_response,
)

TD = TrustDomain("example.org")
PARTNER = TrustDomain("partner.test")
JWT_ONLY = TrustDomain("jwt-only.test")
A = SpiffeId.parse("spiffe://example.org/a")
B = SpiffeId.parse("spiffe://example.org/b")


@pytest.fixture(scope="module")
def snapshot() -> IdentitySnapshot:
    clock = FakeClock()
    ca = BuiltinCa.in_memory(TD, KeyType.EC_P256, clock)
    partner = BuiltinCa.in_memory(PARTNER, KeyType.EC_P256, clock).bundle()
    jwt_only = Bundle(JWT_ONLY, jwt_authorities={"k1": ec.generate_private_key(ec.SECP256R1()).public_key()})
    svids = {A: ca.mint_x509_svid(A, 3600), B: ca.mint_x509_svid(B, 3600)}
    return IdentitySnapshot(svids, {TD: ca.bundle(), PARTNER: partner, JWT_ONLY: jwt_only}, 7)


def test_svid_response_keeps_entitlement_order_and_separates_federated_bundles(
    snapshot: IdentitySnapshot,
) -> None:
    response = x509_svid_response(snapshot, [Identity(B, "x"), Identity(A)])
    assert response is not None
    assert [s.spiffe_id for s in response.svids] == [str(B), str(A)]
    assert [s.hint for s in response.svids] == ["x", ""]
    # Own trust domain in each entry; the other X.509 bundles in federated_bundles; JWT-only ones nowhere.
    assert set(response.federated_bundles) == {"spiffe://partner.test"}
    parsed = parse_x509_svid_response(response)
    assert [s.spiffe_id for s in parsed.svids] == [B, A]
    assert parsed.bundles[TD].x509_authorities == snapshot.bundles[TD].x509_authorities
    assert parsed.bundles[PARTNER].x509_authorities == snapshot.bundles[PARTNER].x509_authorities


def test_svid_response_is_none_without_an_issued_identity(snapshot: IdentitySnapshot) -> None:
    assert x509_svid_response(snapshot, []) is None
    assert x509_svid_response(snapshot, [Identity(SpiffeId.parse("spiffe://example.org/unissued"))]) is None


def test_unique_hints_keeps_the_first() -> None:
    kept = unique_hints([Identity(A, "h"), Identity(B, "h"), Identity(B, "")])
    assert kept == (Identity(A, "h"), Identity(B, ""))


def test_bundle_responses(snapshot: IdentitySnapshot) -> None:
    assert set(x509_bundles_response(snapshot).bundles) == {"spiffe://example.org", "spiffe://partner.test"}
    jwt = jwt_bundles_response(snapshot)
    assert set(jwt.bundles) == {"spiffe://example.org", "spiffe://partner.test", "spiffe://jwt-only.test"}
    for key, data in jwt.bundles.items():
        td = TrustDomain.parse(key)
        keys = json.loads(data)["keys"]
        # Only JWT authorities (SPIFFE_Workload_API.md 6.2.2), each with its kid.
        assert {k["kid"] for k in keys} == set(snapshot.bundles[td].jwt_authorities)
        assert all(k["use"] == "jwt-svid" and "x5c" not in k for k in keys)
        assert parse_jwt_jwks(td, data).jwt_authorities.keys() == snapshot.bundles[td].jwt_authorities.keys()


def test_jwks_is_deterministic(snapshot: IdentitySnapshot) -> None:
    assert jwt_bundle_jwks(snapshot.bundles[TD]) == jwt_bundle_jwks(snapshot.bundles[TD])


def test_parse_jwt_jwks_accepts_keys_without_use_and_skips_other_uses() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    doc = {"keys": [{"kid": "a", **public_key_to_jwk(key)}, {"use": "x509-svid", **public_key_to_jwk(key)}]}
    bundle = parse_jwt_jwks(TD, json.dumps(doc).encode())
    assert list(bundle.jwt_authorities) == ["a"]
    assert bundle.x509_authorities == ()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "no 'keys' array"),
        (b'{"keys": [1]}', "not a JSON object"),
        (b'{"keys": [{"kty": "EC"}]}', "no 'kid'"),
    ],
)
def test_parse_jwt_jwks_rejects(data: bytes, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        parse_jwt_jwks(TD, data)


def test_parse_rejects_a_spiffe_id_that_is_not_the_leafs(snapshot: IdentitySnapshot) -> None:
    response = x509_svid_response(snapshot, [Identity(A)])
    assert response is not None
    response.svids[0].spiffe_id = str(B)
    with pytest.raises(X509SvidError, match="not the leaf"):
        parse_x509_svid_response(response)


def test_parse_rejects_an_empty_response_and_a_bad_bundle(snapshot: IdentitySnapshot) -> None:
    with pytest.raises(X509SvidError, match="no SVID"):
        parse_x509_svid_response(workload_pb2.X509SVIDResponse())
    response = x509_svid_response(snapshot, [Identity(A)])
    assert response is not None
    response.federated_bundles["spiffe://partner.test"] = b"\x01garbage"
    with pytest.raises(BundleError, match=r"partner\.test"):
        parse_x509_svid_response(response)


def test_agent_bundles_leave_out_what_can_never_be_an_authority(snapshot: IdentitySnapshot) -> None:
    weak = rsa.generate_private_key(65537, 1024).public_key()  # noqa: S505 - the weak key under test
    good = ec.generate_private_key(ec.SECP256R1()).public_key()
    doc = {"keys": [{"kid": "weak", **public_key_to_jwk(weak)}, {"kid": "good", **public_key_to_jwk(good)}]}
    bundle = parse_jwt_jwks(TD, json.dumps(doc).encode())
    assert dict(bundle.jwt_authorities) == {"good": good}
    assert bundle.rejected_authorities == (
        "keys[0] (jwt-svid 'weak'): RSA key of 1024 bits is below the 2048-bit floor",
    )
    # A leaf among the partner's X.509 authorities (DER in federated_bundles) is not an anchor.
    response = x509_svid_response(snapshot, [Identity(A)])
    assert response is not None
    leaf = snapshot.svids[A].leaf.public_bytes(serialization.Encoding.DER)
    response.federated_bundles["spiffe://partner.test"] += leaf
    partner = parse_x509_svid_response(response).bundles[PARTNER]
    assert partner.x509_authorities == snapshot.bundles[PARTNER].x509_authorities
    assert partner.rejected_authorities == (
        "bundle certificate 1: not a CA certificate: basicConstraints cA is false (X509-SVID.md 4.1)",
    )


# Hardening: the claims Struct of ValidateJWTSVID.
#
# ValidateJWTSVID's claims Struct never fails on what a signed token may legally carry (security review: an
# integer claim beyond double range raised OverflowError out of the handler).

KEY = ec.generate_private_key(ec.SECP256R1())
NOW = int(time.time())


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def signed(payload: bytes) -> str:
    """An ES256 JWT-SVID with `payload` as its claims JSON, exactly as written."""
    signing_input = f"{b64(json.dumps({'alg': 'ES256', 'kid': 'k1', 'typ': 'JWT'}).encode())}.{b64(payload)}"
    r, s = utils.decode_dss_signature(KEY.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def claims_json(extra: str) -> bytes:
    base = {"sub": "spiffe://example.org/web", "aud": "backend", "exp": NOW + 300, "iat": NOW}
    return json.dumps(base).encode()[:-1] + b"," + extra.encode() + b"}"


def round_trip(claims: Any) -> Any:
    """The Struct as a client decodes it from the wire."""
    response = workload_pb2.ValidateJWTSVIDResponse(spiffe_id="spiffe://example.org/web", claims=claims)
    return workload_pb2.ValidateJWTSVIDResponse.FromString(response.SerializeToString()).claims


def test_signed_token_with_an_integer_beyond_double_range() -> None:
    huge = 10**400
    token = signed(claims_json(f'"big":{huge},"nested":{{"list":[1,{-huge}]}}'))
    svid = validate_jwt_svid(
        token, {TD: Bundle(TD, jwt_authorities={"k1": KEY.public_key()})}, ["backend"], NOW
    )
    struct = round_trip(claims_struct(svid.claims))
    assert struct["big"] == str(huge)
    assert list(struct["nested"]["list"]) == [1.0, str(-huge)]
    assert struct["exp"] == float(NOW + 300)  # ordinary numbers are still doubles
    assert struct["sub"] == "spiffe://example.org/web"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2**1024, str(2**1024)),  # the first integer float() refuses
        (2**1023, float(2**1023)),
        (-(2**1024), str(-(2**1024))),
        (math.inf, "inf"),  # what json.loads makes of 1e400
        (-math.inf, "-inf"),
        (True, True),  # a bool is an int in Python; it must stay a bool
        (None, None),
        (1.5, 1.5),
    ],
    ids=["2^1024", "2^1023", "-2^1024", "inf", "-inf", "true", "null", "1.5"],
)
def test_claims_struct_keeps_every_json_scalar_a_token_may_carry(value: Any, expected: Any) -> None:
    struct = round_trip(claims_struct({"x": value}))
    if expected is None:
        assert struct.fields["x"].WhichOneof("kind") == "null_value"
    else:
        assert struct["x"] == expected


def test_deep_nesting_is_cut_at_the_limit_and_stays_decodable() -> None:
    deep: Any = "leaf"
    for _ in range(900):  # ~1.8 KiB of JSON: fits in a token; Struct.update alone raised RecursionError
        deep = [deep]
    struct = round_trip(claims_struct({"deep": deep}))
    value: Any = struct["deep"]
    levels = 1
    while not isinstance(value, str):
        value = value[0]
        levels += 1
    assert levels == MAX_CLAIM_DEPTH
    assert value == f"<JSON array nested deeper than {MAX_CLAIM_DEPTH} levels, not shown>"
    shallow = round_trip(claims_struct({"o": {"a": [{"b": 1}]}}))
    assert shallow["o"]["a"][0]["b"] == 1.0
