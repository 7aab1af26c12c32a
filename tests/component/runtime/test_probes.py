"""The HTTP listener (/healthz, /readyz, /metrics) and gRPC health of a whole in-process server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from svidgate.config import load_config
from svidgate.runtime.http import HttpEndpoint
from svidgate.runtime.server import Server
from tests.support.runtime import (
    Layout,
    http_get,
    tcp_grpc_target,
    workload_channel,
)
from tests.support.server import running_server


async def test_healthz_readyz_and_metrics(layout: Layout) -> None:
    async with running_server(layout.config) as server:
        port = server.http_port
        assert port
        status, body, _ = await asyncio.to_thread(http_get, port, "/healthz")
        assert (status, body) == (200, "ok\n")
        status, body, headers = await asyncio.to_thread(http_get, port, "/readyz")
        assert status == 200
        assert '"ready": true' in body
        assert headers["Content-Type"] == "application/json"
        status, body, headers = await asyncio.to_thread(http_get, port, "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=")
        assert "svidgate_ready 1.0" in body
        status, _, _ = await asyncio.to_thread(http_get, port, "/nope")
        assert status == 404
        status, body, headers = await asyncio.to_thread(http_get, port, "/healthz", "HEAD")
        assert (status, body, headers["Content-Length"]) == (200, "", "3")
        status, _, _ = await asyncio.to_thread(http_get, port, "/healthz", "POST")
        assert status == 405


async def test_readyz_reports_why_it_is_not_ready() -> None:
    ready = [False, "no bundle for the own trust domain example.org yet"]
    endpoint = HttpEndpoint("127.0.0.1", 0, CollectorRegistry(), lambda: (bool(ready[0]), str(ready[1])))
    port = await endpoint.start()
    try:
        status, body, _ = await asyncio.to_thread(http_get, port, "/readyz")
        assert status == 503
        assert "no bundle for the own trust domain" in body
        ready[:] = [True, "ok"]
        status, _, _ = await asyncio.to_thread(http_get, port, "/readyz")
        assert status == 200
    finally:
        await endpoint.stop()


async def test_readiness_goes_false_when_draining(layout: Layout) -> None:
    server = Server(load_config(layout.config), layout.config, registry=CollectorRegistry())
    assert server.readiness() == (False, "listeners not bound")
    await server.start()
    assert server.readiness() == (True, "ok")
    await server.stop("test")
    assert server.readiness() == (False, "draining")


async def test_bad_requests_do_not_hurt_the_listener(layout: Layout) -> None:
    async with running_server(layout.config) as server:
        assert server.http_port
        reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
        writer.write(b"garbage\r\n\r\n")
        await writer.drain()
        # aiohttp answers a request line it cannot parse as HTTP/1.0 (no version was read), as the bundle
        # endpoint does; the hand-written server said HTTP/1.1.
        assert (await reader.read()).startswith((b"HTTP/1.1 400", b"HTTP/1.0 400"))
        writer.close()
        status, _, _ = await asyncio.to_thread(http_get, server.http_port, "/healthz")
        assert status == 200


async def test_grpc_health_per_service(layout: Layout) -> None:
    async with running_server(layout.config) as server:
        async with grpc.aio.insecure_channel(tcp_grpc_target(server)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in (
                "",
                "envoy.service.secret.v3.SecretDiscoveryService",
                "envoy.service.auth.v3.Authorization",
            ):
                response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                assert response.status == health_pb2.HealthCheckResponse.SERVING, service
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Check(health_pb2.HealthCheckRequest(service="SpiffeWorkloadAPI"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        async with workload_channel(layout) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = await stub.Check(health_pb2.HealthCheckRequest(service="SpiffeWorkloadAPI"))
            assert response.status == health_pb2.HealthCheckResponse.SERVING


async def _reflection_services(target: str) -> list[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        response = await call.read()
        await call.done_writing()
        return sorted(s.name for s in response.list_services_response.service)


async def test_reflection_is_off_by_default_and_on_behind_the_switch(layout: Layout) -> None:
    async with running_server(layout.config) as server:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _reflection_services(tcp_grpc_target(server))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    text = layout.config.read_text().replace(
        "  config_poll_interval:", "  reflection: true\n  config_poll_interval:"
    )
    Path(layout.config).write_text(text)
    async with running_server(layout.config) as server:
        names = await _reflection_services(tcp_grpc_target(server))
        assert "envoy.service.secret.v3.SecretDiscoveryService" in names
        assert "envoy.service.auth.v3.Authorization" in names
        assert "grpc.health.v1.Health" in names
