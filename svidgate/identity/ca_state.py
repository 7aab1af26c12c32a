"""The built-in CA's on-disk state: its authorities in one JSON file, ``<state_dir>/ca/ca.json``.

The directory is 0700 and the file 0600 (tightened, and logged, when found looser); the file is replaced
atomically (written aside, fsynced, renamed, directory fsynced) and created with link(2) so that two
svidgates starting on one state_dir never both create a CA. Decoding validates completely: anything
unexpected -- not JSON, another format or trust domain, a key that does not match its certificate -- is a
`CaError` naming the file and the entry, because a CA is never silently replaced (that would cut off every
peer that trusts the old root). `svidgate.identity.ca` holds the CA that uses this state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from svidgate.errors import CaError, SvidgateError
from svidgate.identity.keys import SigningKey, key_id, key_type_of
from svidgate.identity.spiffe_id import TrustDomain

# The CA's logger, as before this module was split out of svidgate.identity.ca: operators filter on it.
log = logging.getLogger("svidgate.identity.ca")

STATE_FORMAT = "svidgate-ca/1"
STATE_DIR_NAME = "ca"
STATE_FILE_NAME = "ca.json"


def ca_state_file(state_dir: Path) -> Path:
    """Where the built-in CA of `state_dir` keeps its state."""
    return Path(state_dir) / STATE_DIR_NAME / STATE_FILE_NAME


@dataclass(frozen=True, slots=True, eq=False)
class Authority:
    """One generation of the CA: an X.509 root and a JWT signing key with the same lifetime.

    `x509_key` and `jwt_key` are None for a retired authority loaded from disk: it only verifies.
    """

    certificate: x509.Certificate
    x509_key: SigningKey | None
    jwt_public_key: PublicKeyTypes
    jwt_key: SigningKey | None

    @property
    def not_before(self) -> float:
        return self.certificate.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.certificate.not_valid_after_utc.timestamp()

    @property
    def jwt_key_id(self) -> str:
        return key_id(self.jwt_public_key)

    def lifetime_point(self, fraction: float) -> float:
        return self.not_before + (self.not_after - self.not_before) * fraction


@dataclass(frozen=True, slots=True, eq=False)
class CaState:
    """The CA's authorities as kept on disk: current (signs), next (published ahead), retired (verifies)."""

    current: Authority
    next: Authority | None
    retired: tuple[Authority, ...]
    sequence: int


