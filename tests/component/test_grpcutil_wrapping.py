"""`WrappingServer`: handlers wrapped once at registration (not per call), on both registration paths."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio

from svidgate.grpcutil import WrappingServer


def _ident(data: bytes) -> bytes:
    return data


async def test_each_method_is_wrapped_once_and_every_call_goes_through_the_wrapper() -> None:
    wrapped: list[str] = []
    calls: list[str] = []

    def wrap(method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        wrapped.append(method)
        behavior = handler.unary_unary

        async def counted(request: bytes, context: Any) -> bytes:
            calls.append(method)
            return await behavior(request, context)  # type: ignore[no-any-return,misc]

        return grpc.unary_unary_rpc_method_handler(
            counted, request_deserializer=_ident, response_serializer=_ident
        )

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    handlers = {"Echo": grpc.unary_unary_rpc_method_handler(echo, _ident, _ident)}
    server = WrappingServer(grpc.aio.server(), wrap)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Generic", handlers),))
    server.add_registered_method_handlers("t.Registered", handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for service in ("t.Generic", "t.Registered"):
                call = channel.unary_unary(f"/{service}/Echo", _ident, _ident)
                for i in range(3):
                    assert await call(b"x%d" % i) == b"x%d" % i
    finally:
        await server.stop(None)
    assert calls == ["/t.Generic/Echo"] * 3 + ["/t.Registered/Echo"] * 3
    # The registered method at registration; the generic one at its first call, remembered after that.
    assert sorted(wrapped) == ["/t.Generic/Echo", "/t.Registered/Echo"]
