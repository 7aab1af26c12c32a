"""Built-in CA state files written in code, to move a CA's schedule in a test without waiting for it.

A running `svidgate serve` cannot be given a fake clock; these helpers instead write the CA state it loads
(the same file format, through the CA module's own encoder) with authorities whose lifetimes are placed
where the test needs them: a rotation a few seconds after start, or a key roll between two starts.
"""

from __future__ import annotations

from pathlib import Path

from svidgate.identity.ca import BACKDATE_SECONDS, _new_authority
from svidgate.identity.ca_state import STATE_DIR_NAME, STATE_FILE_NAME, CaState, encode_state, read_state
from svidgate.identity.keys import KeyType
from svidgate.identity.spiffe_id import TrustDomain


def state_file(state_dir: Path) -> Path:
    return state_dir / STATE_DIR_NAME / STATE_FILE_NAME


def write_ca_state(state_dir: Path, trust_domain: TrustDomain, *, not_before: float, lifetime: float) -> None:
    """A CA whose only authority is valid from `not_before` for `lifetime` seconds.

    The CA prepares its next authority at half of that lifetime and signs with it from 5/6 on (svidgate's
    schedule), so ``not_before = now - 0.4 * lifetime`` rotates a few seconds after start.
    """
    # _new_authority backdates notBefore by BACKDATE_SECONDS from `now` and ends at now + ca_ttl.
    now = not_before + BACKDATE_SECONDS
    authority = _new_authority(trust_domain, KeyType.EC_P256, now, lifetime - BACKDATE_SECONDS)
    path = state_file(state_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(encode_state(trust_domain, CaState(authority, None, (), 1)))
    path.chmod(0o600)


def roll_ca(state_dir: Path, trust_domain: TrustDomain, *, now: float, lifetime: float = 3600.0) -> None:
    """Replace the current authority by a new one (the old one stays, retired): a partner's key roll.

    Only while svidgate is stopped: a running one owns the file.
    """
    path = state_file(state_dir)
    old = read_state(path, trust_domain)
    assert old is not None, f"no CA state at {path}"
    new = _new_authority(trust_domain, KeyType.EC_P256, now, lifetime)
    rolled = CaState(current=new, next=None, retired=(old.current, *old.retired), sequence=old.sequence + 1)
    path.write_bytes(encode_state(trust_domain, rolled))
