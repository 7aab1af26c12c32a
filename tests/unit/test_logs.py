"""Structured log rendering (JSON lines, logfmt) and the redaction guard."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st

from svidgate.errors import ConfigError
from svidgate.logs import (
    REDACTED_BASE64,
    REDACTED_JWT,
    REDACTED_PRIVATE_KEY,
    StructuredFormatter,
    configure_logging,
    parse_level,
    redact,
)

# A syntactically real compact JWS (header {"alg":"ES256","kid":"k1","typ":"JWT"}); its content is irrelevant.
TOKEN = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIiwidHlwIjoiSldUIn0"
    ".eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy93ZWIiLCJhdWQiOlsiYmFja2VuZCJdLCJleHAiOjE4MDAwMDAwMDB9"
    ".MEUCIQDx7QJ1rQ2sLq8pWz0cYw4n5sS9T2H3Yb7qv3KpJ0c0sQIgM3kQ9xq"
)


def _pem_key(kind: str = "ec") -> str:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _der_b64(urlsafe: bool = False) -> str:
    der = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(der).decode()


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = configure_logging("json", "debug", stream)
    try:
        yield logging.getLogger("svidgate.test"), stream, handler
    finally:
        logging.getLogger().removeHandler(handler)


def _record(msg: str = "sds.nack", fields: object = None, level: int = logging.INFO) -> logging.LogRecord:
    record = logging.LogRecord("svidgate.sds", level, __file__, 1, msg, None, None)
    if fields is not None:
        record.fields = fields
    return record


class TestRedact:
    def test_pem_private_key_is_removed_whole(self) -> None:
        pem = _pem_key()
        out = redact(f"loaded {pem} from disk")
        assert REDACTED_PRIVATE_KEY in out
        assert "PRIVATE KEY" not in out.replace(REDACTED_PRIVATE_KEY, "")
        assert pem.splitlines()[1] not in out
        assert out.startswith("loaded ")
        assert out.endswith(" from disk")

    def test_rsa_and_legacy_headers(self) -> None:
        pem = _pem_key("rsa").replace("BEGIN PRIVATE KEY", "BEGIN RSA PRIVATE KEY")
        pem = pem.replace("END PRIVATE KEY", "END RSA PRIVATE KEY")
        assert redact(pem).strip() == REDACTED_PRIVATE_KEY

    def test_truncated_pem_is_still_removed(self) -> None:
        pem = _pem_key()
        truncated = pem[: len(pem) // 2]
        out = redact("x " + truncated)
        assert out == "x " + REDACTED_PRIVATE_KEY

    def test_json_escaped_pem(self) -> None:
        escaped = json.dumps(_pem_key())
        out = redact(escaped)
        assert "MI" not in out.replace(REDACTED_PRIVATE_KEY, "")

    def test_jwt(self) -> None:
        assert redact(f"authorization: Bearer {TOKEN}") == f"authorization: Bearer {REDACTED_JWT}"

    def test_unsigned_jwt(self) -> None:
        assert redact("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.") == REDACTED_JWT

    @pytest.mark.parametrize("urlsafe", [False, True])
    def test_base64_der_key(self, urlsafe: bool) -> None:
        b64 = _der_b64(urlsafe)
        assert redact(f"key={b64}") == f"key={REDACTED_BASE64}"

    @pytest.mark.parametrize(
        "text",
        [
            "spiffe://example.org/ns/default/sa/web",
            "sha256:" + "ab" * 32,
            "resource=default version=3f2a nonce=17",
            "spiffe://example.org/" + "a" * 150,  # long, but a path: no digit and no upper case
            "",
        ],
    )
    def test_ordinary_text_is_unchanged(self, text: str) -> None:
        assert redact(text) == text

    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
    def test_short_text_never_changes_unless_it_holds_a_marker(self, text: str) -> None:
        if "PRIVATE KEY" not in text and "eyJ" not in text:
            assert redact(text) == text


class TestFormatter:
    def test_json_line(self) -> None:
        line = StructuredFormatter("json").format(_record(fields={"resource": "default", "count": 2}))
        entry = json.loads(line)
        assert entry["event"] == "sds.nack"
        assert entry["level"] == "info"
        assert entry["logger"] == "svidgate.sds"
        assert entry["resource"] == "default"
        assert entry["count"] == 2
        assert entry["ts"].endswith("Z")
        assert "\n" not in line

    def test_logfmt_line(self) -> None:
        line = StructuredFormatter("logfmt").format(
            _record(fields={"resource": "default", "error": 'bad "thing"\nhere', "ok": True, "n": None})
        )
        assert line.startswith("ts=")
        assert " level=info logger=svidgate.sds event=sds.nack resource=default " in line
        assert 'error="bad \\"thing\\"\\nhere"' in line
        assert "ok=true" in line
        assert "n=null" in line
        assert "\n" not in line

    def test_fields_never_override_the_envelope(self) -> None:
        entry = json.loads(StructuredFormatter("json").format(_record(fields={"level": "x", "event": "y"})))
        assert entry["level"] == "info"
        assert entry["event"] == "sds.nack"
        assert entry["field.level"] == "x"
        assert entry["field.event"] == "y"

    def test_bytes_are_never_rendered(self) -> None:
        entry = json.loads(StructuredFormatter("json").format(_record(fields={"der": b"\x30\x82secret"})))
        assert entry["der"] == "<8 bytes>"

    def test_nested_values_are_redacted(self) -> None:
        fields = {"headers": {"authorization": f"Bearer {TOKEN}"}, "list": [_pem_key()]}
        line = StructuredFormatter("json").format(_record(fields=fields))
        assert TOKEN not in line
        assert "PRIVATE KEY-----" not in line
        entry = json.loads(line)
        assert entry["headers"]["authorization"] == f"Bearer {REDACTED_JWT}"
        assert entry["list"] == [REDACTED_PRIVATE_KEY + "\n"]

    def test_message_is_redacted(self) -> None:
        line = StructuredFormatter("logfmt").format(_record(msg=f"token {TOKEN}"))
        assert TOKEN not in line

    def test_exception_is_one_line_and_redacted(self) -> None:
        try:
            raise ValueError(f"bad token {TOKEN}")
        except ValueError:
            import sys

            record = logging.LogRecord("x", logging.WARNING, __file__, 1, "authz.error", None, sys.exc_info())
        entry = json.loads(StructuredFormatter("json").format(record))
        assert entry["error"] == f"ValueError: bad token {REDACTED_JWT}"
        assert "traceback" not in entry

    def test_unknown_format(self) -> None:
        with pytest.raises(ConfigError, match=r"log\.format"):
            StructuredFormatter("xml")  # type: ignore[arg-type]


class TestConfigure:
    def test_end_to_end_through_logging(
        self, capture: tuple[logging.Logger, io.StringIO, logging.Handler]
    ) -> None:
        logger, stream, _ = capture
        logger.info("authz.decision", extra={"fields": {"token": TOKEN, "policy": "p"}})
        logger.debug("x.debug")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [e["event"] for e in lines] == ["authz.decision", "x.debug"]
        assert lines[0]["token"] == REDACTED_JWT
        assert TOKEN not in stream.getvalue()

    def test_reconfigure_replaces_the_handler(self) -> None:
        first, second = io.StringIO(), io.StringIO()
        h1 = configure_logging("json", "info", first)
        h2 = configure_logging("logfmt", "info", second)
        try:
            assert h1 not in logging.getLogger().handlers
            logging.getLogger("svidgate.x").info("one.event")
            assert first.getvalue() == ""
            assert "event=one.event" in second.getvalue()
        finally:
            logging.getLogger().removeHandler(h2)

    def test_levels(self) -> None:
        assert parse_level("INFO") == logging.INFO
        assert parse_level("warn") == logging.WARNING
        with pytest.raises(ConfigError, match=r"log\.level"):
            parse_level("loud")
