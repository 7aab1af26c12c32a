"""Token extraction: the JWT-SVID a request carries, or a precise reason why there is none.

Pure. Envoy sends request headers lower-cased in a map, and *joins repeated headers with a comma*
(attribute_context.proto: "If multiple headers share the same key, they must be merged according to the HTTP
spec"); with the filter's ``encode_raw_headers`` it sends them as a list instead. A compact JWS never contains
a comma, so a comma means the header was sent twice (or is garbage): refused as ``duplicate_token`` instead of
guessing which copy counts -- two parties disagreeing about which token authenticated a request is how request
smuggling starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

from svidgate.errors import SvidgateError

__all__ = [
    "DUPLICATE_TOKEN",
    "MALFORMED_TOKEN",
    "MISSING_TOKEN",
    "TokenError",
    "candidate_token",
    "extract_token",
    "extract_token_raw",
    "require_compact",
]

MISSING_TOKEN: Final = "missing_token"  # noqa: S105 -- a reason code
DUPLICATE_TOKEN: Final = "duplicate_token"  # noqa: S105 -- a reason code
MALFORMED_TOKEN: Final = "malformed_token"  # noqa: S105 -- a reason code

# Three base64url segments; the validator checks canonical encoding and sizes, this only rejects what cannot
# be a compact JWS at all (spaces, quotes, a second scheme...).
_COMPACT_JWS: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# RFC 9110 5.6.3: optional whitespace around field values is space and horizontal tab.
_OWS: Final = " \t"
# Configured prefix -> its lower-cased scheme (a handful of entries: one per configured prefix).
_SCHEMES: dict[str, str] = {}


class TokenError(SvidgateError):
    """The request carries no usable token.

    Attributes:
        reason: ``missing_token``, ``duplicate_token`` or ``malformed_token`` (deny reasons, metric labels).
        detail: a human-readable explanation that never contains the header's value.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _strip_prefix(value: str, header: str, prefix: str) -> str:
    value = value.strip(_OWS)
    if not value:
        raise TokenError(MISSING_TOKEN, f"header {header!r} is empty")
    if "," in value:
        raise TokenError(DUPLICATE_TOKEN, f"header {header!r} was sent more than once (or contains a comma)")
    if prefix:
        scheme = _SCHEMES.get(prefix)
        if scheme is None:
            scheme = _SCHEMES[prefix] = prefix.strip(_OWS).lower()
        size = len(scheme)
        # RFC 9110 11.1: the auth-scheme is case-insensitive; one or more spaces separate it from the token.
        if len(value) <= size or value[size] not in _OWS or value[:size].lower() != scheme:
            raise TokenError(MALFORMED_TOKEN, f"header {header!r} does not start with {prefix.strip(_OWS)!r}")
        value = value[size:].lstrip(_OWS)
    return value


def candidate_token(value: str, header: str, prefix: str) -> str:
    """Every extraction rule except the compact-JWS shape check, which `require_compact` applies.

    Split so that the Check hot path can look the candidate up in the validated-token cache first: an entry
    exists only for a string that passed `require_compact` and the validator before, so on a hit the
    (comparatively costly) pattern match would only repeat a result already known to be a pass.

    Args:
        value: the header's value as received.
        header: the header name (for error details).
        prefix: as for `extract_token`.

    Returns:
        The value without OWS and scheme prefix.

    Raises:
        TokenError: ``missing_token`` (empty), ``duplicate_token`` (a comma), ``malformed_token`` (scheme).
    """
    return _strip_prefix(value, header, prefix)


def require_compact(token: str, header: str) -> str:
    """`token` unchanged if it has the shape of a compact JWS (three base64url segments).

    Raises:
        TokenError: ``malformed_token``.
    """
    if _COMPACT_JWS.fullmatch(token) is None:
        raise TokenError(MALFORMED_TOKEN, f"header {header!r} does not carry a compact JWS")
    return token


def extract_token(headers: Mapping[str, str], header: str, prefix: str) -> str:
    """The token in `header` of a request whose headers Envoy sent as a map.

    Args:
        headers: lower-cased header names to values (repeated headers already joined with ``,`` by Envoy).
        header: the lower-cased header name (``authorization``).
        prefix: the scheme prefix (``Bearer ``, matched case-insensitively) or empty for a bare token.

    Returns:
        The compact JWS.

    Raises:
        TokenError: ``missing_token`` (absent or empty), ``duplicate_token`` (sent twice), ``malformed_token``
            (wrong scheme, or not three base64url segments).
    """
    value = headers.get(header)
    if value is None:
        raise TokenError(MISSING_TOKEN, f"no {header!r} header")
    return require_compact(_strip_prefix(value, header, prefix), header)


def extract_token_raw(headers: Iterable[tuple[str, str]], header: str, prefix: str) -> str:
    """The token in `header` when Envoy sent the headers as a list (``encode_raw_headers: true``).

    Args:
        headers: (name, value) pairs as received, names compared case-insensitively.
        header: the lower-cased header name.
        prefix: as for `extract_token`.

    Returns:
        The compact JWS.

    Raises:
        TokenError: as for `extract_token`; two copies of the header are ``duplicate_token``.
    """
    values = [value for name, value in headers if name.lower() == header]
    if not values:
        raise TokenError(MISSING_TOKEN, f"no {header!r} header")
    if len(values) > 1:
        raise TokenError(DUPLICATE_TOKEN, f"header {header!r} was sent {len(values)} times")
    return require_compact(_strip_prefix(values[0], header, prefix), header)
