"""`build_source`, the one place that decides which identity source to build, and what it hands the wiring
(moved from tests/unit/test_sources.py, where `create_source` built builtin and files only)."""

from __future__ import annotations

from pathlib import Path

from svidgate.config import parse_config
from svidgate.identity.bundle import pem_bundle
from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import FakeClock
from svidgate.identity.keys import KeyType
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.sources import BuiltinSource, FileSource
from svidgate.sources.factory import build_source
from svidgate.sources.spire import SpireSource
from tests.support.files import replace_file
from tests.support.workloadapi import APP, serve_workload_api

TD = TrustDomain("example.org")
FRONTEND = SpiffeId.parse("spiffe://example.org/frontend")
NOW = 1_700_000_000.0


async def test_build_source_builtin_persists_the_ca(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    text = (
        f"trust_domain: example.org\nstate_dir: {tmp_path / 'state'}\n"
        "workloads: [{spiffe_id: 'spiffe://example.org/frontend', selectors: [any]}]\n"
    )
    first = await build_source(parse_config(text), clock)
    second = await build_source(parse_config(text), clock)
    assert isinstance(first.source, BuiltinSource)
    assert (
        first.source.feed.current().bundles[TD].x509_authorities
        == second.source.feed.current().bundles[TD].x509_authorities
    )
    # What only the built-in CA can do is handed to the wiring as such.
    assert first.templated is first.source
    assert first.set_workloads is not None
    assert first.set_federation is not None


async def test_build_source_files(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    ca = BuiltinCa.in_memory(TD, KeyType.EC_P256, clock)
    svid = ca.mint_x509_svid(FRONTEND, 3600.0)
    cert, key, bundle = tmp_path / "svid.pem", tmp_path / "svid_key.pem", tmp_path / "bundle.pem"
    replace_file(cert, svid.cert_chain_pem())
    replace_file(key, svid.private_key_pem())
    replace_file(bundle, pem_bundle(ca.bundle()))
    config = parse_config(
        f"trust_domain: example.org\nsource: {{kind: files, cert_file: {cert}, key_file: {key},"
        f" bundle_file: {bundle}}}\n"
    )
    built = await build_source(config, clock)
    assert isinstance(built.source, FileSource)
    assert list(built.source.feed.current().svids) == [FRONTEND]
    assert built.templated is None
    assert built.set_workloads is None


async def test_build_source_spire_connects_to_the_agent() -> None:
    # create_source refused kind spire (it was built in a second place); the one factory builds it too.
    async with serve_workload_api() as agent:
        config = parse_config(f"source: {{kind: spire, spire_socket: {agent.socket}}}\n")
        built = await build_source(config, FakeClock(NOW))
        try:
            assert isinstance(built.source, SpireSource)
            assert APP in built.source.feed.current().svids
            # The Workload API awaits the agent's minting off the event loop; nothing is reloaded into it.
            assert built.mint == built.source.fetch_jwt_svid
            assert built.templated is None
            assert built.set_workloads is None
            assert built.set_federation is None
        finally:
            await built.source.close()
