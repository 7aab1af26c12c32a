"""The built-in CA: a self-signed SPIFFE root per trust domain that mints X.509-SVIDs and JWT-SVIDs.

State lives in one JSON file, ``<state_dir>/ca/ca.json`` (directory 0700, file 0600, replaced atomically;
`svidgate.identity.ca_state`), so a restart reuses the same root and every peer that trusts it keeps working.
Anything unexpected there -- a file that does not parse, a CA of another trust domain, a file svidgate did not
write -- is a `CaError`; the CA is never silently replaced, because replacing it would cut off every peer that
trusts the old root.

Rotation follows SPIRE's schedule: when the current authority is half-way through its life a *next* one is
prepared and published in the bundle; at 5/6 of the current one's life signing switches to it (peers have had
a third of the lifetime to fetch the new bundle); the old one stays in the bundle until its notAfter, after
which nothing it signed can still be valid (every SVID's notAfter/exp is capped by its authority's notAfter).

Each authority has two keys: the X.509 root key and a separate JWT signing key. One key per SVID type keeps a
signature made for one protocol from ever being accepted in the other (SPIFFE_Trust_Domain_and_Bundle.md 2).

**Under an upstream root** (`ca.upstream`, as SPIRE's ``disk`` UpstreamAuthority;
`svidgate.identity.ca_upstream`): every authority is an intermediate CA signed by a root that several
svidgates share (one per node), instead of a self-signed root. Each node keeps its own intermediate key in its
own state and rotates it on the same schedule; the bundle's X.509 authority is the shared root alone, so an
SVID from any node verifies on every other, and each served chain is ``leaf, intermediate``. No intermediate
outlives the root. JWT signing keys stay per node, as with SPIRE's disk plugin (it cannot publish JWT keys
upstream): a JWT-SVID validates where that node's bundle is known.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import secrets
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from svidgate.errors import CaError
from svidgate.identity import jwtsvid
from svidgate.identity.bundle import Bundle
from svidgate.identity.ca_state import (
    STATE_DIR_NAME,
    STATE_FILE_NAME,
    Authority,
    CaState,
    ca_state_file,
    create_exclusive,
    encode_state,
    ensure_private_dir,
    read_state,
    write_atomic,
)
from svidgate.identity.ca_upstream import UpstreamAuthority
from svidgate.identity.clock import Clock
from svidgate.identity.keys import KeyType, SigningKey, generate_private_key
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import X509Svid

log = logging.getLogger(__name__)

# The CA's public names. `UpstreamAuthority` (what `load_or_create` takes) and `ca_state_file` (where the
# state lives) are defined beside it, in ca_upstream and ca_state, and are part of this module's API too.
__all__ = [
    "ACTIVATE_AT",
    "BACKDATE_SECONDS",
    "DEFAULT_CA_TTL",
    "DEFAULT_JWT_SVID_TTL",
    "DEFAULT_REFRESH_HINT",
    "DEFAULT_X509_SVID_TTL",
    "PREPARE_AT",
    "Authority",
    "BuiltinCa",
    "UpstreamAuthority",
    "ca_state_file",
]

#: Defaults of ``ca.ca_ttl``, ``ca.x509_svid_ttl`` and ``ca.jwt_svid_ttl`` (seconds), declared once here.
DEFAULT_CA_TTL = 365 * 86400.0
DEFAULT_X509_SVID_TTL = 3600.0
DEFAULT_JWT_SVID_TTL = 300.0
#: Certificates are dated this far into the past so that peers whose clocks lag a little accept them at once.
BACKDATE_SECONDS = 60.0
#: Fractions of the current lifetime at which the next authority is prepared and activated (as in SPIRE).
PREPARE_AT = 1 / 2
ACTIVATE_AT = 5 / 6
#: `spiffe_refresh_hint` of the bundle: how often federated peers should re-fetch it.
DEFAULT_REFRESH_HINT = 300


class BuiltinCa:
    """A trust domain's built-in certificate authority. Thread-safe: state is replaced whole under a lock.

    Construct with `load_or_create`.
    """

    def __init__(
        self,
        trust_domain: TrustDomain,
        key_type: KeyType,
        clock: Clock,
        ca_ttl: float,
        state_file: Path | None,
        state: CaState,
        upstream: UpstreamAuthority | None = None,
    ) -> None:
        self._upstream = upstream
        self._trust_domain = trust_domain
        self._key_type = key_type
        self._clock = clock
        self._ca_ttl = ca_ttl
        self._state_file = state_file
        self._state = state
        self._lock = threading.Lock()

    # -- construction -----

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        trust_domain: TrustDomain,
        key_type: KeyType,
        clock: Clock,
        ca_ttl: float = DEFAULT_CA_TTL,
        upstream: UpstreamAuthority | None = None,
    ) -> BuiltinCa:
        """Load the CA of `trust_domain` from `state_dir`, or create and persist a new one if there is none.

        A loaded CA is rotated at once if it is due (after downtime the current root may have expired).

        Args:
            state_dir: svidgate's state directory; the CA lives in its ``ca/`` subdirectory.
            trust_domain: the trust domain the CA signs for.
            key_type: key type for new authorities (an existing authority keeps its own key type).
            clock: the time source.
            ca_ttl: lifetime of a new authority, seconds (capped by the upstream root's notAfter).
            upstream: the shared root every authority is an intermediate of, or None for self-signed roots.

        Returns:
            The CA.

        Raises:
            CaError: the state cannot be read or written (a rotation that cannot be persisted is tolerated
                while the current authority is valid), is corrupt, was not written by svidgate, belongs to
                another trust domain, or was not issued under `upstream` (or is, without it).
        """
        if not ca_ttl > 2 * BACKDATE_SECONDS:
            raise CaError(f"ca_ttl must be more than {2 * BACKDATE_SECONDS:.0f} seconds, not {ca_ttl!r}")
        ca_dir = Path(state_dir) / STATE_DIR_NAME
        try:
            # Only created private here; an existing state_dir is the operator's and keeps its mode.
            Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CaError(f"cannot create state directory {state_dir}: {exc.strerror or exc}") from None
        ensure_private_dir(ca_dir)
        state_file = ca_dir / STATE_FILE_NAME
        state = read_state(state_file, trust_domain)
        if state is not None:
            _check_issuer(state, upstream, str(state_file))
        if state is None:
            created = CaState(
                current=_new_authority(trust_domain, key_type, clock(), ca_ttl, upstream),
                next=None,
                retired=(),
                sequence=1,
            )
            if create_exclusive(state_file, encode_state(trust_domain, created)):
                state = created
                log.info(
                    "ca.created",
                    extra={
                        "fields": _authority_fields(trust_domain, created.current, state_file=str(state_file))
                    },
                )
            else:
                # Another process created it between our read and our write: use theirs, never overwrite.
                state = read_state(state_file, trust_domain)
                if state is None:
                    raise CaError(f"{state_file}: appeared and vanished while creating the CA")
        else:
            log.info(
                "ca.loaded",
                extra={"fields": _authority_fields(trust_domain, state.current, state_file=str(state_file))},
            )
        ca = cls(trust_domain, key_type, clock, ca_ttl, state_file, state, upstream)
        try:
            ca.rotate_if_due()
        except CaError as exc:
            # A full or read-only disk must not stop a CA that can still sign: the source retries the rotation
            # (and logs and counts each failure). Only an expired current authority is fatal here.
            if ca.current.not_after <= clock():
                raise
            log.warning(
                "ca.state_write_failed",
                extra={"fields": {"trust_domain": trust_domain.name, "error": str(exc), "at": "load"}},
            )
        return ca

    @classmethod
    def load_existing(
        cls,
        state_dir: Path,
        trust_domain: TrustDomain,
        key_type: KeyType,
        clock: Clock,
        ca_ttl: float = DEFAULT_CA_TTL,
        upstream: UpstreamAuthority | None = None,
    ) -> BuiltinCa | None:
        """The CA `svidgate serve` persisted in `state_dir`, read only: never created, rotated or written (a
        state file readable by others is still restricted to 0600, as on every load).

        For commands that run beside a server (`svidgate mint`, `bundle`, `explain`, `check-config`): a CA
        they created would sign what the running server's peers reject, and a rotation they persisted would
        race the server's own.

        Args:
            state_dir: svidgate's state directory (the CA lives in ``ca/ca.json`` below it).
            trust_domain: the trust domain the state must belong to.
            key_type: reported by `key_type`; the loaded authorities keep their own key types.
            clock: the time source.
            ca_ttl: lifetime the server gives new authorities (for the bundle's refresh hint).
            upstream: the shared root the server's authorities are intermediates of (``ca.upstream``).

        Returns:
            The CA, or None when there is no state file.

        Raises:
            CaError: the state exists but cannot be read, is corrupt, belongs to another trust domain, or was
                not issued under `upstream` (or is, without it).
        """
        state_file = ca_state_file(state_dir)
        state = read_state(state_file, trust_domain)
        if state is None:
            return None
        _check_issuer(state, upstream, str(state_file))
        return cls(trust_domain, key_type, clock, ca_ttl, None, state, upstream)

    @classmethod
    def in_memory(
        cls,
        trust_domain: TrustDomain,
        key_type: KeyType,
        clock: Clock,
        ca_ttl: float = DEFAULT_CA_TTL,
        upstream: UpstreamAuthority | None = None,
    ) -> BuiltinCa:
        """A CA that persists nothing (for tests and one-off `svidgate mint`)."""
        state = CaState(_new_authority(trust_domain, key_type, clock(), ca_ttl, upstream), None, (), 1)
        return cls(trust_domain, key_type, clock, ca_ttl, None, state, upstream)

    # -- read-only views -----

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    @property
    def key_type(self) -> KeyType:
        return self._key_type

    @property
    def state_file(self) -> Path | None:
        return self._state_file

    @property
    def upstream(self) -> UpstreamAuthority | None:
        """The shared root the authorities are intermediates of, if any."""
        return self._upstream

    @property
    def current(self) -> Authority:
        """The authority that signs now."""
        return self._state.current

    @property
    def next(self) -> Authority | None:
        """The prepared (published, not yet signing) authority, if any."""
        return self._state.next

    def bundle(self) -> Bundle:
        """The trust bundle: current, next and still-valid retired authorities, X.509 and JWT.

        Under an upstream root the X.509 authority is that root alone: intermediates travel in the chains.

        Returns:
            The bundle, with a `sequence` that increases whenever its contents change.
        """
        state = self._state
        authorities = [state.current, *([state.next] if state.next else []), *state.retired]
        x509_authorities = (
            (self._upstream.certificate,)
            if self._upstream is not None
            else tuple(a.certificate for a in authorities)
        )
        return Bundle(
            trust_domain=self._trust_domain,
            x509_authorities=x509_authorities,
            jwt_authorities={a.jwt_key_id: a.jwt_public_key for a in authorities},
            sequence=state.sequence,
            refresh_hint=max(1, min(DEFAULT_REFRESH_HINT, int(self._ca_ttl / 12))),
        )

    # -- minting -----

    def mint_x509_svid(self, spiffe_id: SpiffeId, ttl: float, dns_names: Sequence[str] = ()) -> X509Svid:
        """Mint an X.509-SVID with a fresh key, signed by the current authority.

        notBefore is backdated by `BACKDATE_SECONDS` for clock skew; notAfter is ``now + ttl`` capped by the
        authority's own notAfter, so nothing outlives the root that vouches for it.

        Args:
            spiffe_id: a non-root SPIFFE ID in this CA's trust domain.
            ttl: requested lifetime, seconds, > 0.
            dns_names: DNS SANs to add (the first also becomes the subject CN, for tools that still read it).

        Returns:
            The SVID; its chain is the leaf alone (the root is in the bundle), or the leaf and this node's
            intermediate under an upstream root.

        Raises:
            CaError: the ID is of another trust domain or has no path, the ttl is not positive, a DNS name is
                not valid, or the current authority has expired (`rotate_if_due` was not called).
        """
        self._check_subject(spiffe_id)
        if not ttl > 0:
            raise CaError(f"X.509-SVID ttl must be positive, not {ttl!r}")
        now = self._clock()
        authority = self._signing_authority(now)
        assert authority.x509_key is not None  # _signing_authority guarantees it
        leaf_key = generate_private_key(self._key_type)
        not_before = max(now - BACKDATE_SECONDS, authority.not_before)
        not_after = min(now + ttl, authority.not_after)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        try:
            names.extend(x509.DNSName(name) for name in dns_names)
        except ValueError as exc:
            raise CaError(f"invalid DNS name for {spiffe_id}: {exc}") from None
        for name in dns_names:
            if not name or not name.isascii() or any(c.isspace() for c in name):
                raise CaError(f"invalid DNS name {name!r} for {spiffe_id}: DNS SANs are non-empty ASCII")
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "svidgate")]
        if dns_names:
            subject.append(x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0][:64]))
        is_rsa = isinstance(leaf_key, rsa.RSAPrivateKey)
        issuer_ski = authority.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(authority.certificate.subject)
            .public_key(leaf_key.public_key())
            .serial_number(_random_serial())
            .not_valid_before(_datetime(not_before))
            .not_valid_after(_datetime(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(leaf=True, key_encipherment=is_rsa), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False
            )
        )
        leaf = builder.sign(authority.x509_key, _hash_for(authority.x509_key))
        # X509-SVID.md 5: the peer needs every intermediate between the leaf and the bundle's root.
        chain = (leaf,) if self._upstream is None else (leaf, authority.certificate)
        return X509Svid(spiffe_id=spiffe_id, cert_chain=chain, private_key=leaf_key)

    def mint_jwt_svid(self, spiffe_id: SpiffeId, audience: Sequence[str], ttl: float) -> str:
        """Mint a JWT-SVID signed by the current authority's JWT key.

        Args:
            spiffe_id: a non-root SPIFFE ID in this CA's trust domain.
            audience: one or more audiences.
            ttl: requested lifetime, seconds; `exp` is capped by the authority's notAfter.

        Returns:
            The compact JWS (header ``alg``, ``kid``, ``typ: JWT``; claims ``sub``, ``aud``, ``exp``,
            ``iat``).

        Raises:
            CaError: the ID is of another trust domain or has no path, the ttl is not positive, or the current
                authority has expired.
            JwtSvidError: the audience is empty or invalid.
        """
        self._check_subject(spiffe_id)
        if not ttl > 0:
            raise CaError(f"JWT-SVID ttl must be positive, not {ttl!r}")
        now = self._clock()
        authority = self._signing_authority(now)
        assert authority.jwt_key is not None
        capped = min(ttl, authority.not_after - now)
        return jwtsvid.mint_jwt_svid(
            spiffe_id, audience, authority.jwt_key, authority.jwt_key_id, capped, now
        )

    # -- rotation -----

    def rotate_if_due(self) -> bool:
        """Advance the rotation schedule to the clock's current time, persisting any change first.

        Drops retired authorities past their notAfter, prepares the next authority at half the current one's
        lifetime, and switches signing to it at 5/6 (at once if the current one has already expired, e.g.
        after downtime).

        Returns:
            True when the bundle or the signing authority changed (callers re-publish and re-mint).

        Raises:
            CaError: the new state cannot be persisted, or no new intermediate can be issued because the
                upstream root is about to expire (the in-memory state is then left unchanged).
        """
        with self._lock:
            now = self._clock()
            old = state = self._state
            # Loop because after a long downtime even the prepared next authority may be due for rotation.
            for _ in range(3):
                state = self._advance(state, now)
            if state.current is old.current and state.next is old.next and state.retired == old.retired:
                return False
            state = replace(state, sequence=old.sequence + 1)
            if self._state_file is not None:
                write_atomic(self._state_file, encode_state(self._trust_domain, state))
            self._state = state
            self._log_transition(old, state)
            return True

    # -- internals -----

    def _advance(self, state: CaState, now: float) -> CaState:
        state = replace(state, retired=tuple(a for a in state.retired if a.not_after > now))
        if state.next is None and now >= state.current.lifetime_point(PREPARE_AT):
            state = replace(
                state,
                next=_new_authority(self._trust_domain, self._key_type, now, self._ca_ttl, self._upstream),
            )
        if state.next is not None and now >= state.current.lifetime_point(ACTIVATE_AT):
            # A retired authority stays published only while something it signed can still be valid.
            keep = (state.current,) if state.current.not_after > now else ()
            state = CaState(
                current=state.next, next=None, retired=keep + state.retired, sequence=state.sequence
            )
        return state

    def _check_subject(self, spiffe_id: SpiffeId) -> None:
        if not spiffe_id.member_of(self._trust_domain):
            raise CaError(f"the CA of {self._trust_domain} cannot sign {spiffe_id}: another trust domain")
        if not spiffe_id.path:
            raise CaError(f"cannot mint an SVID for {spiffe_id}: an SVID's SPIFFE ID needs a path")

    def _signing_authority(self, now: float) -> Authority:
        authority = self._state.current
        if authority.x509_key is None or authority.jwt_key is None:
            raise CaError("the current authority has no private key")  # unreachable with a valid state file
        if now >= authority.not_after:
            raise CaError(
                f"the CA of {self._trust_domain} expired at {_datetime(authority.not_after).isoformat()}; "
                "rotate_if_due() must run before minting"
            )
        return authority

    def _log_transition(self, old: CaState, new: CaState) -> None:
        if new.current is not old.current:
            log.info("ca.activated", extra={"fields": _authority_fields(self._trust_domain, new.current)})
        if new.next is not None and new.next is not old.next:
            log.info("ca.prepared", extra={"fields": _authority_fields(self._trust_domain, new.next)})
        kept = {id(a) for a in new.retired} | {id(new.current)}
        for dropped in old.retired:
            if id(dropped) not in kept:
                log.info("ca.dropped", extra={"fields": _authority_fields(self._trust_domain, dropped)})


# ----------------------------------------------------------------------------------------------------
# Certificates


def _new_authority(
    trust_domain: TrustDomain,
    key_type: KeyType,
    now: float,
    ca_ttl: float,
    upstream: UpstreamAuthority | None = None,
) -> Authority:
    not_before, not_after = now - BACKDATE_SECONDS, now + ca_ttl
    if upstream is not None:
        # Nothing outlives the root that vouches for it (the same rule as SVIDs under their authority).
        not_before, not_after = max(not_before, upstream.not_before), min(not_after, upstream.not_after)
        if not_after - now <= 2 * BACKDATE_SECONDS:
            raise CaError(
                f"ca.upstream: the root expires at {_datetime(upstream.not_after).isoformat()}; no "
                "intermediate can be issued under it any more (replace the root and restart)"
            )
    key = generate_private_key(key_type)
    jwt_key = generate_private_key(key_type)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "svidgate"),
            x509.NameAttribute(NameOID.COMMON_NAME, trust_domain.name[:64]),
            # Distinguishes generations by name too, so that path builders that match names before keys never
            # try the wrong root first.
            x509.NameAttribute(NameOID.SERIAL_NUMBER, ski.digest.hex()),
        ]
    )
    issuer_name, issuer_key, issuer_ski = name, key, ski
    if upstream is not None:
        issuer_name, issuer_key = upstream.certificate.subject, upstream.key
        issuer_ski = x509.SubjectKeyIdentifier.from_public_key(upstream.key.public_key())
        with contextlib.suppress(x509.ExtensionNotFound):
            issuer_ski = upstream.certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(_random_serial())
        .not_valid_before(_datetime(not_before))
        .not_valid_after(_datetime(not_after))
        # An intermediate only signs SVIDs: pathlen 0 keeps a stolen node key from minting further CAs.
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=None if upstream is None else 0), critical=True
        )
        .add_extension(_key_usage(leaf=False), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))]), False
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False
        )
        .sign(issuer_key, _hash_for(issuer_key))
    )
    return Authority(certificate=cert, x509_key=key, jwt_public_key=jwt_key.public_key(), jwt_key=jwt_key)


def _key_usage(*, leaf: bool, key_encipherment: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=leaf,
        content_commitment=False,
        key_encipherment=leaf and key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not leaf,
        crl_sign=not leaf,
        encipher_only=False,
        decipher_only=False,
    )


def _hash_for(key: SigningKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _random_serial() -> int:
    # 128 random bits (RFC 5280 allows up to 20 octets; CA/B asks for at least 64 bits of entropy). Never 0.
    return secrets.randbits(128) or 1


def _datetime(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(epoch), tz=dt.UTC)


def _authority_fields(trust_domain: TrustDomain, authority: Authority, **extra: str) -> dict[str, Any]:
    return {
        "trust_domain": trust_domain.name,
        "serial": format(authority.certificate.serial_number, "x"),
        "jwt_kid": authority.jwt_key_id,
        "not_after": _datetime(authority.not_after).isoformat(),
        **extra,
    }


def _check_issuer(state: CaState, upstream: UpstreamAuthority | None, where: str) -> None:
    """Refuse state whose authorities do not belong under `upstream` (or are intermediates without it).

    Switching between a self-signed CA and an upstream root, or to another root, changes what every peer must
    trust; svidgate never does that silently (see the module docstring).
    """
    authorities = [state.current, *([state.next] if state.next else []), *state.retired]
    for authority in authorities:
        cert = authority.certificate
        if upstream is None and cert.issuer != cert.subject:
            raise CaError(
                f"{where}: holds intermediates issued under an upstream root, but ca.upstream is not set; "
                "set it again, or use another state_dir"
            )
        if upstream is not None and not upstream.issued(cert):
            raise CaError(
                f"{where}: its CA was not issued by ca.upstream "
                f"({upstream.certificate.subject.rfc4514_string()}); use another state_dir, or remove this "
                "one deliberately (every peer trusting the old CA loses it)"
            )
