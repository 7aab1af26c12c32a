"""A peer-credential front on a public unix socket claimed the way `svidgate serve` claims it."""

from __future__ import annotations

from pathlib import Path

from svidgate.peercred import Attest, PeerCredFront, PeerRegistry
from svidgate.runtime.listeners import UnixSocketClaim


class ClaimedFront(PeerCredFront):
    """`PeerCredFront` plus the `UnixSocketClaim` that owns its socket file (lock, stale-socket probe, mode,
    removal on close), as `svidgate.runtime.listeners.Listeners` pairs them.

    Args:
        path: the public socket.
        inner_path: the server's inner socket the front forwards to.
        registry: where connections are recorded.
        attest: run on every caller before its connection is forwarded, or None.
        mode: the socket file's mode.
    """

    def __init__(
        self,
        path: Path,
        inner_path: str,
        registry: PeerRegistry,
        attest: Attest | None = None,
        mode: int = 0o600,
    ) -> None:
        self.claim = UnixSocketClaim(path, mode)
        self.claim.claim()
        try:
            listening = self.claim.listen()
        except BaseException:
            self.claim.release()
            raise
        super().__init__(path, listening, inner_path, registry, attest=attest)

    async def start(self) -> None:
        try:
            await super().start()
        except BaseException:
            self.claim.release()
            raise

    async def close(self) -> None:
        await super().close()
        self.claim.release()
