"""A bounded LRU of validated JWT-SVIDs, so that a token seen again costs no signature work.

Pure (a lock, no I/O). Keyed by the token string itself: two requests share an entry only when they carry
byte-identical tokens, so the entry's claims are exactly the claims of the request's token.

Why an entry is trusted on a hit, and when it is not:

- it lives no longer than the token's ``exp`` (without the validator's leeway: the leeway is for clock skew
  between issuer and validator, a cache has no reason to extend a token's life);
- it is dropped when the bundle of the token's trust domain no longer holds the key (``kid``) that verified
  it, so removing a key from a bundle (a rotation, a compromised key) takes effect on the next request. The
  check is one identity comparison while the bundle object is unchanged, and a key comparison when a new
  snapshot brought a new bundle object -- a snapshot that only re-minted X.509-SVIDs does not empty the cache;
- the audience is checked on every hit against the policy that applies to *this* request (the same rule as the
  validator: at least one of the policy's audiences), so one entry serves several policies correctly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from svidgate.errors import JwtSvidError
from svidgate.identity.jwtsvid import AUDIENCE_MISMATCH, JwtSvid, validate_jwt_svid

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

    from svidgate.extauthz.metrics import AuthzMetrics
    from svidgate.identity.bundle import Bundle
    from svidgate.identity.spiffe_id import TrustDomain

__all__ = ["TokenCache"]


@dataclass(slots=True)
class _Entry:
    svid: JwtSvid
    kid: str
    bundle: Bundle
    key: PublicKeyTypes


class TokenCache:
    """Validated JWT-SVIDs by token, least recently used evicted first.

    Args:
        max_entries: the bound (``authz.cache_size``); 0 disables caching.
        metrics: records hits, misses and the entry count when given.
    """

    def __init__(self, max_entries: int, metrics: AuthzMetrics | None = None) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # The threaded Check server calls in from several threads; an uncontended lock costs ~50 ns.
        self._lock = threading.Lock()
        self._metrics = metrics

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        self._gauge()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.token_cache_entries.set(len(self._entries))

    def lookup(self, token: str, bundles: Mapping[TrustDomain, Bundle], now: float) -> JwtSvid | None:
        """The cached validation of `token`, if it is still good (see the module docstring).

        Args:
            token: the compact JWS.
            bundles: the current trust bundles.
            now: the current time.

        Returns:
            The validated JWT-SVID, or None (never cached, expired, or its key left the bundle).
        """
        with self._lock:
            entry = self._entries.get(token)
            if entry is None:
                return None
            svid = entry.svid
            if now >= svid.expiry:
                del self._entries[token]
                return None
            bundle = bundles.get(svid.spiffe_id.trust_domain)
            if bundle is not entry.bundle:
                key = None if bundle is None else bundle.jwt_authorities.get(entry.kid)
                if bundle is None or key is None or (key is not entry.key and key != entry.key):
                    del self._entries[token]
                    return None
                entry.bundle = bundle
            self._entries.move_to_end(token)
            return svid

    def store(self, svid: JwtSvid, bundles: Mapping[TrustDomain, Bundle], now: float) -> None:
        """Remember a JWT-SVID that `validate_jwt_svid` just accepted against `bundles`.

        Args:
            svid: the validated token.
            bundles: the bundles it was validated against.
            now: the current time (an already expired token, accepted only by the leeway, is not cached).
        """
        if self.max_entries <= 0 or now >= svid.expiry:
            return
        # The kid the validator selected the key by; a JwtSvid not parsed here has none and is not cached.
        kid = svid.key_id
        bundle = bundles.get(svid.spiffe_id.trust_domain)
        key = None if bundle is None or not kid else bundle.jwt_authorities.get(kid)
        if bundle is None or key is None:
            return
        with self._lock:
            self._entries[svid.token] = _Entry(svid, kid, bundle, key)
            self._entries.move_to_end(svid.token)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        self._gauge()

    def validate(
        self,
        token: str,
        bundles: Mapping[TrustDomain, Bundle],
        audiences: Collection[str],
        now: float,
        leeway: float,
        precheck: Callable[[str], object] | None = None,
    ) -> JwtSvid:
        """Validate `token` through the cache: a hit costs no signature work.

        Args:
            token: the compact JWS.
            bundles: the current trust bundles.
            audiences: the token must carry at least one of these (never empty here: the configuration
                refuses a policy that requires a token and names no audience).
            now: the current time.
            leeway: the validator's clock-skew leeway.
            precheck: called with `token` on a miss only, before validation (it raises to refuse): checks
                that every cached token already passed, so that a hit does not repeat them.

        Returns:
            The validated JWT-SVID.

        Raises:
            JwtSvidError: the token does not validate (the validator's reason codes).
            Exception: whatever `precheck` raises.
        """
        svid = self.lookup(token, bundles, now)
        if svid is not None:
            if self._metrics is not None:
                # Inlined `CheckRecorder.cache_hit`: this is the hot path of every cached Check.
                self._metrics.recorder.cell().hits += 1
            # The validator's rule exactly (empty `audiences` skips the check there too).
            if audiences and not any(aud in audiences for aud in svid.audience):
                raise JwtSvidError(
                    AUDIENCE_MISMATCH, f"token audience {list(svid.audience)!r:.80} has none of the policy's"
                )
            return svid
        if self._metrics is not None:
            self._metrics.recorder.cache_miss()
        if precheck is not None:
            precheck(token)
        svid = validate_jwt_svid(token, bundles, audiences, now, leeway)
        self.store(svid, bundles, now)
        return svid
