"""svidgate's Workload API, exercised with py-spiffe (the `spiffe` package) as the real client.

Every test starts the real server behind the real peercred front (tests/support/workloadapi.py), so the
test process is identified by its own kernel-verified uid/gid. py-spiffe's client is synchronous (it blocks on
grpc's sync API, and its watchers run in threads), so its calls run in worker threads while the server runs on
the test's event loop.
"""

from __future__ import annotations

import asyncio
import os
import queue
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from spiffe import JwtBundleSet, WorkloadApiClient
from spiffe.spiffe_id.spiffe_id import SpiffeId as PySpiffeId
from spiffe.spiffe_id.spiffe_id import TrustDomain as PyTrustDomain
from spiffe.svid.jwt_svid import JwtSvid as PyJwtSvid
from spiffe.workloadapi.errors import (
    FetchJwtSvidError,
    FetchX509BundleError,
    FetchX509SvidError,
    ValidateJwtSvidError,
)
from spiffe.workloadapi.x509_context import X509Context

from svidgate.config import Workload
from svidgate.identity.bundle import Bundle
from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import FakeClock
from svidgate.identity.keys import KeyType
from svidgate.identity.snapshot import IdentitySnapshot
from svidgate.identity.spiffe_id import TrustDomain
from svidgate.identity.x509svid import verify_x509_svid
from tests.support.workloadapi import (
    APP,
    APP_ADMIN,
    OTHER,
    TRUST_DOMAIN,
    Harness,
    serve_workload_api,
    uid_selector,
)

PARTNER = TrustDomain("partner.test")


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    async with serve_workload_api() as running:
        yield running


def _client(harness: Harness) -> WorkloadApiClient:
    # The spec's URI form; py-spiffe also reads SPIFFE_ENDPOINT_SOCKET, which tests leave alone.
    return WorkloadApiClient(socket_path=f"unix://{harness.socket}", default_timeout=10)


def _der(cert: Any) -> bytes:
    return bytes(cert.public_bytes(serialization.Encoding.DER))


def _with_partner_bundle(harness: Harness) -> Bundle:
    """Publish the current snapshot plus a federated trust domain's bundle; return that bundle."""
    partner = BuiltinCa.in_memory(PARTNER, KeyType.EC_P384, FakeClock(harness.clock())).bundle()
    current = harness.feed.current()
    harness.feed.publish(
        IdentitySnapshot(current.svids, {**current.bundles, PARTNER: partner}, current.version + 1)
    )
    return partner


async def test_fetch_x509_svid_returns_the_default_identity(harness: Harness) -> None:
    with _client(harness) as client:
        svid = await asyncio.to_thread(client.fetch_x509_svid)
    # The first entitled workload in configuration order is the default (SPIFFE_Workload_API.md 5.3).
    assert str(svid.spiffe_id) == str(APP)
    served = harness.feed.current().svids[APP]
    assert [_der(c) for c in svid.cert_chain] == [_der(c) for c in served.cert_chain]
    assert svid.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == served.leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def test_fetch_x509_svids_returns_every_entitled_identity_and_nothing_else(harness: Harness) -> None:
    with _client(harness) as client:
        svids = await asyncio.to_thread(client.fetch_x509_svids)
    # OTHER is configured for another uid: never served to us.
    assert [str(s.spiffe_id) for s in svids] == [str(APP), str(APP_ADMIN)]


async def test_x509_context_chain_verifies_against_the_fetched_bundle(harness: Harness) -> None:
    partner = _with_partner_bundle(harness)
    with _client(harness) as client:
        context: X509Context = await asyncio.to_thread(client.fetch_x509_context)
    own = context.x509_bundle_set.get_bundle_for_trust_domain(PyTrustDomain(TRUST_DOMAIN.name))
    federated = context.x509_bundle_set.get_bundle_for_trust_domain(PyTrustDomain(PARTNER.name))
    assert own is not None
    assert federated is not None
    assert [_der(c) for c in own.x509_authorities] == [_der(c) for c in harness.ca.bundle().x509_authorities]
    assert [_der(c) for c in federated.x509_authorities] == [_der(c) for c in partner.x509_authorities]
    # Path validation of what py-spiffe parsed, against the bundle py-spiffe parsed.
    bundles = {TRUST_DOMAIN: Bundle(TRUST_DOMAIN, tuple(own.x509_authorities))}
    verified = verify_x509_svid(context.default_svid.cert_chain, bundles, harness.clock())
    assert verified == APP


async def test_fetch_x509_bundles_lists_own_and_federated_trust_domains(harness: Harness) -> None:
    _with_partner_bundle(harness)
    with _client(harness) as client:
        bundle_set = await asyncio.to_thread(client.fetch_x509_bundles)
    assert {str(b.trust_domain) for b in bundle_set.bundles} == {TRUST_DOMAIN.name, PARTNER.name}


async def test_jwt_svid_validates_with_py_spiffe_and_the_fetched_jwt_bundle(harness: Harness) -> None:
    with _client(harness) as client:
        svid = await asyncio.to_thread(client.fetch_jwt_svid, {"backend"})
        bundles: JwtBundleSet = await asyncio.to_thread(client.fetch_jwt_bundles)
        bundle = bundles.get_bundle_for_trust_domain(PyTrustDomain(TRUST_DOMAIN.name))
        assert bundle is not None
        validated = PyJwtSvid.parse_and_validate(svid.token, bundle, {"backend"})
        # And the server validates it too (ValidateJWTSVID).
        remote = await asyncio.to_thread(client.validate_jwt_svid, svid.token, "backend")
    assert str(validated.spiffe_id) == str(APP)
    assert validated.audience == {"backend"}
    assert str(remote.spiffe_id) == str(APP)


