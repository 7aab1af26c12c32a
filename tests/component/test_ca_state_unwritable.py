"""A CA state that cannot be written never stops minting from a CA that is still valid (issue 9, item 6).

The state directory is made read-only for real (a read-only bind mount as root: chmod stops nothing there)
just before the clock reaches the CA's prepare point, where the next authority must be persisted.
"""

from __future__ import annotations

import logging

import pytest

from svidgate.config import Selector, Workload
from svidgate.identity.ca import PREPARE_AT, BuiltinCa
from svidgate.identity.clock import FakeClock
from svidgate.identity.keys import KeyType
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import verify_x509_svid
from svidgate.sources.builtin import CA_RETRY_FIRST, BuiltinSource
from tests.support.files import read_only_directory
from tests.support.tempdir import short_dir

TD = TrustDomain("example.org")
APP = SpiffeId.parse("spiffe://example.org/app")
DAY = 86400.0


def test_minting_goes_on_from_the_valid_ca_and_the_rotation_is_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    with short_dir("ca-") as state:
        ca = BuiltinCa.load_or_create(state, TD, KeyType.EC_P256, clock, ca_ttl=DAY)
        source = BuiltinSource(ca, [Workload(APP, (Selector("any"),))], None, clock, x509_svid_ttl=3600)
        first = source.feed.current().svids[APP]
        current = ca.current
        with read_only_directory(state / "ca"), caplog.at_level(logging.INFO):
            clock.now = current.lifetime_point(PREPARE_AT) + 1  # the next authority is due, and the SVID
            assert source.refresh() is True
            svid = source.feed.current().svids[APP]
            assert svid.leaf.serial_number != first.leaf.serial_number
            # Signed by the current authority, which is still valid; nothing unpersisted is in use.
            assert ca.current is current
            assert ca.next is None
            verify_x509_svid(svid.cert_chain, {TD: ca.bundle()}, clock())
            failed = [r for r in caplog.records if r.getMessage() == "ca.state_write_failed"]
            assert len(failed) == 1
            assert "cannot write CA state" in failed[0].fields["error"]  # type: ignore[attr-defined]
            assert failed[0].fields["retry_seconds"] == CA_RETRY_FIRST  # type: ignore[attr-defined]
            (health,) = source.statuses()
            assert (health.source, health.up, dict(health.failures)) == (
                "builtin",
                False,
                {"ca_state_write": 1},
            )
            assert source.next_due() == clock() + CA_RETRY_FIRST
            # Retried with backoff, still failing: logged and counted again, the wait doubles.
            clock.advance(CA_RETRY_FIRST)
            assert source.refresh() is False
            assert source.statuses()[0].failures["ca_state_write"] == 2
            assert source.next_due() == clock() + 2 * CA_RETRY_FIRST
        # Writable again: the next retry persists the prepared authority and the source is up.
        clock.advance(2 * CA_RETRY_FIRST)
        assert source.refresh() is True
        assert ca.next is not None
        assert source.statuses()[0].up
        reloaded = BuiltinCa.load_or_create(state, TD, KeyType.EC_P256, clock, ca_ttl=DAY)
        assert reloaded.next is not None
        assert reloaded.next.certificate == ca.next.certificate


def test_a_restart_on_an_unwritable_disk_mints_from_the_still_valid_ca() -> None:
    clock = FakeClock()
    with short_dir("ca-") as state:
        current = BuiltinCa.load_or_create(state, TD, KeyType.EC_P256, clock, ca_ttl=DAY).current
        clock.now = current.lifetime_point(PREPARE_AT) + 1
        with read_only_directory(state / "ca"):
            ca = BuiltinCa.load_or_create(state, TD, KeyType.EC_P256, clock, ca_ttl=DAY)
            source = BuiltinSource(ca, [Workload(APP, (Selector("any"),))], None, clock)
        assert ca.current.certificate == current.certificate
        assert ca.next is None
        verify_x509_svid(source.feed.current().svids[APP].cert_chain, {TD: ca.bundle()}, clock())
        assert source.statuses()[0].failures["ca_state_write"] == 1
