"""SpireSource against a real Workload API "agent": svidgate's own server on a real unix socket.

The agent is the server of tests/support/workloadapi.py (behind the peercred front, so the source is entitled
by this process's uid, as a SPIRE registration entry would select it). Reconnect backoff is configured to a
few milliseconds; nothing here waits for wall-clock time to pass beyond that.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient as PyWorkloadApiClient
from spiffe.svid.jwt_svid import JwtSvid as PyJwtSvid

from svidgate.errors import SourceError
from svidgate.identity.bundle import Bundle
from svidgate.identity.clock import Clock, system_clock
from svidgate.identity.jwtsvid import validate_jwt_svid
from svidgate.identity.snapshot import IdentitySnapshot
from svidgate.identity.spiffe_id import TrustDomain
from svidgate.sources.spire import SpireSource
from tests.support.ca import TestCA
from tests.support.tempdir import short_dir
from tests.support.workloadapi import APP, APP_ADMIN, TRUST_DOMAIN, Harness, serve_workload_api

PARTNER_TD = TrustDomain("partner.test")


async def connect(endpoint: str, ready_timeout: float = 10, clock: Clock = system_clock) -> SpireSource:
    """Connect with a reconnect backoff of milliseconds, so that tests never wait long for a reconnect."""
    return await SpireSource.connect(
        endpoint, ready_timeout=ready_timeout, clock=clock, backoff_initial=0.005, backoff_max=0.05
    )


@contextlib.asynccontextmanager
async def running(source: SpireSource) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _newer(source: SpireSource, than: IdentitySnapshot) -> IdentitySnapshot:
    return await asyncio.wait_for(source.feed.wait_newer(than.version), 10)


def _serials(snapshot: IdentitySnapshot) -> dict[object, int]:
    return {spiffe_id: svid.leaf.serial_number for spiffe_id, svid in snapshot.svids.items()}


def _spkis(harness: Harness) -> set[bytes]:
    return {
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for key in harness.feed.current().bundles[TRUST_DOMAIN].jwt_authorities.values()
    }


async def test_connect_publishes_the_agents_svids_and_bundles() -> None:
    async with serve_workload_api() as agent:
        source = await connect(str(agent.socket))
        try:
            snapshot = source.feed.current()
        finally:
            await source.close()
    upstream = agent.feed.current()
    assert list(snapshot.svids) == [APP, APP_ADMIN]
    assert _serials(snapshot) == {k: v for k, v in _serials(upstream).items() if k in (APP, APP_ADMIN)}
    assert snapshot.svids[APP].hint == "internal"
    bundle = snapshot.bundles[TRUST_DOMAIN]
    assert bundle.x509_authorities == upstream.bundles[TRUST_DOMAIN].x509_authorities
    assert bundle.jwt_authorities.keys() == upstream.bundles[TRUST_DOMAIN].jwt_authorities.keys()


async def test_connect_fails_cleanly_when_no_agent_answers() -> None:
    with short_dir("wl-") as directory, pytest.raises(SourceError, match=r"no X\.509-SVID within"):
        await connect(str(directory / "absent.sock"), ready_timeout=0.2)


async def test_run_follows_rotations() -> None:
    async with serve_workload_api() as agent:
        source = await connect(str(agent.socket))
        async with running(source):
            before = source.feed.current()
            agent.clock.advance(1801)
            assert agent.source.refresh()
            after = await _newer(source, before)
            while _serials(after) == _serials(before):  # the JWT-bundle stream may publish first
                after = await _newer(source, after)
    assert _serials(after) == {
        k: v for k, v in _serials(agent.feed.current()).items() if k in (APP, APP_ADMIN)
    }


async def test_keeps_the_last_snapshot_while_the_agent_is_away_and_reconnects() -> None:
    with short_dir("wl-") as directory:
        async with serve_workload_api(directory=directory) as agent:
            source = await connect(str(agent.socket))
            first_ca = agent.ca.bundle().x509_authorities
            task = asyncio.create_task(source.run())
            # Let both streams attach before the agent goes away.
            while not all(source.connected.values()):
                await asyncio.sleep(0.005)
        try:
            # Agent stopped: the streams fail and retry, the snapshot stays.
            while any(source.connected.values()):
                await asyncio.sleep(0.005)
            kept = source.feed.current()
            assert list(kept.svids) == [APP, APP_ADMIN]
            assert kept.bundles[TRUST_DOMAIN].x509_authorities == first_ca
            # A new agent on the same socket, with a new CA: the source picks everything up.
            async with serve_workload_api(directory=directory) as restarted:
                fresh = await _newer(source, kept)
                while not fresh.bundles[TRUST_DOMAIN].jwt_authorities or (
                    set(fresh.bundles[TRUST_DOMAIN].jwt_authorities)
                    != set(restarted.feed.current().bundles[TRUST_DOMAIN].jwt_authorities)
                    or fresh.bundles[TRUST_DOMAIN].x509_authorities == first_ca
                ):
                    fresh = await _newer(source, fresh)
                assert fresh.bundles[TRUST_DOMAIN].x509_authorities == restarted.ca.bundle().x509_authorities
                assert _serials(fresh)[APP] == restarted.feed.current().svids[APP].leaf.serial_number
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_jwt_svids_come_from_the_agent_and_are_reused() -> None:
    async with serve_workload_api() as agent:
        source = await connect(str(agent.socket), clock=agent.clock)
        try:
            svid = await source.fetch_jwt_svid(APP_ADMIN, ["backend"])
            again = await source.fetch_jwt_svid(APP_ADMIN, ["backend"])
            # The blocking variant must not run on the loop that serves the agent in this test.
            blocking = await asyncio.to_thread(source.mint_jwt_svid, APP, ["backend"])
            with pytest.raises(SourceError, match="PERMISSION_DENIED"):
                await asyncio.to_thread(source.mint_jwt_svid, TRUST_DOMAIN.id, ["backend"])
            bundles = source.feed.current().bundles
        finally:
            await source.close()
    assert again.token == svid.token
    validated = validate_jwt_svid(svid.token, bundles, ["backend"], now=agent.clock())
    assert validated.spiffe_id == APP_ADMIN
    assert validate_jwt_svid(blocking.token, bundles, ["backend"], now=agent.clock()).spiffe_id == APP


async def test_a_svidgate_on_a_spire_source_serves_py_spiffe() -> None:
    """py-spiffe -> svidgate (on a SpireSource) -> svidgate acting as the agent; JWT-SVIDs minted upstream."""
    async with serve_workload_api() as agent:
        source = await connect(str(agent.socket))
        async with (
            running(source),
            serve_workload_api(feed=source.feed, mint_jwt_svid=source.fetch_jwt_svid) as downstream,
        ):
            with PyWorkloadApiClient(socket_path=f"unix://{downstream.socket}", default_timeout=10) as client:
                jwt = await asyncio.to_thread(client.fetch_jwt_svid, {"backend"})
                bundles = await asyncio.to_thread(client.fetch_jwt_bundles)
                svid = await asyncio.to_thread(client.fetch_x509_svid)
    bundle = bundles.get_bundle_for_trust_domain(jwt.spiffe_id.trust_domain)
    assert bundle is not None
    # Signed by the agent's CA, not by the downstream svidgate's own (unused) built-in CA.
    assert str(PyJwtSvid.parse_and_validate(jwt.token, bundle, {"backend"}).spiffe_id) == str(APP)
    assert set(bundle.jwt_authorities) == set(agent.feed.current().bundles[TRUST_DOMAIN].jwt_authorities)
    assert str(svid.spiffe_id) == str(APP)
    assert svid.leaf.serial_number == agent.feed.current().svids[APP].leaf.serial_number


async def test_agent_bundle_update_without_a_usable_authority_keeps_the_last_good() -> None:
    """Issue 9 item 5 for the SPIRE source: the agent's bundles pass the same acceptance rules."""
    partner = TestCA(PARTNER_TD)
    rejections: list[tuple[TrustDomain, str]] = []
    async with serve_workload_api() as agent:
        current = agent.feed.current()
        agent.feed.publish(
            IdentitySnapshot(
                current.svids, {**current.bundles, PARTNER_TD: partner.bundle()}, current.version + 1
            )
        )
        source = await SpireSource.connect(
            str(agent.socket),
            ready_timeout=10,
            backoff_initial=0.005,
            backoff_max=0.05,
            on_bundle_rejected=lambda td, reason: rejections.append((td, reason)),
        )
        async with running(source):
            before = source.feed.current()
            assert before.bundles[PARTNER_TD].x509_authorities == (partner.certificate,)
            # The partner's X.509 authority is replaced by a leaf: it can never be a trust anchor.
            leaf, _ = partner.create_x509_certificate("spiffe://partner.test/leaf")
            bad = Bundle(
                PARTNER_TD, x509_authorities=(leaf,), jwt_authorities=partner.bundle().jwt_authorities
            )
            agent.feed.publish(
                IdentitySnapshot(current.svids, {**current.bundles, PARTNER_TD: bad}, current.version + 2)
            )
            after = await _newer(source, before)
            assert after.bundles[PARTNER_TD].x509_authorities == (partner.certificate,)
            assert rejections == [(PARTNER_TD, "no_usable_x509_authority")]
            # A genuine rollover (the new root added beside the old) is applied.
            rolled = TestCA(PARTNER_TD)
            good = Bundle(
                PARTNER_TD,
                x509_authorities=(partner.certificate, rolled.certificate),
                jwt_authorities=partner.bundle().jwt_authorities,
            )
            agent.feed.publish(
                IdentitySnapshot(current.svids, {**current.bundles, PARTNER_TD: good}, current.version + 3)
            )
            latest = await _newer(source, after)
            assert latest.bundles[PARTNER_TD].x509_authorities == (partner.certificate, rolled.certificate)
            assert rejections == [(PARTNER_TD, "no_usable_x509_authority")]