async def test_fetch_jwt_svids_for_all_identities_and_for_one_subject(harness: Harness) -> None:
    with _client(harness) as client:
        all_svids = await asyncio.to_thread(client.fetch_jwt_svids, {"a", "b"})
        admin = await asyncio.to_thread(client.fetch_jwt_svid, {"a"}, PySpiffeId(str(APP_ADMIN)))
        with pytest.raises(FetchJwtSvidError, match="PERMISSION_DENIED"):
            await asyncio.to_thread(client.fetch_jwt_svid, {"a"}, PySpiffeId(str(OTHER)))
    assert [str(s.spiffe_id) for s in all_svids] == [str(APP), str(APP_ADMIN)]
    assert all(s.audience == {"a", "b"} for s in all_svids)
    assert str(admin.spiffe_id) == str(APP_ADMIN)


async def test_validate_jwt_svid_rejects_another_audience(harness: Harness) -> None:
    token = harness.mint(APP, ["backend"]).token
    with _client(harness) as client, pytest.raises(ValidateJwtSvidError, match="INVALID_ARGUMENT"):
        await asyncio.to_thread(client.validate_jwt_svid, token, "frontend")


async def test_x509_stream_pushes_a_rotation_and_never_a_duplicate(harness: Harness) -> None:
    updates: queue.Queue[X509Context | Exception] = queue.Queue()
    with _client(harness) as client:
        handler = client.stream_x509_contexts(updates.put, updates.put, retry_connect=False)
        try:
            first = await asyncio.to_thread(updates.get, True, 10)
            assert isinstance(first, X509Context)
            # A new snapshot with identical content must not produce a message...
            current = harness.feed.current()
            harness.feed.publish(IdentitySnapshot(current.svids, current.bundles, current.version + 1))
            # ...while a rotation must: past half of the SVIDs' lifetime the source re-mints them.
            harness.clock.advance(1801)
            assert harness.source.refresh()
            second = await asyncio.to_thread(updates.get, True, 10)
        finally:
            handler.cancel()
    assert isinstance(second, X509Context)
    assert second.default_svid.leaf.serial_number != first.default_svid.leaf.serial_number
    assert second.default_svid.leaf.serial_number == harness.feed.current().svids[APP].leaf.serial_number
    assert updates.empty()


async def test_jwt_bundle_stream_pushes_a_new_trust_domain(harness: Harness) -> None:
    updates: queue.Queue[JwtBundleSet | Exception] = queue.Queue()
    with _client(harness) as client:
        handler = client.stream_jwt_bundles(updates.put, updates.put, retry_connect=False)
        try:
            first = await asyncio.to_thread(updates.get, True, 10)
            partner = _with_partner_bundle(harness)
            second = await asyncio.to_thread(updates.get, True, 10)
        finally:
            handler.cancel()
    assert isinstance(first, JwtBundleSet)
    assert isinstance(second, JwtBundleSet)
    assert {str(b.trust_domain) for b in first.bundles} == {TRUST_DOMAIN.name}
    federated = second.get_bundle_for_trust_domain(PyTrustDomain(PARTNER.name))
    assert federated is not None
    assert set(federated.jwt_authorities) == set(partner.jwt_authorities)


async def test_a_caller_entitled_to_nothing_is_denied() -> None:
    # Only another uid is configured: this process is entitled to nothing.
    workloads = (Workload(OTHER, (uid_selector(os.getuid() + 1),)),)
    async with serve_workload_api(workloads) as harness, harness_client(harness) as client:
        with pytest.raises(FetchX509SvidError, match="PERMISSION_DENIED"):
            await asyncio.to_thread(client.fetch_x509_svid)
        with pytest.raises(FetchX509BundleError, match="PERMISSION_DENIED"):
            await asyncio.to_thread(client.fetch_x509_bundles)
        with pytest.raises(FetchJwtSvidError, match="PERMISSION_DENIED"):
            await asyncio.to_thread(client.fetch_jwt_svid, {"backend"})


async def test_missing_security_header_is_invalid_argument(harness: Harness) -> None:
    # py-spiffe always sends the header, so call the wire path directly without it.
    from spiffe._proto import workload_pb2 as spiffe_pb2

    async with grpc.aio.insecure_channel(f"unix:{harness.socket}") as channel:
        fetch = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509SVID",
            request_serializer=spiffe_pb2.X509SVIDRequest.SerializeToString,
            response_deserializer=spiffe_pb2.X509SVIDResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in fetch(spiffe_pb2.X509SVIDRequest()):
                pass
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        wrong = channel.unary_unary(
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            request_serializer=spiffe_pb2.JWTSVIDRequest.SerializeToString,
            response_deserializer=spiffe_pb2.JWTSVIDResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            # "True" is not "true": the value is case-sensitive (SPIFFE_Workload_Endpoint.md 3).
            await wrong(spiffe_pb2.JWTSVIDRequest(audience=["x"]), metadata=(("workload.spiffe.io", "True"),))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class harness_client:
    """``async with harness_client(h) as client``: a py-spiffe client closed on exit."""

    def __init__(self, harness: Harness) -> None:
        self._client = _client(harness)

    async def __aenter__(self) -> WorkloadApiClient:
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        self._client.close()
