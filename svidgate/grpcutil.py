"""Small grpc.aio helpers shared by the server-side interceptors (metrics, drain).

This module must not import the services or the runtime: `svidgate.metrics` and `svidgate.runtime` import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

#: Turns a handler's behaviour (the servicer method) into a wrapped behaviour with the same call shape.
BehaviorWrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    wrap_unary: BehaviorWrapper | None,
    wrap_stream: BehaviorWrapper | None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """Rebuild a method handler around a wrapped behaviour, keeping its (de)serializers.

    grpc.aio interceptors cannot wrap a behaviour in place: the handler is a read-only named tuple, so the
    interceptor has to build a new one of the same RPC kind.

    Args:
        handler: the handler the interceptor's continuation returned.
        wrap_unary: wraps a behaviour that answers with one response (unary-unary, stream-unary);
            None leaves such handlers alone.
        wrap_stream: wraps a behaviour that answers with a stream (unary-stream, stream-stream);
            None leaves such handlers alone.

    Returns:
        A new handler of the same kind around the wrapped behaviour, or `handler` itself when its kind has no
        wrapper.
    """
    kinds: tuple[tuple[str, Callable[..., grpc.RpcMethodHandler[Any, Any]], BehaviorWrapper | None], ...] = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, wrap_unary),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, wrap_stream),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, wrap_unary),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, wrap_stream),
    )
    for kind, build, wrap in kinds:
        behavior = getattr(handler, kind)
        if behavior is not None:
            if wrap is None:
                return handler
            return build(
                wrap(behavior),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


#: Wraps one method's handler, given the method's full name (``/package.Service/Method``).
HandlerWrapper = Callable[[str, "grpc.RpcMethodHandler[Any, Any]"], "grpc.RpcMethodHandler[Any, Any]"]


if TYPE_CHECKING:
    _GenericRpcHandler = grpc.GenericRpcHandler[Any, Any]
else:  # generic in grpc-stubs only
    _GenericRpcHandler = grpc.GenericRpcHandler


class _WrappedGenericHandler(_GenericRpcHandler):
    """A generic handler whose answers are wrapped once per method and remembered."""

    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any], wrap: HandlerWrapper) -> None:
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        try:
            return self._wrapped[method]
        except KeyError:
            pass
        handler = self._inner.service(handler_call_details)
        wrapped = None if handler is None else self._wrap(method, handler)
        if len(self._wrapped) < 1024:  # method names come from clients: remember a bounded number
            self._wrapped[method] = wrapped
        return wrapped


class WrappingServer(grpc.aio.Server):
    """A grpc.aio server whose method handlers are wrapped once, when they are registered.

    What grpc.aio server interceptors do on every call (an `intercept_service` coroutine per interceptor, and
    a new handler built around the behaviour), this does once per method: issue 11 measured the metrics
    interceptor at ~45k and the drain interceptor at ~15k instructions per Check. Registered method handlers
    (``add_registered_method_handlers``, which grpc-core matches without a generic-handler lookup) stay
    registered. Everything else is the wrapped server's.

    Args:
        server: the grpc.aio server (created without interceptors).
        wrap: wraps one method's handler (metrics, drain).
    """

    def __init__(self, server: grpc.aio.Server, wrap: HandlerWrapper) -> None:
        self._server = server
        self._wrap = wrap

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGenericHandler(handler, self._wrap) for handler in generic_rpc_handlers)
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        wrapped = {
            method: self._wrap(f"/{service_name}/{method}", handler)
            for method, handler in method_handlers.items()
        }
        self._server.add_registered_method_handlers(service_name, wrapped)  # type: ignore[attr-defined]

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None = None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._server.wait_for_termination(timeout)
