"""SPIFFE IDs and trust domain names, exactly as SPIFFE-ID.md defines them.

Stricter than py-spiffe where the spec is: upper-case trust domains, trailing newlines and any character
outside the spec's ASCII sets are rejected, not normalised. Once you hold a `SpiffeId` it is valid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from svidgate.errors import SpiffeIdError

_SCHEME = "spiffe://"
# SPIFFE-ID.md 2.1: trust domain names are lowercase letters, digits, dots, dashes and underscores.
# `\Z` (not `$`) so that "example.org\n" does not match.
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+\Z")
# SPIFFE-ID.md 2.2: path segments are letters, digits, dots, dashes and underscores.
_SEGMENT_RE = re.compile(r"[a-zA-Z0-9._-]+\Z")
# SPIFFE-ID.md 2.3: URIs of at most 2048 bytes; trust domains (DNS-like) of at most 255 characters.
MAX_SPIFFE_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255


def _check_trust_domain_name(name: str, what: str) -> None:
    if not isinstance(name, str):
        raise SpiffeIdError(f"trust domain must be a string, not {type(name).__name__}")
    if not name:
        raise SpiffeIdError(f"{what}: trust domain is empty")
    if len(name) > MAX_TRUST_DOMAIN_LENGTH:
        raise SpiffeIdError(f"{what}: trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} characters")
    if _TRUST_DOMAIN_RE.match(name) is None:
        bad = next((c for c in name if _TRUST_DOMAIN_RE.match(c) is None), "")
        hint = " (trust domains are lower case)" if bad.isascii() and bad.isupper() else ""
        raise SpiffeIdError(f"{what}: trust domain has the invalid character {bad!r}{hint}")


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A trust domain name such as ``example.org`` (never with the ``spiffe://`` prefix)."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain_name(self.name, repr(self.name))

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parse a trust domain name, or the trust domain of a SPIFFE ID (``spiffe://td`` or ``spiffe://td/p``).

        Raises:
            SpiffeIdError: the text is neither a valid trust domain name nor a valid SPIFFE ID.
        """
        if not isinstance(text, str):
            raise SpiffeIdError(f"trust domain must be a string, not {type(text).__name__}")
        if "://" in text:
            return SpiffeId.parse(text).trust_domain
        return cls(text)

    @property
    def id(self) -> SpiffeId:
        """The SPIFFE ID of the trust domain itself (``spiffe://td``), as used for bundles and federation."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A SPIFFE ID: a trust domain and a path that is empty or a sequence of ``/segment``."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise SpiffeIdError(f"trust_domain must be a TrustDomain, not {type(self.trust_domain).__name__}")
        if not isinstance(self.path, str):
            raise SpiffeIdError(f"path must be a string, not {type(self.path).__name__}")
        _check_path(self.path, repr(self.path))
        if len(_SCHEME) + len(self.trust_domain.name) + len(self.path) > MAX_SPIFFE_ID_LENGTH:
            raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_SPIFFE_ID_LENGTH} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse and validate a SPIFFE ID URI.

        Raises:
            SpiffeIdError: with the rule the text breaks; the text itself is quoted, truncated.
        """
        if not isinstance(text, str):
            raise SpiffeIdError(f"SPIFFE ID must be a string, not {type(text).__name__}")
        shown = repr(text if len(text) <= 80 else text[:77] + "...")
        if not text:
            raise SpiffeIdError("SPIFFE ID is empty")
        if not text.isascii():
            raise SpiffeIdError(f"{shown}: SPIFFE IDs are ASCII only")
        if len(text) > MAX_SPIFFE_ID_LENGTH:
            raise SpiffeIdError(f"{shown}: SPIFFE ID is longer than {MAX_SPIFFE_ID_LENGTH} bytes")
        if not text.startswith(_SCHEME):
            if text.lower().startswith(_SCHEME):
                raise SpiffeIdError(f"{shown}: the scheme must be lower-case 'spiffe'")
            raise SpiffeIdError(f"{shown}: the scheme must be 'spiffe://'")
        rest = text[len(_SCHEME) :]
        slash = rest.find("/")
        authority, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        if "@" in authority:
            raise SpiffeIdError(f"{shown}: userinfo is not allowed")
        if ":" in authority:
            raise SpiffeIdError(f"{shown}: a port (any ':') is not allowed in the trust domain")
        for char, what in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
            if char in rest:
                raise SpiffeIdError(f"{shown}: {what} is not allowed")
        _check_trust_domain_name(authority, shown)
        _check_path(path, shown)
        return cls(TrustDomain(authority), path)

    def member_of(self, trust_domain: TrustDomain) -> bool:
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain.name}{self.path}"


def _check_path(path: str, shown: str) -> None:
    if not path:
        return
    if not path.startswith("/"):
        raise SpiffeIdError(f"{shown}: the path must start with '/'")
    for segment in path[1:].split("/"):
        if segment == "":
            raise SpiffeIdError(f"{shown}: empty path segments and a trailing '/' are not allowed")
        if segment in (".", ".."):
            raise SpiffeIdError(f"{shown}: '.' and '..' path segments are not allowed")
        if _SEGMENT_RE.match(segment) is None:
            bad = next(c for c in segment if _SEGMENT_RE.match(c) is None)
            raise SpiffeIdError(f"{shown}: the path has the invalid character {bad!r}")
