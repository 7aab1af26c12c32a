"""JWT-SVIDs: strict validation and minting of compact JWS tokens (JWT-SVID.md).

The JWT-SVID spec restricts JOSE because its agility has caused a long series of vulnerabilities; this module
is stricter still wherever a looser reading could let two parties disagree about what a token says:

- compact serialization only, canonical unpadded base64url, UTF-8 JSON objects without duplicate keys;
- the header carries `alg` (the nine RS/ES/PS algorithms of RFC 7518 3.3-3.5), `kid` (required, as go-spiffe
  and SPIRE do) and optionally `typ` (``JWT``/``JOSE``) -- nothing else (JWT-SVID.md section 2: "Any header
  not described here ... MUST NOT be included");
- the trust domain of `sub` selects the bundle and `kid` is only a dictionary lookup in *that* bundle, so a
  key of one trust domain never verifies a token of another;
- `sub` is a workload's SPIFFE ID: a bare trust domain ID (``spiffe://td``, no path) is ``bad_subject``, as
  it is for an X.509-SVID leaf (py-spiffe accepts it);
- `exp`, `nbf` and `iat` are JSON integers (RFC 7519 NumericDate; fractions and booleans are rejected).

Every failure is a `JwtSvidError` whose `reason` is one of the stable codes below (ext_authz reports them and
labels metrics with them) and whose `detail` never contains the token.

Only `cryptography` does signature work here: pyjwt's verify step measured the same (~82 us for ES256 on the
reference machine; the signature is most of a whole validation), so it would add a code path for nothing.
Must never import gRPC or anything outside `svidgate.errors` and `svidgate.identity`.

Why one module (over 600 lines): validation and minting share the encoding rules (base64url without padding,
compact JSON, the algorithm each key type signs with), so a token svidgate mints is always one it accepts;
the reason codes below are the one list every caller reports.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from svidgate.bounded import BoundedDict
from svidgate.errors import JwtSvidError, SpiffeIdError
from svidgate.identity.bundle import MIN_RSA_BITS, Bundle
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain

# Stable reason codes (contract: ext_authz deny reasons and metric labels).
MALFORMED: Final = "malformed"
TOO_LARGE: Final = "too_large"
UNSUPPORTED_ALGORITHM: Final = "unsupported_algorithm"
BAD_TYPE: Final = "bad_type"
FORBIDDEN_HEADER: Final = "forbidden_header"
MISSING_KEY_ID: Final = "missing_key_id"
UNKNOWN_TRUST_DOMAIN: Final = "unknown_trust_domain"
UNKNOWN_KEY: Final = "unknown_key"
BAD_SIGNATURE: Final = "bad_signature"
BAD_SUBJECT: Final = "bad_subject"
MISSING_CLAIM: Final = "missing_claim"
BAD_CLAIM: Final = "bad_claim"
AUDIENCE_MISMATCH: Final = "audience_mismatch"
EXPIRED: Final = "expired"
NOT_YET_VALID: Final = "not_yet_valid"
ISSUED_IN_FUTURE: Final = "issued_in_future"

REASONS: Final = (
    MALFORMED,
    TOO_LARGE,
    UNSUPPORTED_ALGORITHM,
    BAD_TYPE,
    FORBIDDEN_HEADER,
    MISSING_KEY_ID,
    UNKNOWN_TRUST_DOMAIN,
    UNKNOWN_KEY,
    BAD_SIGNATURE,
    BAD_SUBJECT,
    MISSING_CLAIM,
    BAD_CLAIM,
    AUDIENCE_MISMATCH,
    EXPIRED,
    NOT_YET_VALID,
    ISSUED_IN_FUTURE,
)

DEFAULT_MAX_TOKEN_BYTES: Final = 8192
DEFAULT_LEEWAY: Final = 30.0

_HASHES: Final[Mapping[str, type[hashes.HashAlgorithm]]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
# JWT-SVID.md 2.1 = RFC 7518 3.3 (RS), 3.4 (ES), 3.5 (PS). Never `none`, never HMAC.
SUPPORTED_ALGORITHMS: Final = frozenset(
    f"{family}{bits}" for family in ("RS", "ES", "PS") for bits in _HASHES
)
# RFC 7518 3.4: ES256 is P-256, ES384 is P-384, ES512 is P-521 (not 512), each with its own signature length.
_EC_CURVES: Final[Mapping[str, tuple[str, int]]] = {
    "ES256": (ec.SECP256R1.name, 32),
    "ES384": (ec.SECP384R1.name, 48),
    "ES512": (ec.SECP521R1.name, 66),
}
_EC_ALG_BY_CURVE: Final = {curve: alg for alg, (curve, _) in _EC_CURVES.items()}
# Signature algorithm objects are immutable: built once per alg, not on every verification.
_ECDSA: Final = {alg: ec.ECDSA(_HASHES[alg[2:]]()) for alg in _EC_CURVES}
_ALLOWED_TYPES: Final = frozenset({"JWT", "JOSE"})
# Headers that would make the token name its own key or change how it is processed; named in the detail so an
# operator sees why a token from a misbehaving issuer is refused. Any other header is refused too (see above).
_KEY_BEARING_HEADERS: Final = ("jku", "x5u", "jwk", "x5c", "crit", "x5t", "x5t#S256", "b64", "zip", "enc")
_ALLOWED_HEADERS: Final = frozenset({"alg", "kid", "typ"})
_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]*")
_B64URL_VALUE: Final = {
    char: value
    for value, char in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}
# The bits of the last character that encode nothing, by len % 4 (2: 4 unused bits, 3: 2 unused bits).
_B64URL_UNUSED_BITS: Final = {0: 0, 2: 0x0F, 3: 0x03}
# Subjects repeat (a few workloads call a service over and over): a parsed SpiffeId is immutable, so one
# parse per distinct `sub` string serves every token that carries it. Bounded against junk subjects.
_SUBJECTS: Final[BoundedDict[str, SpiffeId]] = BoundedDict(4096)
_DETAIL_MAX: Final = 80


@dataclass(frozen=True, slots=True)
class JwtSvid:
    """A JWT-SVID whose structure (and, from `validate_jwt_svid`, signature and claims) was checked.

    Attributes:
        token: the compact JWS exactly as received; kept out of `repr()` so it never lands in a log.
        spiffe_id: the `sub` claim.
        audience: the `aud` claim as a tuple (a single string becomes a one-element tuple).
        expiry: the `exp` claim, seconds since the epoch.
        issued_at: the `iat` claim when present.
        claims: every claim of the token, read-only (not part of equality or hashing).
        key_id: the header's `kid` (for a validated token: the bundle key that verified it); empty when the
            JWT-SVID was not parsed from a token here.
    """

    token: str = field(repr=False)
    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expiry: int
    issued_at: int | None
    claims: Mapping[str, Any] = field(compare=False)
    key_id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.claims, MappingProxyType):
            object.__setattr__(self, "claims", MappingProxyType(dict(self.claims)))


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A token that passed every structural check; its signature and claim values are not checked yet."""

    signing_input: bytes
    signature: bytes
    alg: str
    kid: str
    spiffe_id: SpiffeId
    claims: dict[str, Any]


