"""Token extraction (svidgate.extauthz.token): every way a header can be wrong has its own reason."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from svidgate.extauthz.token import (
    DUPLICATE_TOKEN,
    MALFORMED_TOKEN,
    MISSING_TOKEN,
    TokenError,
    extract_token,
    extract_token_raw,
)

JWS = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"


@pytest.mark.parametrize(
    "value",
    [
        f"Bearer {JWS}",
        f"bearer {JWS}",
        f"BEARER {JWS}",
        f"Bearer   {JWS}",
        f"  Bearer {JWS}\t",
        f"Bearer\t{JWS}",
    ],
)
def test_bearer_accepted(value: str) -> None:
    assert extract_token({"authorization": value}, "authorization", "Bearer ") == JWS


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, MISSING_TOKEN),
        ({"other": f"Bearer {JWS}"}, MISSING_TOKEN),
        ({"authorization": ""}, MISSING_TOKEN),
        ({"authorization": "   "}, MISSING_TOKEN),
        ({"authorization": f"Bearer {JWS},Bearer {JWS}"}, DUPLICATE_TOKEN),
        ({"authorization": f"Bearer {JWS}, Bearer {JWS}"}, DUPLICATE_TOKEN),
        ({"authorization": JWS}, MALFORMED_TOKEN),
        ({"authorization": f"Basic {JWS}"}, MALFORMED_TOKEN),
        ({"authorization": f"Bearer{JWS}"}, MALFORMED_TOKEN),
        ({"authorization": "Bearer"}, MALFORMED_TOKEN),
        ({"authorization": "Bearer "}, MALFORMED_TOKEN),
        ({"authorization": "Bearer a.b"}, MALFORMED_TOKEN),
        ({"authorization": "Bearer a.b.c.d"}, MALFORMED_TOKEN),
        ({"authorization": "Bearer a..c"}, MALFORMED_TOKEN),
        ({"authorization": f"Bearer {JWS} extra"}, MALFORMED_TOKEN),
        ({"authorization": f'Bearer "{JWS}"'}, MALFORMED_TOKEN),
        ({"authorization": "Bearer ä.b.c"}, MALFORMED_TOKEN),
    ],
)
def test_rejected_with_reason(headers: dict[str, str], reason: str) -> None:
    with pytest.raises(TokenError) as info:
        extract_token(headers, "authorization", "Bearer ")
    assert info.value.reason == reason
    assert JWS not in str(info.value)  # never echo the header value


def test_custom_header_without_prefix() -> None:
    assert extract_token({"x-jwt-svid": JWS}, "x-jwt-svid", "") == JWS
    with pytest.raises(TokenError, match=MALFORMED_TOKEN):
        extract_token({"x-jwt-svid": f"Bearer {JWS}"}, "x-jwt-svid", "")


def test_raw_header_list_detects_repeats() -> None:
    headers = [("Authorization", f"Bearer {JWS}"), ("accept", "*/*")]
    assert extract_token_raw(headers, "authorization", "Bearer ") == JWS
    with pytest.raises(TokenError) as info:
        extract_token_raw([*headers, ("authorization", f"Bearer {JWS}")], "authorization", "Bearer ")
    assert info.value.reason == DUPLICATE_TOKEN
    with pytest.raises(TokenError, match=MISSING_TOKEN):
        extract_token_raw([("accept", "*/*")], "authorization", "Bearer ")


@given(st.text(max_size=300), st.sampled_from(["Bearer ", "", "Token "]))
def test_any_header_value_yields_a_token_or_a_token_error(value: str, prefix: str) -> None:
    reason = None
    try:
        token = extract_token({"authorization": value}, "authorization", prefix)
    except TokenError as err:
        reason = err.reason
    if reason is None:
        assert token.count(".") == 2
        assert token in value
    else:
        assert reason in (MISSING_TOKEN, DUPLICATE_TOKEN, MALFORMED_TOKEN)
