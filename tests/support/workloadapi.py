"""A real svidgate Workload API on a unix socket, behind the real peercred front, for component tests.

`serve_workload_api()` starts a grpc.aio server with `WorkloadApiServicer` on a private inner socket and a
`PeerCredFront` on the public one, exactly as the runtime wires them, so that a client connecting to
`harness.socket` is identified by its kernel-verified uid/gid. The identities come from a real `BuiltinSource`
(built-in CA, `FakeClock`), so rotation is driven by advancing the clock and calling `source.refresh()`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc.aio

from svidgate.config import Selector, Workload
from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import FakeClock
from svidgate.identity.jwtsvid import JwtSvid
from svidgate.identity.keys import KeyType
from svidgate.identity.snapshot import SnapshotFeed
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.metrics import Metrics
from svidgate.peercred import PeerCredFront, PeerRegistry
from svidgate.sources.builtin import BuiltinSource
from svidgate.workloadapi.server import MintJwtSvid, WorkloadApiServicer
from tests.support.tempdir import short_dir

TRUST_DOMAIN = TrustDomain("example.org")
APP = SpiffeId.parse("spiffe://example.org/app")
APP_ADMIN = SpiffeId.parse("spiffe://example.org/app-admin")
OTHER = SpiffeId.parse("spiffe://example.org/other")


def uid_selector(uid: int | None = None) -> Selector:
    return Selector("unix", "uid", str(os.getuid() if uid is None else uid))


def gid_selector(gid: int | None = None) -> Selector:
    return Selector("unix", "gid", str(os.getgid() if gid is None else gid))


def default_workloads() -> tuple[Workload, ...]:
    """Two identities for this test process (by uid, and by uid+gid) and one for somebody else's uid."""
    return (
        Workload(APP, (uid_selector(),), hint="internal"),
        Workload(OTHER, (uid_selector(os.getuid() + 1),)),
        Workload(APP_ADMIN, (uid_selector(), gid_selector()), hint="admin"),
    )


@dataclass
class Harness:
    """A running Workload API.

    Attributes:
        socket: the public socket (through the peercred front): what clients connect to.
        inner_socket: the gRPC server's own socket (a connection here is not identified).
        clock: drives the CA and the source.
        ca: the built-in CA of `TRUST_DOMAIN`.
        source: the built-in source feeding the servicer.
        feed: `source.feed` (tests may also publish hand-made snapshots on it).
        servicer: the servicer under test.
        registry: the peercred registry.
    """

    socket: Path
    inner_socket: Path
    clock: FakeClock
    ca: BuiltinCa
    source: BuiltinSource
    feed: SnapshotFeed
    servicer: WorkloadApiServicer
    registry: PeerRegistry

    def mint(self, spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        return self.source.mint_jwt_svid(spiffe_id, audience)


@contextlib.asynccontextmanager
async def serve_workload_api(
    workloads: Sequence[Workload] | None = None,
    *,
    metrics: Metrics | None = None,
    mint_jwt_svid: MintJwtSvid | None = None,
    feed: SnapshotFeed | None = None,
    allow_unauthenticated_verifiers: bool = False,
    directory: Path | None = None,
) -> AsyncIterator[Harness]:
    """Start the Workload API (server + peercred front) and stop it on exit.

    Args:
        workloads: `Config.workloads` (default: `default_workloads()`).
        metrics: passed to the servicer.
        mint_jwt_svid: overrides the source's minting (to inject failures, or with `feed` to serve another
            source).
        feed: serve this feed instead of the built-in source's (e.g. a `SpireSource`'s).
        allow_unauthenticated_verifiers: passed to the servicer.
        directory: where the sockets go (default: a fresh short temporary directory, removed on exit). Pass
            the same directory twice to restart a server on the same socket path.
    """
    workloads = default_workloads() if workloads is None else tuple(workloads)
    # Real time: py-spiffe checks JWT-SVID expiry against the wall clock.
    clock = FakeClock(float(int(time.time())))
    ca = BuiltinCa.in_memory(TRUST_DOMAIN, KeyType.EC_P256, clock)
    # The source mints SVIDs for every configured ID, entitled or not: entitlement is the servicer's job.
    source = BuiltinSource(ca, workloads, None, clock)
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(short_dir("wl-"))
        inner_dir = directory / "inner"
        inner_dir.mkdir(mode=0o700, exist_ok=True)
        inner = inner_dir / "wl.sock"
        public = directory / "workload.sock"
        registry = PeerRegistry()
        servicer = WorkloadApiServicer(
            feed or source.feed,
            workloads,
            registry,
            mint_jwt_svid or source.mint_jwt_svid,
            metrics,
            clock,
            allow_unauthenticated_verifiers=allow_unauthenticated_verifiers,
        )
        server = grpc.aio.server()
        servicer.add_to_server(server)
        server.add_insecure_port(f"unix:{inner}")
        await server.start()
        front = PeerCredFront(public, str(inner), registry)
        await front.start()
        try:
            yield Harness(public, inner, clock, ca, source, source.feed, servicer, registry)
        finally:
            await front.close()
            await server.stop(None)
            with contextlib.suppress(OSError):
                inner.unlink()
