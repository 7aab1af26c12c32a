"""Small grpc.aio helpers shared by the server-side interceptors (metrics, drain).

This module must not import the services or the runtime: `svidgate.metrics` and `svidgate.runtime` import it.
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
