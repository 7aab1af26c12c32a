"""Small grpc.aio helpers shared by the server-side interceptors (metrics, drain).

This module must not import the services or the runtime: `svidgate.metrics` and `svidgate.server` import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

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
    serializers: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        if wrap_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **serializers)
    if handler.unary_stream is not None:
        if wrap_stream is None:
            return handler
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **serializers)
    if handler.stream_unary is not None:
        if wrap_unary is None:
            return handler
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **serializers)
    if handler.stream_stream is not None:
        if wrap_stream is None:
            return handler
        return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), **serializers)
    return handler