def ensure_private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
    except FileExistsError:
        raise CaError(f"{path} exists and is not a directory") from None
    except OSError as exc:
        raise CaError(f"cannot create state directory {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise CaError(f"{path} exists and is not a directory")
    # Private keys live below; other users must not even list the directory.
    _restrict_mode(path, info, 0o700, "ca.state_dir_permissions_tightened")


def _restrict_mode(path: Path, info: os.stat_result, mode: int, event: str) -> None:
    """Set `path` to `mode` when group or others have any access to it, and log `event` when it did."""
    if stat.S_IMODE(info.st_mode) & 0o077:
        try:
            path.chmod(mode)
        except OSError as exc:
            raise CaError(f"cannot restrict {path} to mode {mode:04o}: {exc.strerror or exc}") from None
        log.warning(event, extra={"fields": {"path": str(path)}})


def read_state(path: Path, trust_domain: TrustDomain) -> CaState | None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CaError(f"cannot read CA state {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise CaError(f"{path} is not a regular file; refusing to use it as CA state")
    _restrict_mode(path, info, 0o600, "ca.state_file_permissions_tightened")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CaError(f"cannot read CA state {path}: {exc.strerror or exc}") from None
    return decode_state(raw, trust_domain, str(path))


def encode_state(trust_domain: TrustDomain, state: CaState) -> bytes:
    def authority(role: str, a: Authority) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "role": role,
            "certificate": a.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            "jwt_public_key": a.jwt_public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode("ascii"),
        }
        # A retired authority only verifies: its private keys are not kept on disk longer than needed.
        if role != "retired" and a.x509_key is not None and a.jwt_key is not None:
            entry["private_key"] = _pkcs8(a.x509_key)
            entry["jwt_private_key"] = _pkcs8(a.jwt_key)
        return entry

    authorities = [authority("current", state.current)]
    if state.next is not None:
        authorities.append(authority("next", state.next))
    authorities.extend(authority("retired", a) for a in state.retired)
    doc = {
        "format": STATE_FORMAT,
        "trust_domain": trust_domain.name,
        "sequence": state.sequence,
        "authorities": authorities,
    }
    return (json.dumps(doc, indent=2) + "\n").encode("ascii")


def _pkcs8(key: SigningKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def decode_state(raw: bytes, trust_domain: TrustDomain, where: str) -> CaState:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise CaError(f"{where}: not a svidgate CA state file (not JSON); refusing to replace it") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise CaError(
            f"{where}: not a svidgate CA state file (no 'format': {STATE_FORMAT!r}); refusing to use it"
        )
    if doc.get("trust_domain") != trust_domain.name:
        raise CaError(
            f"{where}: holds the CA of trust domain {doc.get('trust_domain')!r}, not {trust_domain.name!r}; "
            "use another state_dir or remove it deliberately"
        )
    sequence = doc.get("sequence")
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
        raise CaError(f"{where}: 'sequence' must be a non-negative integer")
    entries = doc.get("authorities")
    if not isinstance(entries, list):
        raise CaError(f"{where}: 'authorities' must be an array")
    current: list[Authority] = []
    next_: list[Authority] = []
    retired: list[Authority] = []
    for index, entry in enumerate(entries):
        role, authority = _decode_authority(entry, trust_domain, f"{where}: authorities[{index}]")
        {"current": current, "next": next_, "retired": retired}[role].append(authority)
    if len(current) != 1 or len(next_) > 1:
        raise CaError(f"{where}: needs exactly one current and at most one next authority")
    return CaState(
        current=current[0], next=next_[0] if next_ else None, retired=tuple(retired), sequence=sequence
    )


def _decode_authority(entry: object, trust_domain: TrustDomain, where: str) -> tuple[str, Authority]:
    if not isinstance(entry, dict):
        raise CaError(f"{where}: must be an object")
    role = entry.get("role")
    if role not in ("current", "next", "retired"):
        raise CaError(f"{where}: 'role' must be current, next or retired")
    try:
        cert = x509.load_pem_x509_certificate(_ascii(entry, "certificate", where))
        jwt_public_key = serialization.load_pem_public_key(_ascii(entry, "jwt_public_key", where))
        x509_key = jwt_key = None
        if role != "retired":
            x509_key = signing_key(
                serialization.load_pem_private_key(_ascii(entry, "private_key", where), None)
            )
            jwt_key = signing_key(
                serialization.load_pem_private_key(_ascii(entry, "jwt_private_key", where), None)
            )
    except (ValueError, TypeError, SvidgateError) as exc:
        raise CaError(f"{where}: corrupt key or certificate: {exc}") from None
    uris = _uri_sans(cert)
    if uris != [str(trust_domain.id)]:
        raise CaError(f"{where}: the certificate is not a CA of {trust_domain} (URI SANs {uris})")
    if x509_key is not None and x509_key.public_key() != cert.public_key():
        raise CaError(f"{where}: the private key does not match the certificate")
    if jwt_key is not None and jwt_key.public_key() != jwt_public_key:
        raise CaError(f"{where}: the JWT private key does not match the JWT public key")
    return role, Authority(cert, x509_key, jwt_public_key, jwt_key)


def _ascii(entry: dict[str, Any], name: str, where: str) -> bytes:
    value = entry.get(name)
    if not isinstance(value, str):
        raise CaError(f"{where}: {name!r} must be a PEM string")
    return value.encode("ascii", errors="replace")


def signing_key(key: object) -> SigningKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaError(f"unsupported key type {type(key).__name__}")
    key_type_of(key)  # raises for curves/sizes svidgate does not sign with
    return key


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _temp_file(path: Path, data: bytes) -> str:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return temp


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; without it a crash can leave the old file (or none) after a reboot.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    try:
        temp = _temp_file(path, data)
        os.replace(temp, path)
    except OSError as exc:
        raise CaError(f"cannot write CA state {path}: {exc.strerror or exc}") from None
    _fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create `path` with `data` atomically unless it exists. Returns False if another writer won the race."""
    try:
        temp = _temp_file(path, data)
    except OSError as exc:
        raise CaError(f"cannot write CA state {path}: {exc.strerror or exc}") from None
    try:
        os.link(temp, path)  # link(2) fails with EEXIST instead of replacing: create-if-absent, atomically
    except FileExistsError:
        return False
    except OSError as exc:
        raise CaError(f"cannot write CA state {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)
    _fsync_dir(path.parent)
    return True
