"""Drain: end every long-lived gRPC stream with status OK when the process stops.

grpc.aio's `server.stop(grace)` waits for RPCs to finish and then cancels them; SDS and Workload API streams
never finish by themselves, so without `DrainInterceptor` they would all end CANCELLED, which Envoy logs as an
error, where an OK end makes it reconnect elsewhere quietly.

This module imports only grpc and `svidgate.grpcutil`; the runtime (`svidgate.runtime.server`) uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from svidgate.grpcutil import wrap_handler

__all__ = ["DrainInterceptor"]


class _DrainContext:
    """The servicer context a drained streaming handler sees: its writes complete even when the drain stops
    the handler in the middle of one.

    grpc.aio's `write()` (and `send_initial_metadata()`) record that the response headers went out only after
    grpc-core reports the batch done. Cancelling the handler inside that await loses the record although the
    headers did go out; the call's final status then asks grpc-core to send the headers again, grpc-core
    refuses the batch (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS), no status is sent, and the call hangs until
    `server.stop()` cancels it: the client sees UNAVAILABLE after the whole grace instead of OK. So the writes
    run shielded from the handler's cancellation, and `settle()` waits for them before the status is sent.
    Everything else is the wrapped context's.
    """

    # Slotted: one lives as long as each open stream (10k on a busy node).
    __slots__ = ("_context", "_writes")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context
        self._writes: set[asyncio.Future[None]] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        await self._shielded(self._context.write(message))

    async def send_initial_metadata(self, metadata: Any) -> None:
        await self._shielded(self._context.send_initial_metadata(metadata))

    async def _shielded(self, operation: Awaitable[None]) -> None:
        write = asyncio.ensure_future(operation)
        self._writes.add(write)
        write.add_done_callback(self._write_done)
        await asyncio.shield(write)

    def _write_done(self, write: asyncio.Future[None]) -> None:
        self._writes.discard(write)
        if not write.cancelled():
            write.exception()  # retrieved: the handler saw it, or it was stopped and no longer cares

    async def settle(self) -> None:
        """Return once no write is in flight (a stopped handler's last write included)."""
        while self._writes:
            await asyncio.wait(set(self._writes))


class DrainInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Ends every server-streaming RPC with status OK once `drain` is set.

    grpc.aio's `server.stop(grace)` waits for RPCs to finish and then cancels them; SDS and Workload API
    streams never finish by themselves, so without this they would all end CANCELLED at the end of the grace
    period. Unary calls (Check) are left alone: they are answered normally while the server stops.

    A drained handler is stopped by cancelling it wherever it waits; its writes are shielded from that
    (`_DrainContext`), because a cancelled grpc.aio write breaks the call's final status. Coroutine handlers
    (SDS, health Watch) run in their own call's task and are kept in a registry that one task per interceptor
    cancels on the drain: an idle stream costs no task of its own here (it used to cost two, measured in
    bench/sds_streams.py).

    Args:
        drain: set once when the process starts draining.
    """

    def __init__(self, drain: asyncio.Event) -> None:
        self._drain = drain
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Coroutine handlers' tasks while their behaviour runs; the drained ones among them.
        self._running: set[asyncio.Task[Any]] = set()
        self._drained: set[asyncio.Task[Any]] = set()
        self._stopper: asyncio.Task[None] | None = None

    async def _stop_handlers(self) -> None:
        await self._drain.wait()
        for task in self._running:
            self._drained.add(task)
            task.cancel()

    async def wait_idle(self) -> None:
        """Return once every wrapped streaming RPC is done (its status sent to the client)."""
        await self._idle.wait()

    def _enter(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # Counted until the RPC is done (its status sent), not until the handler returns: stopping the server
        # between the two cancels the call, and the client sees UNAVAILABLE instead of OK.
        self._active += 1
        self._idle.clear()
        # grpc-stubs declares DoneCallback as a class, so no plain callable type-checks against it.
        context.add_done_callback(self._leave)  # type: ignore[arg-type]

    def _leave(self, _context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self.wrap(handler)

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """`handler` drained: what the interceptor does per call, for wrapping once at registration."""
        # Unary calls (Check) are left alone: they are answered normally while the server stops.
        return wrap_handler(handler, None, self._wrap)

    def _wrap(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        drain = self._drain
        if inspect.isasyncgenfunction(behavior):

            async def generator(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                if drain.is_set():
                    return
                shielded = _DrainContext(context)
                responses = behavior(request, shielded)
                drained = asyncio.ensure_future(drain.wait())
                following: asyncio.Future[Any] | None = None
                self._enter(context)
                try:
                    while True:
                        following = asyncio.ensure_future(responses.__anext__())
                        await asyncio.wait((following, drained), return_when=asyncio.FIRST_COMPLETED)
                        if not following.done():
                            return  # drained: the finally below stops the handler
                        try:
                            response = following.result()
                        except StopAsyncIteration:
                            return
                        following = None
                        yield response
                finally:
                    drained.cancel()
                    # The handler runs its next step in `following`; when the client cancelled or the server
                    # drains, stop it there so that its own finally blocks run (stream gauges, subscriptions).
                    if following is not None and not following.done():
                        following.cancel()
                        with contextlib.suppress(BaseException):
                            await following
                    with contextlib.suppress(Exception):
                        await responses.aclose()
                    await shielded.settle()

            return generator

        async def coroutine(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            # A handler that writes with `await context.write()` and returns when done (SDS, health Watch).
            if drain.is_set():
                return None
            task = asyncio.current_task()
            assert task is not None
            if self._stopper is None:
                self._stopper = asyncio.ensure_future(self._stop_handlers())
            shielded = _DrainContext(context)
            self._enter(context)
            self._running.add(task)
            try:
                result = await behavior(request, shielded)
            except asyncio.CancelledError:
                if task not in self._drained:
                    raise  # the client went away, or the server stops without a drain
                task.uncancel()
                result = None
            finally:
                self._running.discard(task)
                self._drained.discard(task)
            # A write still running (the drain interrupted it, or a helper task's write, as SDS pushes are):
            # grpc.aio sends the status only after it, so that the status does not ask for the response
            # headers a second time.
            await shielded.settle()
            return result

        return coroutine