def _fail(reason: str, detail: str) -> NoReturn:
    raise JwtSvidError(reason, detail)


def _shown(value: object) -> str:
    """A claim or header value for an error detail: repr'd (control characters escaped) and truncated."""
    text = repr(value)
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 3] + "..."


def _b64url_decode(part: str, what: str) -> bytes:
    # RFC 7515 2 + appendix C: base64url without padding. We also require the canonical encoding (unused bits
    # of the last character zero): otherwise several strings decode to the same bytes, and a cache keyed by
    # the token, or a log of "the token that was denied", would not identify one token.
    if _B64URL_RE.fullmatch(part) is None:
        _fail(MALFORMED, f"{what} is not unpadded base64url")
    remainder = len(part) % 4
    if remainder == 1:
        _fail(MALFORMED, f"{what} has an impossible base64url length")
    if part and _B64URL_VALUE[part[-1]] & _B64URL_UNUSED_BITS[remainder]:
        _fail(MALFORMED, f"{what} is not canonical base64url (non-zero trailing bits)")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (
        binascii.Error,
        ValueError,
    ):  # pragma: no cover - the alphabet and length checks above rule it out
        _fail(MALFORMED, f"{what} is not valid base64url")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7515 5.2 step 4 / RFC 7519 7.2 step 3 allow either rejecting duplicate member names or taking the
    # last one; parsers disagree on which one wins, so a duplicate can show two readers two different tokens.
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _DuplicateKeyError(name)
            seen.add(name)
    return result


