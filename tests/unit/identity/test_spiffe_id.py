"""SPIFFE IDs and trust domains against SPIFFE-ID.md (sections 2.1-2.4) and go-spiffe's spiffeid tests."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from svidgate.errors import SpiffeIdError
from svidgate.identity.spiffe_id import (
    MAX_SPIFFE_ID_LENGTH,
    MAX_TRUST_DOMAIN_LENGTH,
    SpiffeId,
    TrustDomain,
)

TD_CHARS = string.ascii_lowercase + string.digits + ".-_"
PATH_CHARS = string.ascii_letters + string.digits + ".-_"

trust_domain_names = st.text(TD_CHARS, min_size=1, max_size=40)
segments = st.text(PATH_CHARS, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
paths = st.lists(segments, max_size=6).map(lambda segs: "".join("/" + s for s in segs))


@pytest.mark.parametrize(
    ("text", "trust_domain", "path"),
    [
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://example.org/workload", "example.org", "/workload"),
        ("spiffe://example.org/ns/prod/sa/web", "example.org", "/ns/prod/sa/web"),
        ("spiffe://a/B/c", "a", "/B/c"),  # paths are case-sensitive and may be upper case
        ("spiffe://1.2.3.4/x", "1.2.3.4", "/x"),  # 2.1: dotted quads are just names
        ("spiffe://under_score-dash.9/a.b/c-d/e_f/...x", "under_score-dash.9", "/a.b/c-d/e_f/...x"),
        ("spiffe://example.org/spiffe", "example.org", "/spiffe"),
    ],
)
def test_valid_ids(text: str, trust_domain: str, path: str) -> None:
    spiffe_id = SpiffeId.parse(text)
    assert spiffe_id.trust_domain == TrustDomain(trust_domain)
    assert spiffe_id.path == path
    assert str(spiffe_id) == text
    assert SpiffeId(TrustDomain(trust_domain), path) == spiffe_id
    assert hash(SpiffeId.parse(text)) == hash(spiffe_id)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("example.org/path", "scheme must be 'spiffe://'"),
        ("http://example.org/path", "scheme must be 'spiffe://'"),
        ("spiffe:example.org/path", "scheme must be 'spiffe://'"),  # go-spiffe: missing_double_slash
        ("spiffe:/example.org/path", "scheme must be 'spiffe://'"),
        ("SPIFFE://example.org/path", "lower-case 'spiffe'"),
        ("Spiffe://example.org/path", "lower-case 'spiffe'"),
        ("spiffe://", "trust domain is empty"),
        ("spiffe:///path", "trust domain is empty"),
        ("spiffe://Example.org/path", "lower case"),
        ("spiffe://EXAMPLE.ORG", "lower case"),
        ("spiffe://example.org:8080/path", "port"),
        ("spiffe://example.org:/path", "port"),  # go-spiffe: empty_port
        ("spiffe://user@example.org/path", "userinfo"),
        ("spiffe://user:password@example.org/path", "userinfo"),
        ("spiffe://example.org/path?query=1", "query"),
        ("spiffe://example.org/path?", "query"),
        ("spiffe://example.org/path#fragment", "fragment"),
        ("spiffe://example.org#fragment", "fragment"),
        ("spiffe://example.org/pa%20th", "percent-encoding"),
        ("spiffe://example.org/path%2F", "percent-encoding"),
        ("spiffe://ex%41mple.org/path", "percent-encoding"),
        ("spiffe://example.org/", "trailing '/'"),
        ("spiffe://example.org/path/", "trailing '/'"),
        ("spiffe://example.org//path", "empty path segments"),
        ("spiffe://example.org/a//b", "empty path segments"),
        ("spiffe://example.org/.", "'.' and '..'"),
        ("spiffe://example.org/..", "'.' and '..'"),
        ("spiffe://example.org/a/./b", "'.' and '..'"),
        ("spiffe://example.org/a/../b", "'.' and '..'"),
        ("spiffe://example.org/path\n", "invalid character '\\n'"),
        ("spiffe://example.org\n", "invalid character '\\n'"),
        ("spiffe://example.org/path\r\n", "invalid character '\\r'"),
        (" spiffe://example.org/path", "scheme"),
        ("spiffe://example.org/pa th", "invalid character ' '"),
        ("spiffe://example.org/path\x00", "invalid character '\\x00'"),
        ("spiffe://example.org/pa:th", "invalid character ':'"),  # old go-spiffe allowed sub-delims
        ("spiffe://example.org/pa@th", "invalid character '@'"),
        ("spiffe://example.org/p!a$t&h'(e)l*e+m,e;n=t", "invalid character '!'"),
        ("spiffe://example.org/elem[ent", "invalid character '['"),
        ("spiffe://exa mple.org/path", "invalid character ' '"),
        ("spiffe://[::1]/path", "any ':'"),  # 2.1: IPv6 literals are excluded
        ("spiffe://example.org/p\\ath", "invalid character '\\\\'"),
        # Non-ASCII look-alikes: Cyrillic ie (U+0435), fullwidth solidus, Greek omicron, a combining mark.
        ("spiffe://\u0435xample.org/path", "ASCII only"),
        ("spiffe://example.org\uff0fpath", "ASCII only"),
        ("spiffe://example.org/\u03bfrders", "ASCII only"),
        ("spiffe://example.org/cafe\u0301", "ASCII only"),
        ("spiffe://example.org/caf\u00e9", "ASCII only"),
    ],
)
def test_invalid_ids(text: str, message: str) -> None:
    with pytest.raises(SpiffeIdError, match=None) as excinfo:
        SpiffeId.parse(text)
    assert message in str(excinfo.value)


def test_length_limits_are_2048_bytes_for_ids_and_255_for_trust_domains() -> None:
    prefix = "spiffe://example.org"
    longest_path = "/" + "a" * (MAX_SPIFFE_ID_LENGTH - len(prefix) - 1)
    assert len(str(SpiffeId.parse(prefix + longest_path))) == MAX_SPIFFE_ID_LENGTH
    with pytest.raises(SpiffeIdError, match="longer than 2048"):
        SpiffeId.parse(prefix + longest_path + "a")
    with pytest.raises(SpiffeIdError, match="longer than 2048"):
        SpiffeId(TrustDomain("example.org"), longest_path + "a")
    # Many short segments count the same as one long one.
    many = "/a" * ((MAX_SPIFFE_ID_LENGTH - len(prefix)) // 2)
    SpiffeId.parse(prefix + many)
    with pytest.raises(SpiffeIdError, match="longer than 2048"):
        SpiffeId.parse(prefix + many + "/a")

    assert TrustDomain("a" * MAX_TRUST_DOMAIN_LENGTH).name == "a" * 255
    with pytest.raises(SpiffeIdError, match="longer than 255"):
        TrustDomain("a" * (MAX_TRUST_DOMAIN_LENGTH + 1))
    with pytest.raises(SpiffeIdError, match="longer than 255"):
        SpiffeId.parse("spiffe://" + "a" * 256 + "/x")


def test_error_messages_quote_long_input_truncated() -> None:
    text = "spiffe://example.org/" + "x" * 3000
    with pytest.raises(SpiffeIdError) as excinfo:
        SpiffeId.parse(text)
    assert len(str(excinfo.value)) < 200


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("example.org", "example.org"),
        ("spiffe://example.org", "example.org"),
        ("spiffe://example.org/some/workload", "example.org"),
    ],
)
def test_trust_domain_parse_accepts_a_name_or_an_id(text: str, name: str) -> None:
    trust_domain = TrustDomain.parse(text)
    assert trust_domain.name == name
    assert str(trust_domain) == name
    assert str(trust_domain.id) == f"spiffe://{name}"
    assert trust_domain.id.path == ""


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Example.org",
        "example.org\n",
        "example.org/",
        "example.org:443",
        "http://example.org",
        "spiffe://Example.org",
        "spiffe://",
        "exämple.org",
        "example.org ",
    ],
)
def test_invalid_trust_domains(text: str) -> None:
    with pytest.raises(SpiffeIdError):
        TrustDomain.parse(text)


@pytest.mark.parametrize("bad", [None, 42, b"spiffe://example.org/x"])
def test_non_string_input_is_a_spiffe_id_error_not_a_type_error(bad: object) -> None:
    with pytest.raises(SpiffeIdError, match="must be a string"):
        SpiffeId.parse(bad)  # type: ignore[arg-type]
    with pytest.raises(SpiffeIdError, match="must be a string"):
        TrustDomain.parse(bad)  # type: ignore[arg-type]
    with pytest.raises(SpiffeIdError):
        TrustDomain(bad)  # type: ignore[arg-type]


def test_direct_construction_validates() -> None:
    with pytest.raises(SpiffeIdError):
        SpiffeId(TrustDomain("example.org"), "no-leading-slash")
    with pytest.raises(SpiffeIdError):
        SpiffeId(TrustDomain("example.org"), "/a/")
    with pytest.raises(SpiffeIdError, match="must be a TrustDomain"):
        SpiffeId("example.org", "/a")  # type: ignore[arg-type]


def test_member_of_and_equality() -> None:
    td = TrustDomain("example.org")
    assert SpiffeId.parse("spiffe://example.org/a").member_of(td)
    assert SpiffeId.parse("spiffe://example.org").member_of(td)
    assert not SpiffeId.parse("spiffe://other.example.org/a").member_of(td)
    assert not SpiffeId.parse("spiffe://example.org.evil/a").member_of(td)
    assert SpiffeId.parse("spiffe://example.org/a") != SpiffeId.parse("spiffe://example.org/A")
    assert {SpiffeId.parse("spiffe://example.org/a"): 1}[SpiffeId(td, "/a")] == 1


# -- properties -----


@given(trust_domain_names, paths)
def test_property_str_parse_round_trip(name: str, path: str) -> None:
    spiffe_id = SpiffeId(TrustDomain(name), path)
    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id
    assert TrustDomain.parse(str(spiffe_id)) == spiffe_id.trust_domain
    assert TrustDomain.parse(name).id == SpiffeId.parse(f"spiffe://{name}")


@st.composite
def invalid_ids(draw: st.DrawFn) -> str:
    """A valid ID with exactly one rule broken."""
    name = draw(trust_domain_names)
    segs = draw(st.lists(segments, min_size=1, max_size=4))
    path = "".join("/" + s for s in segs)
    breakage = draw(
        st.sampled_from(
            [
                "scheme",
                "upper_td",
                "bad_td_char",
                "bad_path_char",
                "non_ascii",
                "port",
                "userinfo",
                "query",
                "fragment",
                "percent",
                "dot_segment",
                "empty_segment",
                "trailing_slash",
                "trailing_newline",
                "empty_td",
            ]
        )
    )
    if breakage == "scheme":
        scheme = draw(st.sampled_from(["SPIFFE://", "spiffe:/", "spiffe:", "http://", "spife://", ""]))
        return f"{scheme}{name}{path}"
    if breakage == "upper_td":
        index = draw(st.integers(0, len(name) - 1))
        upper = name[:index] + draw(st.sampled_from(string.ascii_uppercase)) + name[index + 1 :]
        return f"spiffe://{upper}{path}"
    if breakage == "bad_td_char":
        char = draw(st.characters(codec="ascii").filter(lambda c: c not in TD_CHARS and c not in "/"))
        index = draw(st.integers(0, len(name)))
        return f"spiffe://{name[:index]}{char}{name[index:]}{path}"
    if breakage == "bad_path_char":
        char = draw(st.characters(codec="ascii").filter(lambda c: c not in PATH_CHARS and c != "/"))
        return f"spiffe://{name}{path}{char}x"
    if breakage == "non_ascii":
        char = draw(st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF, exclude_categories=["Cs"]))
        where = draw(st.booleans())
        return f"spiffe://{name}{char}{path}" if where else f"spiffe://{name}{path}{char}"
    if breakage == "port":
        return f"spiffe://{name}:{draw(st.integers(0, 65535))}{path}"
    if breakage == "userinfo":
        return f"spiffe://user@{name}{path}"
    if breakage == "query":
        return f"spiffe://{name}{path}?{draw(st.text(PATH_CHARS, max_size=5))}"
    if breakage == "fragment":
        return f"spiffe://{name}{path}#{draw(st.text(PATH_CHARS, max_size=5))}"
    if breakage == "percent":
        return f"spiffe://{name}{path}%{draw(st.sampled_from(['2F', '41', '', '5u']))}"
    if breakage == "dot_segment":
        return f"spiffe://{name}{path}/{draw(st.sampled_from(['.', '..']))}"
    if breakage == "empty_segment":
        return f"spiffe://{name}/{path}"
    if breakage == "trailing_slash":
        return f"spiffe://{name}{path}/"
    if breakage == "trailing_newline":
        return f"spiffe://{name}{path}\n"
    return f"spiffe://{path}"


@given(invalid_ids())
def test_property_every_invalid_form_is_rejected(text: str) -> None:
    with pytest.raises(SpiffeIdError):
        SpiffeId.parse(text)


@given(st.text(max_size=60))
def test_property_arbitrary_text_is_parsed_or_rejected_cleanly(text: str) -> None:
    try:
        spiffe_id = SpiffeId.parse(text)
    except SpiffeIdError:
        return
    assert str(spiffe_id) == text
