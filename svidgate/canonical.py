"""Canonical forms of an HTTP request's host and path: the form Envoy routes on, and policies compare in.

Pure string functions with no svidgate imports, so that both the configuration (which refuses a policy value
that could never match a canonical request) and the ext_authz matcher use the very same rules.

A request whose host or path has no single safe reading -- a host that is not a plain ASCII name or IP literal
with an optional numeric port (``evil.com:80@good``, Unicode look-alikes), or a path with encoded slashes or
backslashes (``%2F``, ``%5C``), a backslash, ``;`` path parameters, control characters or broken
percent-encoding -- has no canonical form (None): backends disagree on what such requests mean.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

__all__ = ["canonical_host", "normalize_host", "normalize_path", "strip_query"]

# RFC 3986 2.3 unreserved characters: percent-decoding them never changes what a URI means (6.2.2.2).
_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
# Decoded or raw, these mean different things to different backends (a segment separator, a path parameter,
# a string terminator): a path containing them has no single reading.
_AMBIGUOUS_CHARS: Final = frozenset("/\\;")
# A path that is already canonical: segments of plain characters, none of them "." or "..". Most requests are
# like this, and a fullmatch is much cheaper than the general algorithm below.
_CANONICAL_PATH = re.compile(r"(?:/(?!\.\.?(?:/|$))[A-Za-z0-9._~!$&'()*+,=:@-]+)*/?")
_PORT = re.compile(r"[0-9]{0,5}")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def normalize_host(host: str) -> str:
    """Lower-case a Host/:authority value and strip its port and trailing dot (``[::1]:80`` -> ``::1``).

    Lenient, for display (``svidgate explain``); matching uses the strict `canonical_host`.

    Args:
        host: the request's host as Envoy sends it.

    Returns:
        The bare host name or address.
    """
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    colon = host.rfind(":")
    # One colon is a port; more than one is a bare IPv6 address, which carries no port without brackets.
    if colon >= 0 and host.find(":") == colon:
        host = host[:colon]
    return host.rstrip(".")


def canonical_host(host: str) -> str | None:
    """The host a Host/:authority value names, in the form policies are compared in, or None if unsafe.

    ASCII only, lower-cased, port and one trailing dot stripped, IPv6 literals in their compressed form.
    Non-ASCII is refused rather than case-folded: ``str.lower`` maps the Kelvin sign to ``k`` and leaves
    full-width dots alone, so a Unicode host could compare equal to a name it is not (IDNA 2008 maps such
    characters; Envoy does not, and neither do we). Anything that is not a DNS name or IP literal with an
    optional numeric port (``evil.com:80@good``, ``a..b``, ``host:port:x``) is refused too.

    Args:
        host: the request's host as Envoy sends it.

    Returns:
        The canonical host ("" when the request has none), or None when it has no single safe reading.
    """
    host = host.strip()
    if not host:
        return ""
    if not host.isascii():
        return None
    host = host.lower()
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1 :]
        if end < 0 or (rest and (rest[0] != ":" or _PORT.fullmatch(rest[1:]) is None)):
            return None
        return _ipv6(host[1:end])
    if host.count(":") > 1:
        return _ipv6(host)  # a bare IPv6 address (no port without brackets)
    name, _, port = host.partition(":")
    if _PORT.fullmatch(port) is None:
        return None
    if name.endswith("."):
        name = name[:-1]
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return name


def _ipv6(text: str) -> str | None:
    if "%" in text:
        return None  # a zone ID ("fe80::1%eth0") names an interface of the client's host, not a server
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        return None


def normalize_path(path: str) -> str | None:
    """A request target's path in canonical form (what Envoy routes on with ``normalize_path`` and
    ``merge_slashes``), or None when it has no single safe reading.

    Query and fragment are cut; percent-encoded unreserved characters are decoded and other escapes
    upper-cased (RFC 3986 6.2.2); runs of slashes become one; ``.`` and ``..`` segments are removed (RFC 3986
    5.2.4). An empty path is ``/``. Refused: an encoded ``/``, ``\\`` or ``;`` (``%2F``, ``%5C``, ``%3B``),
    a raw ``\\`` or ``;``, control characters (raw or encoded), raw spaces, non-ASCII, broken escapes, and
    a path that does not start with ``/`` (``*``, absolute-form).

    Args:
        path: the request target (``:path``) as Envoy sends it.

    Returns:
        The canonical path, or None.
    """
    path = strip_query(path)
    if _CANONICAL_PATH.fullmatch(path) is not None and "//" not in path:
        return path or "/"
    if not path.startswith("/") or not path.isascii():
        return None
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        char = path[i]
        if char == "%":
            digits = path[i + 1 : i + 3]
            if len(digits) != 2 or not _HEX.issuperset(digits):
                return None
            decoded = chr(int(digits, 16))
            if decoded in _UNRESERVED:
                out.append(decoded)
            elif decoded in _AMBIGUOUS_CHARS or decoded < " " or decoded == "\x7f":
                return None
            else:
                out.append("%" + digits.upper())
            i += 3
            continue
        if (char in _AMBIGUOUS_CHARS and char != "/") or char <= " " or char == "\x7f":
            return None
        out.append(char)
        i += 1
    merged = re.sub(r"/{2,}", "/", "".join(out))
    return _remove_dot_segments(merged)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path (starts with "/", no empty segments but a trailing one)."""
    segments = path.split("/")[1:]
    kept: list[str] = []
    for segment in segments:
        if segment == ".":
            continue
        if segment == "..":
            if kept:
                kept.pop()
            continue
        kept.append(segment)
    result = "/" + "/".join(kept)
    # "/a/b/.." is "/a/": a final dot segment leaves the directory, with its slash.
    if segments[-1] in (".", "..") and not result.endswith("/"):
        result += "/"
    return result


def strip_query(path: str) -> str:
    """The path of a request target without its query string and fragment."""
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    return path