class _DuplicateKeyError(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _reject_constant(name: str) -> NoReturn:
    # Python's json accepts NaN/Infinity, which are not JSON (RFC 8259 6).
    raise _NonJsonConstantError(name)


class _NonJsonConstantError(Exception):
    pass


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")  # strict: RFC 7515 requires UTF-8, invalid sequences are errors
        value = _DECODER.decode(text)
    except UnicodeDecodeError:
        _fail(MALFORMED, f"{what} is not UTF-8")
    except _DuplicateKeyError as err:
        _fail(MALFORMED, f"{what} has the member {_shown(err.name)} more than once")
    except _NonJsonConstantError as err:
        _fail(MALFORMED, f"{what} contains {err}, which is not JSON")
    except RecursionError:
        _fail(MALFORMED, f"{what} is nested too deeply")
    except ValueError:  # json.JSONDecodeError, and integers longer than sys.get_int_max_str_digits()
        _fail(MALFORMED, f"{what} is not valid JSON")
    if not isinstance(value, dict):
        _fail(MALFORMED, f"{what} is not a JSON object")
    return value


def _parse(token: object, max_token_bytes: int) -> _Parsed:
    """Everything that can be checked without a key, in the order cheapest first."""
    if not isinstance(token, str):
        _fail(MALFORMED, f"token must be a str, not {type(token).__name__}")
    # The size cap comes before any decoding so that an oversized token costs one len() call. Characters
    # never outnumber UTF-8 bytes, so only a non-ASCII token needs encoding to learn its size.
    if len(token) > max_token_bytes:
        _fail(TOO_LARGE, f"token is {len(token)} bytes, the limit is {max_token_bytes}")
    if not token.isascii():
        size = len(token.encode("utf-8", "surrogatepass"))
        if size > max_token_bytes:
            _fail(TOO_LARGE, f"token is {size} bytes, the limit is {max_token_bytes}")
        _fail(MALFORMED, "token contains non-ASCII characters")
    if not token:
        _fail(MALFORMED, "token is empty")
    if token.startswith("{"):
        _fail(MALFORMED, "JWS JSON serialization is not supported; JWT-SVIDs are compact (JWT-SVID.md 5.1)")
    parts = token.split(".")
    if len(parts) == 5:
        _fail(MALFORMED, "token is a JWE; JWT-SVIDs are JWS only (JWT-SVID.md 2)")
    if len(parts) != 3:
        _fail(MALFORMED, f"token has {len(parts)} dot-separated parts, a compact JWS has 3")
    header_b64, payload_b64, signature_b64 = parts
    if not header_b64:
        _fail(MALFORMED, "header is empty")
    if not payload_b64:
        _fail(MALFORMED, "payload is empty")

    header = _json_object(_b64url_decode(header_b64, "header"), "header")
    alg = header.get("alg")
    if alg is None:
        _fail(UNSUPPORTED_ALGORITHM, "header has no alg")
    if not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS:
        _fail(UNSUPPORTED_ALGORITHM, f"alg {_shown(alg)} is not allowed; JWT-SVID allows RS*, ES* and PS*")
    extra = header.keys() - _ALLOWED_HEADERS
    if extra:
        named = [name for name in _KEY_BEARING_HEADERS if name in extra]
        shown = named[0] if named else sorted(extra)[0]
        _fail(FORBIDDEN_HEADER, f"header {_shown(shown)} is not allowed in a JWT-SVID (only alg, kid, typ)")
    # isinstance first: a JSON array or object here is unhashable and would break the set lookup.
    if "typ" in header and (not isinstance(header["typ"], str) or header["typ"] not in _ALLOWED_TYPES):
        _fail(BAD_TYPE, f"typ {_shown(header['typ'])} is not JWT or JOSE")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        _fail(MISSING_KEY_ID, "header has no kid" if kid is None else "kid is not a non-empty string")

    claims = _json_object(_b64url_decode(payload_b64, "payload"), "payload")
    signature = _b64url_decode(signature_b64, "signature")
    if "sub" not in claims:
        _fail(MISSING_CLAIM, "sub claim is missing")
    sub = claims["sub"]
    if not isinstance(sub, str):
        _fail(BAD_SUBJECT, f"sub is a {_json_type(sub)}, not a SPIFFE ID string")
    spiffe_id = _SUBJECTS.get(sub)
    if spiffe_id is None:
        try:
            spiffe_id = SpiffeId.parse(sub)
        except SpiffeIdError as err:
            _fail(BAD_SUBJECT, f"sub is not a valid SPIFFE ID: {err}")
        _SUBJECTS.put(sub, spiffe_id)
    if not spiffe_id.path:
        # A JWT-SVID names a workload, never a trust domain (JWT-SVID.md 3.1: `sub` is the workload's SPIFFE
        # ID); the X.509 leaf check refuses the same ID, and an allow rule for a whole trust domain must not
        # be satisfiable by a token that names only the trust domain.
        _fail(BAD_SUBJECT, f"sub {_shown(sub)} is a trust domain ID, not a workload's SPIFFE ID (no path)")
    return _Parsed(
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        signature=signature,
        alg=alg,
        kid=kid,
        spiffe_id=spiffe_id,
        claims=claims,
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _verify_signature(parsed: _Parsed, key: PublicKeyTypes) -> None:
    alg = parsed.alg
    family = alg[:2]
    kid = _shown(parsed.kid)
    try:
        if family == "ES":
            curve, size = _EC_CURVES[alg]
            if not isinstance(key, ec.EllipticCurvePublicKey):
                _fail(BAD_SIGNATURE, f"alg {alg} needs an EC key, but key {kid} is {_key_kind(key)}")
            if key.curve.name != curve:
                _fail(BAD_SIGNATURE, f"alg {alg} needs a {curve} key, but key {kid} is {_key_kind(key)}")
            # RFC 7518 3.4: the signature is R || S, each exactly the curve's size; DER is what OpenSSL takes.
            if len(parsed.signature) != 2 * size:
                _fail(BAD_SIGNATURE, f"an {alg} signature is {2 * size} bytes, not {len(parsed.signature)}")
            r = int.from_bytes(parsed.signature[:size], "big")
            s = int.from_bytes(parsed.signature[size:], "big")
            der = utils.encode_dss_signature(r, s)
            key.verify(der, parsed.signing_input, _ECDSA[alg])
            return
        if not isinstance(key, rsa.RSAPublicKey):
            _fail(BAD_SIGNATURE, f"alg {alg} needs an RSA key, but key {kid} is {_key_kind(key)}")
        if key.key_size < MIN_RSA_BITS:
            _fail(
                BAD_SIGNATURE, f"key {kid} is RSA-{key.key_size}; at least {MIN_RSA_BITS} bits are required"
            )
        # RFC 7518 3.3/3.5: the signature is exactly as long as the modulus.
        if len(parsed.signature) != (key.key_size + 7) // 8:
            _fail(BAD_SIGNATURE, f"signature is {len(parsed.signature)} bytes, RSA-{key.key_size} needs more")
        hash_alg = _HASHES[alg[2:]]()
        pad: padding.AsymmetricPadding
        if family == "RS":
            pad = padding.PKCS1v15()
        else:
            # RFC 7518 3.5: MGF1 with the same hash, salt as long as the hash output.
            pad = padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)
        key.verify(parsed.signature, parsed.signing_input, pad, hash_alg)
    except InvalidSignature:
        _fail(BAD_SIGNATURE, f"signature does not verify with key {kid}")
    except ValueError:  # pragma: no cover - lengths are checked above; belt and braces for OpenSSL edge cases
        _fail(BAD_SIGNATURE, f"signature cannot be checked with key {kid}")


def _key_kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    return type(key).__name__


def _int_claim(claims: Mapping[str, Any], name: str, required: bool) -> int | None:
    if name not in claims:
        if required:
            _fail(MISSING_CLAIM, f"{name} claim is missing")
        return None
    value = claims[name]
    # RFC 7519 2 allows a fractional NumericDate; JWT-SVID issuers (SPIRE, go-spiffe) write integers, and a
    # single representation keeps the comparison exact. bool is an int subclass in Python, so exclude it.
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(BAD_CLAIM, f"{name} must be an integer NumericDate, not a {_json_type(value)}")
    return value


def _audience_claim(claims: Mapping[str, Any]) -> tuple[str, ...]:
    if "aud" not in claims:
        _fail(MISSING_CLAIM, "aud claim is missing")
    aud = claims["aud"]
    # RFC 7519 4.1.3: a string or an array of strings. JWT-SVID.md 3.2: at least one value. An empty string
    # names no recipient, so it is not a value either.
    if isinstance(aud, str):
        values: list[object] = [aud]
    elif isinstance(aud, list):
        values = aud
    else:
        _fail(BAD_CLAIM, f"aud must be a string or an array of strings, not a {_json_type(aud)}")
    if not values:
        _fail(BAD_CLAIM, "aud is an empty array")
    audience: list[str] = []
    for value in values:
        if not isinstance(value, str):
            _fail(BAD_CLAIM, f"aud contains a {_json_type(value)}, not only strings")
        if not value:
            _fail(BAD_CLAIM, "aud contains an empty string")
        audience.append(value)
    return tuple(audience)


def _claims_svid(token: str, parsed: _Parsed) -> JwtSvid:
    audience = _audience_claim(parsed.claims)
    expiry = _int_claim(parsed.claims, "exp", required=True)
    assert expiry is not None  # required=True never returns None
    _int_claim(parsed.claims, "nbf", required=False)
    issued_at = _int_claim(parsed.claims, "iat", required=False)
    return JwtSvid(
        token=token,
        spiffe_id=parsed.spiffe_id,
        audience=audience,
        expiry=expiry,
        issued_at=issued_at,
        claims=MappingProxyType(parsed.claims),
        key_id=parsed.kid,
    )


def validate_jwt_svid(
    token: str,
    bundles: Mapping[TrustDomain, Bundle],
    audiences: Collection[str],
    now: float,
    leeway: float = DEFAULT_LEEWAY,
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
) -> JwtSvid:
    """Validate a JWT-SVID: structure, header, key selection, signature, then claims, audience and time.

    The trust domain of `sub` selects the bundle and `kid` the key inside it; nothing in the token can point
    at a key (no `jku`/`jwk`/`x5c`), and a key of another trust domain never verifies it. Claims other than
    `sub` are looked at only after the signature verified, so a forged token is reported as `bad_signature`.

    Args:
        token: the compact JWS (without any ``Bearer `` prefix).
        bundles: trust bundles by trust domain; their `jwt_authorities` are the verification keys.
        audiences: the token's `aud` must contain at least one of these. Empty skips the audience check
            (only for callers that check the audience themselves, such as the Workload API's
            ValidateJWTSVID). A plain string is taken as one audience, never as a set of characters.
        now: the current time in seconds since the epoch (inject a clock).
        leeway: clock skew tolerated, in seconds, for `exp`, `nbf` and `iat`.
        max_token_bytes: tokens longer than this are refused before anything is decoded.

    Returns:
        The validated `JwtSvid`.

    Raises:
        JwtSvidError: with one of the `REASONS` codes; the detail never contains the token.
        ValueError: `now` or `leeway` is NaN or infinite (a caller bug; refused rather than failing open).
    """
    if not math.isfinite(now) or not math.isfinite(leeway):
        # A caller bug, not a token problem: with NaN every time comparison is False and the token would pass.
        raise ValueError("now and leeway must be finite numbers")
    parsed = _parse(token, max_token_bytes)
    trust_domain = parsed.spiffe_id.trust_domain
    bundle = bundles.get(trust_domain)
    if bundle is None:
        _fail(UNKNOWN_TRUST_DOMAIN, f"no bundle for trust domain {_shown(trust_domain.name)}")
    key = bundle.jwt_authorities.get(parsed.kid)
    if key is None:
        _fail(
            UNKNOWN_KEY, f"no JWT authority {_shown(parsed.kid)} in the bundle of {_shown(trust_domain.name)}"
        )
    _verify_signature(parsed, key)

    svid = _claims_svid(token, parsed)
    if isinstance(audiences, str):
        audiences = (audiences,)
    if audiences and not any(aud in audiences for aud in svid.audience):
        _fail(
            AUDIENCE_MISMATCH,
            f"token audience {_shown(list(svid.audience))} has none of {_shown(sorted(audiences))}",
        )
    # Compare int against float directly: Python compares them exactly, whereas `exp + leeway` would raise
    # OverflowError for an exp beyond float range (valid JSON, and our integers are unbounded).
    if now - leeway > svid.expiry:
        _fail(EXPIRED, f"token expired at {_shown(svid.expiry)} (now {now:.0f}, leeway {leeway:g}s)")
    nbf = parsed.claims.get("nbf")
    if nbf is not None and now + leeway < nbf:
        _fail(NOT_YET_VALID, f"token is not valid before {_shown(nbf)} (now {now:.0f}, leeway {leeway:g}s)")
    if svid.issued_at is not None and svid.issued_at > now + leeway:
        _fail(
            ISSUED_IN_FUTURE,
            f"token was issued at {_shown(svid.issued_at)}, after now {now:.0f} + {leeway:g}s",
        )
    return svid


def parse_jwt_svid_insecure(token: str, max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES) -> JwtSvid:
    """Parse a JWT-SVID WITHOUT verifying its signature, audience or validity period.

    For a workload inspecting a token it obtained itself (its expiry, its audience); never for authorization.
    The structural, header and claim-shape rules are the same as `validate_jwt_svid`'s.

    Args:
        token: the compact JWS.
        max_token_bytes: tokens longer than this are refused before anything is decoded.

    Returns:
        The parsed `JwtSvid`.

    Raises:
        JwtSvidError: the token is malformed or breaks a header or claim rule.
    """
    parsed = _parse(token, max_token_bytes)
    return _claims_svid(token, parsed)


def jwt_algorithm_for_key(private_key: PrivateKeyTypes) -> str:
    """The JWS `alg` svidgate signs with for a key: EC P-256/P-384/P-521 -> ES256/ES384/ES512, RSA -> RS256.

    Raises:
        JwtSvidError: ``unsupported_algorithm`` for any other key type or an RSA key under 2048 bits.
    """
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        alg = _EC_ALG_BY_CURVE.get(private_key.curve.name)
        if alg is None:
            _fail(UNSUPPORTED_ALGORITHM, f"EC curve {private_key.curve.name} has no JWT-SVID algorithm")
        return alg
    if isinstance(private_key, rsa.RSAPrivateKey):
        if private_key.key_size < MIN_RSA_BITS:
            _fail(UNSUPPORTED_ALGORITHM, f"RSA-{private_key.key_size} is below {MIN_RSA_BITS} bits")
        return "RS256"
    _fail(UNSUPPORTED_ALGORITHM, f"{type(private_key).__name__} keys cannot sign JWT-SVIDs")


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _compact_json(value: Mapping[str, Any]) -> bytes:
    # ensure_ascii keeps the token ASCII; no spaces keeps it small.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def mint_jwt_svid(
    spiffe_id: SpiffeId,
    audience: Sequence[str],
    private_key: PrivateKeyTypes,
    kid: str,
    ttl: float,
    now: float,
) -> str:
    """Sign a JWT-SVID.

    Header ``{"alg", "kid", "typ": "JWT"}`` (alg from the key, see `jwt_algorithm_for_key`); claims ``sub``,
    ``aud`` (a string for one audience, an array for several), ``exp = int(now + ttl)``, ``iat = int(now)``.

    Args:
        spiffe_id: the subject.
        audience: one or more non-empty audiences (JWT-SVID.md 6.2 recommends exactly one). A plain string is
            one audience.
        private_key: the signing key of a JWT authority of the subject's trust domain.
        kid: that authority's key ID in the bundle.
        ttl: lifetime in seconds, > 0.
        now: the current time in seconds since the epoch.

    Returns:
        The compact JWS.

    Raises:
        JwtSvidError: ``bad_claim`` for an empty audience list, an empty audience or a non-positive ttl,
            ``missing_key_id`` for an empty kid, ``bad_subject`` for a trust domain ID (no path),
            ``unsupported_algorithm`` for an unusable key.
    """
    audiences = (audience,) if isinstance(audience, str) else tuple(audience)
    if not audiences:
        _fail(BAD_CLAIM, "a JWT-SVID needs at least one audience")
    if not all(isinstance(aud, str) and aud for aud in audiences):
        _fail(BAD_CLAIM, "every audience must be a non-empty string")
    if not isinstance(kid, str) or not kid:
        _fail(MISSING_KEY_ID, "kid must be a non-empty string")
    if not spiffe_id.path:
        _fail(BAD_SUBJECT, f"{spiffe_id} is a trust domain ID; a JWT-SVID names a workload (no path)")
    if not (ttl > 0 and math.isfinite(ttl)):
        _fail(BAD_CLAIM, f"ttl must be a positive number of seconds, not {ttl!r}")
    if not math.isfinite(now):
        _fail(BAD_CLAIM, f"now must be a finite time, not {now!r}")
    alg = jwt_algorithm_for_key(private_key)
    header = {"alg": alg, "kid": kid, "typ": "JWT"}
    claims = {
        "sub": str(spiffe_id),
        "aud": audiences[0] if len(audiences) == 1 else list(audiences),
        "exp": int(now + ttl),
        "iat": int(now),
    }
    signing_input = f"{_b64url(_compact_json(header))}.{_b64url(_compact_json(claims))}".encode("ascii")
    hash_alg = _HASHES[alg[2:]]()
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        size = _EC_CURVES[alg][1]
        r, s = utils.decode_dss_signature(private_key.sign(signing_input, ec.ECDSA(hash_alg)))
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    else:
        assert isinstance(private_key, rsa.RSAPrivateKey)  # jwt_algorithm_for_key allows only EC and RSA
        signature = private_key.sign(signing_input, padding.PKCS1v15(), hash_alg)
    return f"{signing_input.decode('ascii')}.{_b64url(signature)}"
