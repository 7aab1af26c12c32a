"""Identity sources: the built-in CA source and the watched-files source, driven by a FakeClock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from cryptography import x509

from svidgate.config import BundleEndpoint, FederationConfig, Selector, Workload, parse_config
from svidgate.errors import SourceError
from svidgate.identity.bundle import MAX_BUNDLE_BYTES, Bundle, pem_bundle, spiffe_bundle_json
from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import FakeClock
from svidgate.identity.jwtsvid import validate_jwt_svid
from svidgate.identity.keys import KeyType
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import verify_x509_svid
from svidgate.sources import BuiltinSource, FileSource, create_source
from svidgate.sources.federation import FederatedBundles
from tests.support.ca import TestCA
from tests.support.files import replace_file

TD = TrustDomain("example.org")
FRONTEND = SpiffeId.parse("spiffe://example.org/frontend")
BACKEND = SpiffeId.parse("spiffe://example.org/backend")
HOUR = 3600.0
DAY = 86400.0


def workload(spiffe_id: SpiffeId, *, dns: tuple[str, ...] = (), hint: str = "") -> Workload:
    return Workload(spiffe_id, (Selector("any"),), dns, hint)


@pytest.fixture
def ca(clock: FakeClock) -> BuiltinCa:
    return BuiltinCa.in_memory(TD, KeyType.EC_P256, clock, ca_ttl=30 * DAY)


def builtin(ca: BuiltinCa, clock: FakeClock, **kwargs: object) -> BuiltinSource:
    workloads = [
        workload(FRONTEND, dns=("frontend.local",), hint="fe"),
        workload(BACKEND),
        workload(FRONTEND),
    ]
    return BuiltinSource(ca, workloads, None, clock, x509_svid_ttl=HOUR, jwt_svid_ttl=300, **kwargs)  # type: ignore[arg-type]


# -- BuiltinSource ---------------------------------------------------------------------------------


def test_builtin_first_snapshot_has_one_svid_per_id(ca: BuiltinCa, clock: FakeClock) -> None:
    source = builtin(ca, clock)
    snapshot = source.feed.current()
    assert snapshot.version == 1
    assert set(snapshot.svids) == {FRONTEND, BACKEND}
    assert set(snapshot.bundles) == {TD}
    frontend = snapshot.svids[FRONTEND]
    assert frontend.hint == "fe"
    assert verify_x509_svid(frontend.cert_chain, snapshot.bundles, clock()) == FRONTEND
    assert frontend.expires_at == pytest.approx(clock() + HOUR, abs=1)


def test_builtin_refresh_publishes_only_on_change(ca: BuiltinCa, clock: FakeClock) -> None:
    source = builtin(ca, clock)
    first = source.feed.current()
    clock.advance(HOUR / 2 - 10)
    assert source.refresh() is False
    assert source.feed.current() is first
    clock.advance(20)  # past half the TTL: re-mint
    assert source.refresh() is True
    second = source.feed.current()
    assert second.version == 2
    assert second.svids[FRONTEND] is not first.svids[FRONTEND]
    assert second.svids[FRONTEND].expires_at > first.svids[FRONTEND].expires_at
    assert source.refresh() is False


def test_builtin_set_workloads_mints_new_ids_and_drops_removed_ones(ca: BuiltinCa, clock: FakeClock) -> None:
    source = builtin(ca, clock)
    first = source.feed.current()
    web = SpiffeId.parse("spiffe://example.org/web")
    # A reload adds web, drops backend, and changes frontend's DNS names.
    assert source.set_workloads([workload(FRONTEND, dns=("fe.internal",)), workload(web)]) is True
    second = source.feed.current()
    assert second.version == first.version + 1
    assert set(second.svids) == {FRONTEND, web}
    frontend = second.svids[FRONTEND].leaf
    dns = frontend.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert dns.get_values_for_type(x509.DNSName) == ["fe.internal"]
    assert verify_x509_svid(second.svids[web].cert_chain, second.bundles, clock()) == web
    with pytest.raises(SourceError, match="not a configured workload"):
        source.mint_jwt_svid(BACKEND, ["aud"])
    # The same workloads again: nothing to publish.
    assert source.set_workloads([workload(FRONTEND, dns=("fe.internal",)), workload(web)]) is False
    assert source.feed.current() is second


def test_builtin_next_due_is_the_svid_half_life(ca: BuiltinCa, clock: FakeClock) -> None:
    source = builtin(ca, clock)
    assert source.next_due() == pytest.approx(clock() + HOUR / 2, abs=1)


def test_builtin_follows_ca_rotation(ca: BuiltinCa, clock: FakeClock) -> None:
    source = builtin(ca, clock)
    first = source.feed.current()
    root = ca.current.certificate
    # Walk the clock in steps no longer than the SVID half-life, as `run()` would.
    published = 0
    while ca.current.certificate is root:
        clock.advance(HOUR / 2)
        published += source.refresh()
    snapshot = source.feed.current()
    assert snapshot.version == first.version + published
    # After the switch every SVID is signed by the new authority and verifies against the published bundle.
    for spiffe_id, svid in snapshot.svids.items():
        assert svid.leaf.issuer == ca.current.certificate.subject
        assert verify_x509_svid(svid.cert_chain, snapshot.bundles, clock()) == spiffe_id
    assert len(snapshot.bundles[TD].x509_authorities) >= 2  # old root still published


def test_builtin_mint_jwt_svid_validates_and_is_reused(ca: BuiltinCa, clock: FakeClock) -> None:
    source = builtin(ca, clock)
    svid = source.mint_jwt_svid(FRONTEND, ["spiffe://example.org/backend"])
    validated = validate_jwt_svid(
        svid.token, source.feed.current().bundles, ["spiffe://example.org/backend"], clock()
    )
    assert validated.spiffe_id == FRONTEND
    assert source.mint_jwt_svid(FRONTEND, ["spiffe://example.org/backend"]) is svid
    clock.advance(151)  # past half of the 300 s lifetime
    assert source.mint_jwt_svid(FRONTEND, ["spiffe://example.org/backend"]).token != svid.token


def test_builtin_mint_jwt_svid_refuses_unknown_ids(ca: BuiltinCa, clock: FakeClock) -> None:
    source = builtin(ca, clock)
    with pytest.raises(SourceError, match="not a configured workload"):
        source.mint_jwt_svid(SpiffeId.parse("spiffe://example.org/other"), ["a"])
    with pytest.raises(SourceError, match="at least one audience"):
        source.mint_jwt_svid(FRONTEND, [])


async def test_builtin_refresh_failure_keeps_the_last_snapshot(
    ca: BuiltinCa, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = builtin(ca, clock)
    first = source.feed.current()

    def broken(*args: object, **kwargs: object) -> object:
        from svidgate.errors import CaError

        raise CaError("disk full")

    monkeypatch.setattr(ca, "mint_x509_svid", broken)
    clock.advance(HOUR)
    with caplog.at_level(logging.ERROR):
        assert source.refresh() is False
    assert source.feed.current() is first
    assert "source.refresh_failed" in caplog.messages


async def test_builtin_run_sleeps_until_the_next_due_time(ca: BuiltinCa, clock: FakeClock) -> None:
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.advance(seconds)
        if len(sleeps) == 3:
            raise asyncio.CancelledError

    source = builtin(ca, clock, sleep=fake_sleep)
    with pytest.raises(asyncio.CancelledError):
        await source.run()
    # Never longer than MAX_SLEEP; the loop re-mints when the half-life comes (1800 s away, reached in steps).
    assert sleeps == [60.0, 60.0, 60.0]
    assert source.feed.current().version == 1


async def test_builtin_run_publishes_from_the_loop(ca: BuiltinCa, clock: FakeClock) -> None:
    async def fake_sleep(seconds: float) -> None:
        clock.advance(HOUR)
        await asyncio.sleep(0)

    source = builtin(ca, clock, sleep=fake_sleep)
    task = asyncio.create_task(source.run())
    try:
        snapshot = await asyncio.wait_for(source.feed.wait_newer(1), timeout=10)
        assert snapshot.version >= 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_builtin_merges_federated_bundles(ca: BuiltinCa, clock: FakeClock, tmp_path: Path) -> None:
    other_td = TrustDomain("other.org")
    other_ca = BuiltinCa.in_memory(other_td, KeyType.EC_P256, clock)
    bundle_file = tmp_path / "other.json"
    replace_file(bundle_file, spiffe_bundle_json(other_ca.bundle()))
    config = parse_config(
        f"trust_domain: example.org\nfederation: {{other.org: {{bundle_file: {bundle_file}}}}}\n"
    )
    federation = FederatedBundles(config.federation, clock, poll_interval=5)
    source = BuiltinSource(ca, [workload(FRONTEND)], federation, clock)
    assert set(source.feed.current().bundles) == {TD, other_td}
    assert source.refresh() is False


def test_create_source_builtin_persists_the_ca(tmp_path: Path, clock: FakeClock) -> None:
    text = (
        f"trust_domain: example.org\nstate_dir: {tmp_path / 'state'}\n"
        "workloads: [{spiffe_id: 'spiffe://example.org/frontend', selectors: [any]}]\n"
    )
    first = create_source(parse_config(text), clock)
    second = create_source(parse_config(text), clock)
    assert isinstance(first, BuiltinSource)
    assert (
        first.feed.current().bundles[TD].x509_authorities
        == second.feed.current().bundles[TD].x509_authorities
    )


def test_create_source_rejects_spire(tmp_path: Path) -> None:
    config = parse_config(f"state_dir: {tmp_path}\nsource: {{kind: spire, spire_socket: /run/agent.sock}}\n")
    with pytest.raises(SourceError, match="spire"):
        create_source(config)


# -- FileSource ------------------------------------------------------------------------------------


class Files:
    def __init__(self, directory: Path, ca: BuiltinCa) -> None:
        self.ca = ca
        self.cert = directory / "svid.pem"
        self.key = directory / "svid_key.pem"
        self.bundle = directory / "bundle.pem"

    def write_svid(self, spiffe_id: SpiffeId = FRONTEND) -> None:
        svid = self.ca.mint_x509_svid(spiffe_id, HOUR)
        replace_file(self.cert, svid.cert_chain_pem())
        replace_file(self.key, svid.private_key_pem())
        replace_file(self.bundle, pem_bundle(self.ca.bundle()))

    def source(self, clock: FakeClock) -> FileSource:
        return FileSource(self.cert, self.key, self.bundle, TD, None, clock, poll_interval=5)


@pytest.fixture
def files(tmp_path: Path, ca: BuiltinCa) -> Files:
    f = Files(tmp_path, ca)
    f.write_svid()
    return f


def test_files_first_snapshot(files: Files, clock: FakeClock) -> None:
    source = files.source(clock)
    snapshot = source.feed.current()
    assert snapshot.version == 1
    assert list(snapshot.svids) == [FRONTEND]
    assert list(snapshot.bundles) == [TD]
    assert source.refresh() is False


def test_files_reload_after_change(files: Files, clock: FakeClock) -> None:
    source = files.source(clock)
    first = source.feed.current().svids[FRONTEND]
    files.write_svid()
    assert source.refresh() is False  # not yet due
    clock.advance(5)
    assert source.refresh() is True
    snapshot = source.feed.current()
    assert snapshot.version == 2
    assert snapshot.svids[FRONTEND].leaf != first.leaf
    clock.advance(5)
    assert source.refresh() is False  # unchanged bytes publish nothing


def test_files_bad_combination_keeps_last_good_and_logs_once(
    files: Files, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    source = files.source(clock)
    good = source.feed.current()
    other = files.ca.mint_x509_svid(FRONTEND, HOUR)
    replace_file(files.key, other.private_key_pem())  # the key no longer fits the certificate
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            clock.advance(5)
            assert source.refresh() is False
    assert source.feed.current() is good
    assert caplog.messages.count("source.files_invalid") == 1
    replace_file(files.cert, other.cert_chain_pem())  # the writer finishes: a good combination again
    clock.advance(5)
    assert source.refresh() is True
    assert source.feed.current().svids[FRONTEND].leaf == other.leaf


class Rejections(list[tuple[TrustDomain, str]]):
    def __call__(self, trust_domain: TrustDomain, reason: str) -> None:
        self.append((trust_domain, reason))


@pytest.mark.parametrize(
    ("bundle", "reason"),
    [
        # A leaf where the CA should be: it can never be a trust anchor, and nothing else is left.
        (lambda f: f.ca.mint_x509_svid(BACKEND, HOUR).cert_chain_pem(), "no_usable_authority"),
        (lambda f: b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "malformed"),
        (lambda f: b"#" * (MAX_BUNDLE_BYTES + 1), "too_large"),
    ],
    ids=["leaf-as-ca", "malformed", "over-1MiB"],
)
def test_files_rejected_own_bundle_keeps_last_good(
    files: Files,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    bundle: Callable[[Files], bytes],
    reason: str,
) -> None:
    sink = Rejections()
    source = FileSource(
        files.cert, files.key, files.bundle, TD, None, clock, poll_interval=5, on_bundle_rejected=sink
    )
    good = source.feed.current()
    replace_file(files.bundle, bundle(files))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            clock.advance(5)
            assert source.refresh() is False
    assert source.feed.current() is good
    assert sink == [(TD, reason)]
    (line,) = [r.fields for r in caplog.records if r.getMessage() == "bundle.update_rejected"]  # type: ignore[attr-defined]
    assert (line["trust_domain"], line["reason"], line["kept_last"]) == ("example.org", reason, True)


def test_files_start_refuses_a_bundle_without_a_usable_authority(files: Files, clock: FakeClock) -> None:
    replace_file(files.bundle, files.ca.mint_x509_svid(BACKEND, HOUR).cert_chain_pem())
    with pytest.raises(SourceError, match=r"no usable authority .*basicConstraints cA is false"):
        files.source(clock)


def test_files_accepts_a_spiffe_bundle_document(files: Files, clock: FakeClock) -> None:
    replace_file(files.bundle, spiffe_bundle_json(files.ca.bundle()))
    source = files.source(clock)
    assert source.feed.current().bundles[TD].jwt_authorities


def test_files_missing_file_at_start_is_a_source_error(files: Files, clock: FakeClock) -> None:
    files.key.unlink()
    with pytest.raises(SourceError, match=r"cannot read .*svid_key\.pem"):
        files.source(clock)


def test_files_reject_an_svid_of_another_trust_domain(tmp_path: Path, clock: FakeClock) -> None:
    other = Files(tmp_path, BuiltinCa.in_memory(TrustDomain("other.org"), KeyType.EC_P256, clock))
    other.write_svid(SpiffeId.parse("spiffe://other.org/x"))
    with pytest.raises(SourceError, match=r"not in the trust domain example\.org"):
        other.source(clock)


def test_files_reject_a_chain_the_bundle_does_not_vouch_for(files: Files, clock: FakeClock) -> None:
    stranger = BuiltinCa.in_memory(TD, KeyType.EC_P256, clock)
    replace_file(files.bundle, pem_bundle(stranger.bundle()))
    with pytest.raises(SourceError, match="no valid path"):
        files.source(clock)


def test_files_cannot_mint_jwt(files: Files, clock: FakeClock) -> None:
    with pytest.raises(SourceError, match="cannot mint JWT-SVIDs"):
        files.source(clock).mint_jwt_svid(FRONTEND, ["a"])


def test_create_source_files(files: Files, clock: FakeClock) -> None:
    config = parse_config(
        f"trust_domain: example.org\nsource: {{kind: files, cert_file: {files.cert}, key_file: {files.key},"
        f" bundle_file: {files.bundle}}}\n"
    )
    source = create_source(config, clock)
    assert isinstance(source, FileSource)
    assert list(source.feed.current().svids) == [FRONTEND]


async def test_files_with_an_intermediate_chain(tmp_path: Path, clock: FakeClock) -> None:
    root = TestCA(TD)
    svid = root.child_ca().create_x509_svid(FRONTEND)
    cert, key, bundle = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "b.pem"
    replace_file(cert, svid.cert_chain_pem())
    replace_file(key, svid.private_key_pem())
    replace_file(bundle, pem_bundle(root.bundle()))
    source = FileSource(cert, key, bundle, TD, None, clock)
    assert len(source.feed.current().svids[FRONTEND].cert_chain) == 2


# -- federation under a source: its own tasks, published by the source --------------------------------

OTHER_TD = TrustDomain("other.org")


def _endpoint_federation(clock: FakeClock, document: bytes, hang: asyncio.Event) -> FederatedBundles:
    async def fetch(endpoint: BundleEndpoint, bundles: Mapping[TrustDomain, Bundle]) -> bytes:
        await hang.wait()
        return document

    endpoint = BundleEndpoint("https://other.org/bundle", "https_web", timeout=30)
    return FederatedBundles({OTHER_TD: FederationConfig(bundle_endpoint=endpoint)}, clock, fetch=fetch)


@pytest.mark.parametrize("kind", ["builtin", "files"])
async def test_a_source_publishes_federated_bundles_its_tasks_fetch(
    kind: str, ca: BuiltinCa, clock: FakeClock, tmp_path: Path
) -> None:
    other = BuiltinCa.in_memory(OTHER_TD, KeyType.EC_P256, clock)
    released = asyncio.Event()
    federation = _endpoint_federation(clock, spiffe_bundle_json(other.bundle()), released)
    source: BuiltinSource | FileSource
    if kind == "builtin":
        # Construction never waits for the endpoint (the fetch would hang until released).
        source = BuiltinSource(ca, [workload(FRONTEND)], federation, clock)
    else:
        files = Files(tmp_path, ca)
        files.write_svid()
        source = FileSource(files.cert, files.key, files.bundle, TD, federation, clock)
    first = source.feed.current()
    assert set(first.bundles) == {TD}
    task = asyncio.create_task(source.run())
    try:
        # While the fetch hangs, the own identity still refreshes at once.
        await asyncio.sleep(0)
        assert source.refresh() is False
        assert [s.source for s in source.statuses()] == [kind, "federation"]
        released.set()
        snapshot = await asyncio.wait_for(source.feed.wait_newer(first.version), 10)
        assert set(snapshot.bundles) == {TD, OTHER_TD}
        assert snapshot.svids.keys() == first.svids.keys()
        assert source.statuses()[1].up
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_reload_adds_a_partner_at_once_and_removes_it_at_once(
    ca: BuiltinCa, clock: FakeClock, tmp_path: Path
) -> None:
    """`set_federation` under a running source: a new trust domain's task starts and publishes its bundle
    without waiting for any schedule; a removed one leaves the snapshot before `set_federation` returns."""
    other = BuiltinCa.in_memory(OTHER_TD, KeyType.EC_P256, clock)
    bundle_file = tmp_path / "other.json"
    replace_file(bundle_file, spiffe_bundle_json(other.bundle()))
    source = BuiltinSource(ca, [workload(FRONTEND)], None, clock)  # nothing federated at start
    task = asyncio.create_task(source.run())
    try:
        await asyncio.sleep(0)
        first = source.feed.current()
        source.set_federation({OTHER_TD: FederationConfig(bundle_file=bundle_file)})
        snapshot = await asyncio.wait_for(source.feed.wait_newer(first.version), 10)
        assert OTHER_TD in snapshot.bundles
        source.set_federation({})
        assert OTHER_TD not in source.feed.current().bundles
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
