"""SDS with a templated workload on a real gRPC server: the attested caller's SVID is minted on its first
request, held while its stream is open, and an ID its values cannot make is refused (logged, counted).

The peer registry is a stand-in that reports an attested caller (what the peercred front records after
`KubernetesAttestor`); the front and attestation themselves run for real in tests/e2e/test_k8s_envoy.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from svidgate.config import Selector, Workload
from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import FakeClock
from svidgate.identity.entitlement import CallerInfo, KubernetesWorkload
from svidgate.identity.keys import KeyType
from svidgate.identity.spiffe_id import SpiffeId
from svidgate.identity.template import SpiffeIdTemplate
from svidgate.metrics import Metrics
from svidgate.peercred import PeerRegistry
from svidgate.sources import BuiltinSource
from svidgate.sources.builtin import TEMPLATED_IDLE
from tests.component.sds_fixtures import TD, Responses, sds_server, secrets_of, sotw_request, stub

MESH = Workload(
    SpiffeIdTemplate.parse("spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}"), (Selector.parse("k8s:ns:shop"),)
)
FRONTEND = SpiffeId.parse("spiffe://example.org/ns/shop/sa/frontend")


class AttestedPeers(PeerRegistry):
    """Every peer is `caller`."""

    def __init__(self, caller: CallerInfo) -> None:
        super().__init__()
        self.caller = caller

    def lookup(self, peer: str) -> CallerInfo | None:
        return self.caller


def in_pod(service_account: str) -> CallerInfo:
    pod = KubernetesWorkload("shop", service_account, "p-1", "uid-1", "node-1", "envoy")
    return CallerInfo(uid=1337, gid=1337, pid=4242, k8s=pod)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture
def source(clock: FakeClock) -> BuiltinSource:
    ca = BuiltinCa.in_memory(TD, KeyType.EC_P256, clock)
    return BuiltinSource(ca, [MESH], None, clock)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry(), process_metrics=False)


async def open_stream(
    source: BuiltinSource, metrics: Metrics, caller: CallerInfo
) -> AsyncIterator[Responses]:
    async with (
        sds_server(source.feed, (MESH,), peers=AttestedPeers(caller), metrics=metrics, templated=source) as (
            _,
            target,
        ),
        grpc.aio.insecure_channel(target) as channel,
    ):
        call = stub(channel).StreamSecrets()
        responses = Responses(call)
        await call.write(sotw_request(["default"], node_id="envoy"))
        try:
            yield responses
        finally:
            responses.close()


async def test_templated_svid_is_minted_for_the_caller_and_held_while_its_stream_is_open(
    source: BuiltinSource, metrics: Metrics, clock: FakeClock
) -> None:
    stream = open_stream(source, metrics, in_pod("frontend"))
    responses = await anext(stream)
    secret = secrets_of(await responses.next())["default"]
    chain = secret.tls_certificate.certificate_chain.inline_bytes
    leaf = x509.load_pem_x509_certificates(chain)[0]
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [str(FRONTEND)]
    assert source.templated_svids == 1
    clock.advance(TEMPLATED_IDLE + 1)
    source.refresh()
    assert FRONTEND in source.feed.current().svids  # held: the stream is open
    await stream.aclose()
    # The server sees the cancellation and releases the hold: the idle expiry becomes the next due time.
    async with asyncio.timeout(5):
        while source.next_due() > clock() + TEMPLATED_IDLE:
            await asyncio.sleep(0.01)
    clock.advance(TEMPLATED_IDLE + 1)
    assert source.refresh() is True
    assert FRONTEND not in source.feed.current().svids
    assert source.templated_svids == 0


async def test_an_id_the_callers_values_cannot_make_is_refused_logged_and_counted(
    source: BuiltinSource, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    stream = open_stream(source, metrics, in_pod(".."))
    responses = await anext(stream)
    try:
        await responses.none()  # "default" is not sent: the caller is entitled to nothing
    finally:
        await stream.aclose()
    refused = [r for r in caplog.records if r.getMessage() == "sds.templated_id_refused"]
    assert len(refused) == 1
    assert "'..'" in refused[0].fields["error"]  # type: ignore[attr-defined]
    value = metrics.registry.get_sample_value(
        "svidgate_templated_spiffe_ids_refused_total", {"service": "sds"}
    )
    assert value == 1
    assert source.templated_svids == 0
