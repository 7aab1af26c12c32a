"""ValidateJWTSVID's claims Struct never fails on what a signed token may legally carry (security review:
an integer claim beyond double range raised OverflowError out of the handler)."""

from __future__ import annotations

import base64
import json
import math
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from svidgate._gen import workload_pb2
from svidgate.identity.bundle import Bundle
from svidgate.identity.jwtsvid import validate_jwt_svid
from svidgate.identity.spiffe_id import TrustDomain
from svidgate.workloadapi.messages import MAX_CLAIM_DEPTH, claims_struct

TD = TrustDomain("example.org")
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
def test_scalar_mapping(value: Any, expected: Any) -> None:
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
