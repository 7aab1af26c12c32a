"""WorkloadApiServicer behaviour that py-spiffe cannot show: status codes, entitlement changes, metrics.

Uses svidgate's own grpc.aio client (`svidgate.workloadapi.client`) on the real server behind the real
peercred front.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

import grpc
import pytest
from prometheus_client import CollectorRegistry

from svidgate.config import Workload
from svidgate.errors import SourceError
from svidgate.identity.jwtsvid import JwtSvid
from svidgate.identity.spiffe_id import SpiffeId
from svidgate.metrics import Metrics
from svidgate.workloadapi.client import WorkloadApiClient, WorkloadApiError
from tests.support.workloadapi import (
    APP,
    APP_ADMIN,
    OTHER,
    TRUST_DOMAIN,
    serve_workload_api,
    uid_selector,
)


async def test_own_client_round_trips_svids_and_bundles() -> None:
    async with serve_workload_api() as harness, WorkloadApiClient(str(harness.socket)) as client:
        context = await client.fetch_x509_context()
        jwt_bundles = await client.fetch_jwt_bundles()
    snapshot = harness.feed.current()
    assert [s.spiffe_id for s in context.svids] == [APP, APP_ADMIN]
    assert [s.hint for s in context.svids] == ["internal", "admin"]
    assert context.svids[0].cert_chain_der() == snapshot.svids[APP].cert_chain_der()
    assert context.svids[0].private_key_der() == snapshot.svids[APP].private_key_der()
    assert context.bundles[TRUST_DOMAIN].x509_authorities == snapshot.bundles[TRUST_DOMAIN].x509_authorities
    assert (
        dict(jwt_bundles[TRUST_DOMAIN].jwt_authorities).keys()
        == snapshot.bundles[TRUST_DOMAIN].jwt_authorities.keys()
    )


async def test_validate_returns_the_claims() -> None:
    async with serve_workload_api() as harness, WorkloadApiClient(str(harness.socket)) as client:
        token = harness.mint(APP_ADMIN, ["backend"]).token
        spiffe_id, claims = await client.validate_jwt_svid(token, "backend")
    assert spiffe_id == APP_ADMIN
    assert claims["sub"] == str(APP_ADMIN)
    assert claims["aud"] in ("backend", ["backend"])
    assert isinstance(claims["exp"], float | int)


async def test_a_connection_that_bypasses_the_peercred_front_is_denied() -> None:
    async with serve_workload_api() as harness, WorkloadApiClient(str(harness.inner_socket)) as client:
        with pytest.raises(WorkloadApiError) as raised:
            await client.fetch_x509_context()
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("audience", "spiffe_id", "code"),
    [
        ((), None, grpc.StatusCode.INVALID_ARGUMENT),
        (("",), None, grpc.StatusCode.INVALID_ARGUMENT),
        (("backend",), "spiffe://example.org/other", grpc.StatusCode.PERMISSION_DENIED),
        (("backend",), "spiffe://elsewhere.test/app", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
async def test_fetch_jwt_svid_status_codes(
    audience: Sequence[str], spiffe_id: str | None, code: grpc.StatusCode
) -> None:
    async with serve_workload_api() as harness, WorkloadApiClient(str(harness.socket)) as client:
        wanted = SpiffeId.parse(spiffe_id) if spiffe_id else None
        with pytest.raises(WorkloadApiError) as raised:
            await client.fetch_jwt_svids(audience, wanted)
    assert raised.value.code == code


async def test_an_invalid_spiffe_id_is_invalid_argument() -> None:
    from svidgate._gen import workload_pb2

    async with (
        serve_workload_api() as harness,
        grpc.aio.insecure_channel(f"unix:{harness.socket}") as channel,
    ):
        call = channel.unary_unary(
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            request_serializer=workload_pb2.JWTSVIDRequest.SerializeToString,
            response_deserializer=workload_pb2.JWTSVIDResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(
                workload_pb2.JWTSVIDRequest(audience=["a"], spiffe_id="spiffe://Example.org/x"),
                metadata=(("workload.spiffe.io", "true"),),
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lower case" in (raised.value.details() or "")


async def test_a_source_failure_is_unavailable() -> None:
    def broken(spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        raise SourceError("upstream agent is away")

    async with (
        serve_workload_api(mint_jwt_svid=broken) as harness,
        WorkloadApiClient(str(harness.socket)) as client,
    ):
        with pytest.raises(WorkloadApiError) as raised:
            await client.fetch_jwt_svids(["backend"])
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    # The source's error text stays in the server's log, not in the caller's status.
    assert "agent" not in str(raised.value)


async def test_an_async_mint_function_is_awaited() -> None:
    async with serve_workload_api() as harness:

        async def mint(spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
            await asyncio.sleep(0)
            return harness.mint(spiffe_id, audience)

        harness.servicer._mint = mint
        async with WorkloadApiClient(str(harness.socket)) as client:
            svids = await client.fetch_jwt_svids(["backend"], APP)
    assert [s.spiffe_id for s in svids] == [APP]


async def test_losing_every_identity_ends_the_stream_with_permission_denied() -> None:
    async with serve_workload_api() as harness, WorkloadApiClient(str(harness.socket)) as client:
        stream = client.watch_x509_context()
        first = await anext(stream)
        assert [s.spiffe_id for s in first.svids] == [APP, APP_ADMIN]
        # Reload: APP_ADMIN's entry now selects another uid. The stream re-evaluates at once.
        harness.servicer.set_workloads(
            (Workload(APP, (uid_selector(),)), Workload(APP_ADMIN, (uid_selector(os.getuid() + 1),)))
        )
        second = await anext(stream)
        assert [s.spiffe_id for s in second.svids] == [APP]
        harness.servicer.set_workloads((Workload(OTHER, (uid_selector(os.getuid() + 1),)),))
        with pytest.raises(WorkloadApiError) as raised:
            await anext(stream)
        await stream.aclose()
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED


async def test_duplicate_hints_keep_the_first_identity_only() -> None:
    workloads = (
        Workload(APP, (uid_selector(),), hint="same"),
        Workload(APP_ADMIN, (uid_selector(),), hint="same"),
    )
    async with serve_workload_api(workloads) as harness, WorkloadApiClient(str(harness.socket)) as client:
        context = await client.fetch_x509_context()
    assert [(s.spiffe_id, s.hint) for s in context.svids] == [(APP, "same")]


async def test_unauthenticated_verifiers_get_bundles_but_no_svids() -> None:
    workloads = (Workload(OTHER, (uid_selector(os.getuid() + 1),)),)
    async with (
        serve_workload_api(workloads, allow_unauthenticated_verifiers=True) as harness,
        WorkloadApiClient(str(harness.socket)) as client,
    ):
        bundles = await client.fetch_jwt_bundles()
        assert set(bundles) == {TRUST_DOMAIN}
        x509_bundles = await anext(client.watch_x509_bundles())
        assert set(x509_bundles) == {TRUST_DOMAIN}
        with pytest.raises(WorkloadApiError) as raised:
            await client.fetch_x509_context()
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED


async def test_metrics_count_streams_and_calls() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, process_metrics=False)
    async with (
        serve_workload_api(metrics=metrics) as harness,
        WorkloadApiClient(str(harness.socket)) as client,
    ):
        stream = client.watch_x509_context()
        await anext(stream)
        assert registry.get_sample_value("svidgate_workload_api_streams", {"method": "FetchX509SVID"}) == 1
        await client.fetch_jwt_svids(["backend"])
        with pytest.raises(WorkloadApiError):
            await client.fetch_jwt_svids(["backend"], OTHER)
        await stream.aclose()
        for _ in range(100):  # the server notices the cancellation asynchronously
            if registry.get_sample_value("svidgate_workload_api_streams", {"method": "FetchX509SVID"}) == 0:
                break
            await asyncio.sleep(0.01)

    def requests(method: str, code: str) -> float | None:
        # Counted by the gRPC interceptor (svidgate_workload_api_requests_total repeated it and is gone).
        return registry.get_sample_value(
            "svidgate_grpc_server_handled_total",
            {"service": "SpiffeWorkloadAPI", "method": method, "code": code},
        )

    assert registry.get_sample_value("svidgate_workload_api_streams", {"method": "FetchX509SVID"}) == 0
    assert requests("FetchJWTSVID", "OK") == 1
    assert requests("FetchJWTSVID", "PERMISSION_DENIED") == 1
    assert requests("FetchX509SVID", "CANCELLED") == 1
