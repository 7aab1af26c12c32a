"""`svidgate serve` as a real process: SIGTERM drains, SIGHUP and file changes reload (or are rejected)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc

from svidgate.runtime.drain import DrainInterceptor
from tests.support.runtime import (
    APP,
    AUDIENCE,
    WEB,
    Layout,
    SdsStream,
    ServeProcess,
    check,
    fetch_jwt_svid,
    sds_request,
    workload_channel,
    write_config,
)

GRACE = 5.0


@pytest.fixture
async def process(layout: Layout) -> AsyncIterator[ServeProcess]:
    write_config(layout, allow=[WEB], drain_grace=f"{GRACE:g}s")
    proc = ServeProcess(layout.config)
    try:
        await proc.start()
        yield proc
    finally:
        proc.kill()


async def test_sigterm_drains_streams_cleanly_and_exits_zero(layout: Layout, process: ServeProcess) -> None:
    async with grpc.aio.insecure_channel(f"unix:{layout.sds_socket}") as channel:
        stream = SdsStream(channel)
        stream.send(sds_request("web", ["default"]))
        response = await stream.receive()
        assert len(response.resources) == 1
        stream.send(sds_request("web", ["default"], version=response.version_info, nonce=response.nonce))

        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        process.signal(signal.SIGTERM)
        # The stream ends with OK (Envoy then reconnects quietly), not CANCELLED or UNAVAILABLE.
        assert await asyncio.wait_for(stream.call.read(), GRACE + 5) is grpc.aio.EOF
        assert await stream.call.code() == grpc.StatusCode.OK
        code = await process.wait_exit(timeout=GRACE + 10)
        elapsed = loop.time() - sent_at
    assert code == 0, process.log()
    assert elapsed < GRACE + 5, f"drain took {elapsed:.1f}s with a {GRACE}s grace"
    draining = process.events("server.draining")[0]
    assert draining["reason"] == "SIGTERM"
    assert draining["grace_seconds"] == GRACE
    assert process.events("server.stopped")
    assert not layout.sds_socket.exists()
    assert not layout.workload_socket.exists()


def _allowed(response: Any) -> bool:
    return bool(response.status.code == 0)


async def _app_token(layout: Layout) -> str:
    async with workload_channel(layout) as channel:
        return await fetch_jwt_svid(channel, AUDIENCE)


async def test_sighup_reload_applies_a_valid_change_and_keeps_the_last_good_one(
    layout: Layout, process: ServeProcess
) -> None:
    token = await _app_token(layout)
    async with grpc.aio.insecure_channel(process.grpc_tcp_target()) as channel:
        # Only web may call /api at first.
        assert not _allowed(await check(channel, "/api/x", token))

        write_config(layout, allow=[WEB, APP], drain_grace=f"{GRACE:g}s")
        process.signal(signal.SIGHUP)
        reloaded = await process.wait_for_event("config.reloaded")
        assert reloaded["trigger"] == "SIGHUP"
        assert _allowed(await check(channel, "/api/x", token))

        # An invalid file is rejected, with one clear line, and the last good configuration stays.
        layout.config.write_text(layout.config.read_text().replace("audiences: [backend]", "audiences: []"))
        process.signal(signal.SIGHUP)
        rejected = await process.wait_for_event("config.reload_rejected")
        assert rejected["level"] == "error"
        assert "audiences" in rejected["error"]
        assert "last good" in rejected["kept"]
        assert _allowed(await check(channel, "/api/x", token))

        # YAML that does not even parse: same.
        layout.config.write_text("listen: [unclosed\n")
        process.signal(signal.SIGHUP)
        rejected = await process.wait_for_event("config.reload_rejected", after=1)
        assert "line" in rejected["error"]
        assert _allowed(await check(channel, "/api/x", token))
        assert len(process.events("config.reloaded")) == 1

    process.signal(signal.SIGTERM)
    assert await process.wait_exit(timeout=GRACE + 10) == 0


async def test_config_file_change_is_noticed_without_a_signal(layout: Layout) -> None:
    write_config(layout, allow=[WEB, APP], poll="100ms")
    process = ServeProcess(layout.config)
    try:
        await process.start()
        token = await _app_token(layout)
        async with grpc.aio.insecure_channel(process.grpc_tcp_target()) as channel:
            assert _allowed(await check(channel, "/api/x", token))
            write_config(layout, allow=[WEB], poll="100ms")
            reloaded = await process.wait_for_event("config.reloaded")
            assert reloaded["trigger"] == "file_change"
            assert not _allowed(await check(channel, "/api/x", token))
            # A change that needs a restart is reported, the rest applied.
            write_config(layout, allow=[WEB, APP], poll="100ms", drain_grace="7s")
            partial = await process.wait_for_event("config.reload_partial")
            assert partial["level"] == "warning"
            assert partial["restart_required"] == ["server.drain_grace"]
            assert _allowed(await check(channel, "/api/x", token))
        process.signal(signal.SIGTERM)
        assert await process.wait_exit(timeout=15) == 0
    finally:
        process.kill()


# -- the drain mechanism, on a plain grpc.aio server ------------------------------------------------------


async def test_drain_ends_streams_with_ok_and_answers_calls_in_flight() -> None:
    drain = asyncio.Event()
    entered = asyncio.Event()
    release = asyncio.Event()

    class SlowHealth(health_async.HealthServicer):
        async def Check(self, request: Any, context: Any) -> Any:
            entered.set()
            await release.wait()
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.aio.server(interceptors=[DrainInterceptor(drain)])
    servicer = SlowHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        in_flight = asyncio.ensure_future(stub.Check(health_pb2.HealthCheckRequest()))
        await entered.wait()

        drain.set()
        stopping = asyncio.ensure_future(server.stop(10))
        assert await asyncio.wait_for(watch.read(), 5) is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK
        release.set()
        response = await asyncio.wait_for(in_flight, 5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        await asyncio.wait_for(stopping, 10)


async def test_drain_while_a_write_is_in_flight_still_ends_the_stream_with_ok() -> None:
    # The drain stops the handler while `await context.write()` has not completed yet: the bytes may be on the
    # wire, but grpc-core's completion has not reached the event loop. Cancelling grpc.aio's write there left
    # the call believing its headers were never sent, so its OK status failed in grpc-core
    # (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS) and the client got UNAVAILABLE once the grace ran out.
    drain = asyncio.Event()
    waiting = asyncio.Event()
    go = asyncio.Event()
    cancelled_in_write: list[bool] = []

    async def stream(request_iterator: Any, context: Any) -> None:
        waiting.set()
        await go.wait()
        try:
            # The first write, the one that also sends the response headers.
            await context.write(b"first")
        except asyncio.CancelledError:
            cancelled_in_write.append(True)
            raise
        await asyncio.Event().wait()  # an SDS stream never ends by itself

    def ident(data: bytes) -> bytes:
        return data

    interceptor = DrainInterceptor(drain)
    server = grpc.aio.server(interceptors=[interceptor])
    handler = grpc.stream_stream_rpc_method_handler(
        stream, request_deserializer=ident, response_serializer=ident
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Drain", {"Stream": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            requests: asyncio.Queue[bytes] = asyncio.Queue()

            async def iterate() -> AsyncIterator[bytes]:
                while True:
                    yield await requests.get()

            call = channel.stream_stream(
                "/t.Drain/Stream", request_serializer=ident, response_deserializer=ident
            )(iterate())
            await asyncio.wait_for(waiting.wait(), 5)
            # Both wake up in the same loop iteration, the handler first: it starts its write, and the
            # interceptor's drain (which cancels handlers directly, no task per stream in between) stops it
            # before grpc-core's completion of that write reaches the loop.
            go.set()
            drain.set()
            assert await asyncio.wait_for(call.read(), 5) == b"first"
            assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            await asyncio.wait_for(interceptor.wait_idle(), 5)
    finally:
        await server.stop(0)
    assert cancelled_in_write, "the drain did not stop the handler during its write (test precondition)"
