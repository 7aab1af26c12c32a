"""Structured logs: one line per event, as JSON lines or logfmt, with a guard that no secret is ever written.

Code everywhere logs events as a short dotted name plus structured fields::

    log.info("sds.nack", extra={"fields": {"resource": "default", "error_detail": "..."}})

`StructuredFormatter` renders the event name, level, logger, time and fields. Before a line leaves the
process, `redact()` replaces anything that looks like key material or a token:

- a PEM private key block (``-----BEGIN ... PRIVATE KEY-----`` up to its END line, or to the end of the text);
- a JWT / JWS in compact form (three base64url parts, the first starting with ``eyJ`` -- the base64url of
  ``{"``), so a token pasted into an error message or a header dump never reaches the log;
- a long base64 run (DER keys and certificates encoded in a message), which no legitimate event field carries.

Bytes values are never rendered, only their length. The guard runs on every string value and, as a second
line of defence, on the whole rendered line. This module must not import the services.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, Literal, TextIO

from svidgate.errors import ConfigError

__all__ = [
    "LogFormat",
    "StructuredFormatter",
    "configure_logging",
    "redact",
]

LogFormat = Literal["json", "logfmt"]

REDACTED_PRIVATE_KEY = "[REDACTED-PRIVATE-KEY]"
REDACTED_JWT = "[REDACTED-JWT]"
REDACTED_BASE64 = "[REDACTED-BASE64]"

# Up to the END line when there is one; otherwise everything after BEGIN (a truncated key is still a key).
# `\\n` covers a PEM already JSON-escaped by a caller.
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END[A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
# "eyJ" is base64url("{\"") -- every JOSE header starts so. The signature part may be empty (alg none).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# A PKCS#8 P-256 key is 138 bytes of DER (184 base64 characters); 100 characters (75 bytes) catches every key
# type svidgate handles while leaving SPIFFE IDs, hashes (64 hex) and nonces alone. Requiring a digit and an
# upper-case letter keeps long lower-case paths readable.
_BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{100,}={0,2}")

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _redact_base64(match: re.Match[str]) -> str:
    text = match.group(0)
    if any(c.isdigit() for c in text) and any(c.isupper() for c in text):
        return REDACTED_BASE64
    return text


def redact(text: str) -> str:
    """Replace PEM private keys, compact JWTs and long base64 runs in `text` with markers.

    Args:
        text: any string about to be logged.

    Returns:
        `text` with every secret-looking span replaced; unchanged when there is none.
    """
    if "PRIVATE KEY" in text:
        text = _PEM_PRIVATE_KEY.sub(REDACTED_PRIVATE_KEY, text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED_JWT, text)
    if len(text) >= 100:
        text = _BASE64_RUN.sub(_redact_base64, text)
    return text


def _plain(value: Any, depth: int = 0) -> Any:
    """Turn a field value into JSON-able data, redacting every string on the way."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes | bytearray | memoryview):
        # Raw bytes in a log are almost always key material or a DER blob; say how big, never what.
        return f"<{len(value)} bytes>"
    if depth < 4:
        if isinstance(value, Mapping):
            return {redact(str(k)): _plain(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [_plain(v, depth + 1) for v in value]
    return redact(str(value))


# Attributes every LogRecord has; anything else passed through `extra=` that is not "fields" is ignored on
# purpose so that an accidental `extra={"token": ...}` cannot leak.
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


def _logfmt_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | dict):
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    else:
        text = str(value)
    if text and not any(c in text for c in ' ="\\\n\r\t') and text.isprintable():
        return text
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


class StructuredFormatter(logging.Formatter):
    """Renders records as JSON lines or logfmt: ``ts``, ``level``, ``logger``, ``event``, then the fields.

    Args:
        fmt: ``json`` (one JSON object per line) or ``logfmt`` (``key=value`` pairs).
    """

    def __init__(self, fmt: LogFormat = "json") -> None:
        super().__init__()
        if fmt not in ("json", "logfmt"):
            raise ConfigError(f"log.format: must be json or logfmt, not {fmt!r}")
        self.log_format: LogFormat = fmt

    def _entries(self, record: logging.LogRecord) -> dict[str, Any]:
        entries: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                name = _KEY_CHARS.sub("_", str(key)) or "_"
                # A field never overwrites the envelope: a field named "level" becomes "field.level".
                entries[name if name not in entries else f"field.{name}"] = _plain(value)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            entries["error"] = redact(f"{type(exc).__name__}: {exc}")
            # Tracebacks only for unexpected errors (ERROR and above); expected failures are one line.
            if record.levelno >= logging.ERROR:
                entries["traceback"] = redact("".join(traceback.format_exception(*record.exc_info)))
        return entries

    def format(self, record: logging.LogRecord) -> str:
        entries = self._entries(record)
        if self.log_format == "json":
            line = json.dumps(entries, ensure_ascii=False, default=str, separators=(",", ":"))
        else:
            line = " ".join(f"{key}={_logfmt_value(value)}" for key, value in entries.items())
        # Second line of defence: the whole rendered line, in case a value's str() built a secret from parts.
        return redact(line)


class _RedactingHandler(logging.StreamHandler[TextIO]):
    """A stream handler that never raises into the caller and marks itself as svidgate's."""

    svidgate_handler = True


def parse_level(level: str) -> int:
    """Map a config level name to a `logging` level.

    Raises:
        ConfigError: the name is not debug, info, warning, error or critical.
    """
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ConfigError(f"log.level: must be one of debug, info, warning, error, not {level!r}") from None


def configure_logging(
    fmt: LogFormat = "json",
    level: str = "info",
    stream: TextIO | None = None,
) -> logging.Handler:
    """Install svidgate's structured handler on the root logger, replacing one installed earlier.

    Args:
        fmt: ``json`` or ``logfmt``.
        level: ``debug``, ``info``, ``warning``, ``error``.
        stream: where lines go; standard error by default (containers collect it).

    Returns:
        The handler, so that a caller (a test) can remove it.

    Raises:
        ConfigError: unknown format or level.
    """
    formatter = StructuredFormatter(fmt)
    numeric = parse_level(level)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "svidgate_handler", False):
            root.removeHandler(existing)
    handler = _RedactingHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(numeric)
    # grpc's Python layer logs every handler exception with a traceback at ERROR; keep it, but quiet its
    # per-connection debug chatter unless debug was asked for.
    logging.getLogger("grpc").setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)
    return handler


class _ClientErrorLine(logging.Filter):
    """Turns aiohttp's report of a request it could not parse (a traceback at ERROR for an over-long line, at
    DEBUG for others) into one debug line without a traceback: the client got its 400, and whoever can reach
    the port must not be able to fill the log with tracebacks."""

    def __init__(self, event: str) -> None:
        super().__init__()
        self.event = event

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            exc = record.exc_info[1]
            reason = str(exc).strip().splitlines()[0][:120] if exc is not None else ""
            record.fields = {"error": type(exc).__name__, "reason": reason}
            record.msg, record.args = self.event, ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def aiohttp_server_logger(name: str, event: str) -> logging.Logger:
    """The logger to hand an aiohttp server: a request it cannot parse becomes one debug line `event`.

    Args:
        name: the logger's name.
        event: the event of that line (``http.bad_request``).
    """
    logger = logging.getLogger(name)
    if not any(isinstance(f, _ClientErrorLine) for f in logger.filters):
        logger.addFilter(_ClientErrorLine(event))
    return logger
