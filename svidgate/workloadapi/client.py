"""A small grpc.aio client of the SPIFFE Workload API, returning svidgate's domain types.

Used by `SpireSource` (svidgate as a workload of an upstream SPIRE agent) and handy in tests and tools. It
adds the ``workload.spiffe.io: true`` metadata to every call and parses every message fully (X509-SVID.md
rules, bundle rules) before handing it out, so a malformed message from the server is a `SvidgateError`, not a
crash.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Collection, Mapping
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.json_format import MessageToDict

from svidgate._gen import workload_pb2
from svidgate.errors import SourceError, SpiffeIdError
from svidgate.identity.bundle import Bundle
from svidgate.identity.jwtsvid import JwtSvid, parse_jwt_svid_insecure
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.workloadapi import SECURITY_HEADER, SERVICE_NAME
from svidgate.workloadapi.messages import (
    X509Context,
    parse_jwt_bundles_response,
    parse_x509_bundles_response,
    parse_x509_svid_response,
)

__all__ = ["WorkloadApiClient", "WorkloadApiError", "grpc_target"]


_T = TypeVar("_T")


class WorkloadApiError(SourceError):
    """A Workload API call failed; `code` is the gRPC status (None when the answer itself was malformed)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def grpc_target(endpoint: str) -> str:
    """A gRPC target for a Workload API endpoint given as a path, ``unix:///path`` or ``unix:path``.

    SPIFFE_Workload_Endpoint.md 4 writes unix sockets as ``unix:///path``; gRPC wants ``unix:/path`` (or
    ``unix:///path``, which it also accepts). ``tcp://host:port`` becomes ``host:port``.

    Raises:
        SourceError: the endpoint is empty or of another scheme.
    """
    if endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
        return "unix:/" + path.lstrip("/") if path.startswith("/") else f"unix:{path}"
    if endpoint.startswith("/"):
        return f"unix:{endpoint}"
    if endpoint.startswith("tcp://"):
        return endpoint[len("tcp://") :]
    raise SourceError(
        f"Workload API endpoint {endpoint!r}: expected a socket path, unix:///path or tcp://host:port"
    )


def _error(method: str, exc: grpc.aio.AioRpcError) -> WorkloadApiError:
    return WorkloadApiError(f"{method}: {exc.code().name}: {exc.details()}", exc.code())


class WorkloadApiClient:
    """A Workload API client on one grpc.aio channel.

    Args:
        endpoint: the socket path, ``unix:///path`` or ``tcp://host:port``.
        timeout: deadline of the unary calls (FetchJWTSVID, ValidateJWTSVID), seconds; streams have none.

    Use as ``async with WorkloadApiClient(path) as client:`` or call `close()`.
    """

    def __init__(self, endpoint: str, *, timeout: float | None = 10.0) -> None:
        self._channel = grpc.aio.insecure_channel(grpc_target(endpoint))
        self._timeout = timeout
        self._metadata = (SECURITY_HEADER,)

    async def __aenter__(self) -> WorkloadApiClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; open streams end with CANCELLED."""
        await self._channel.close(None)

    def _unary_stream(self, method: str, response_type: Any) -> Any:
        return self._channel.unary_stream(
            f"/{SERVICE_NAME}/{method}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_type.FromString,
        )

    def _unary_unary(self, method: str, response_type: Any) -> Any:
        return self._channel.unary_unary(
            f"/{SERVICE_NAME}/{method}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_type.FromString,
        )

    async def _watch(
        self, method: str, request: Any, response_type: Any, parse: Callable[[Any], _T]
    ) -> AsyncGenerator[_T, None]:
        """Stream `method`, yielding `parse(response)` for every message.

        Raises:
            WorkloadApiError: the call failed (with its status code) or the server ended the stream.
        """
        call = self._unary_stream(method, response_type)(request, metadata=self._metadata)
        try:
            async for response in call:
                yield parse(response)
        except grpc.aio.AioRpcError as exc:
            raise _error(method, exc) from None
        finally:
            call.cancel()
        raise WorkloadApiError(f"{method}: the server ended the stream")

    def watch_x509_context(self) -> AsyncGenerator[X509Context, None]:
        """Stream FetchX509SVID: every update of the caller's X.509-SVIDs and X.509 bundles.

        Raises:
            WorkloadApiError: the call failed (with its status code) or the stream ended.
            SvidgateError: an update does not parse (X509SvidError, BundleError).
        """
        return self._watch(
            "FetchX509SVID",
            workload_pb2.X509SVIDRequest(),
            workload_pb2.X509SVIDResponse,
            parse_x509_svid_response,
        )

    def watch_x509_bundles(self) -> AsyncGenerator[dict[TrustDomain, Bundle], None]:
        """Stream FetchX509Bundles: every update of the X.509 bundles, by trust domain.

        Raises:
            WorkloadApiError: the call failed or the stream ended.
            BundleError: an update does not parse.
        """
        return self._watch(
            "FetchX509Bundles",
            workload_pb2.X509BundlesRequest(),
            workload_pb2.X509BundlesResponse,
            parse_x509_bundles_response,
        )

    def watch_jwt_bundles(self) -> AsyncGenerator[dict[TrustDomain, Bundle], None]:
        """Stream FetchJWTBundles: every update of the JWT bundles (JWT authorities only), by trust domain.

        Raises:
            WorkloadApiError: the call failed or the stream ended.
            BundleError: an update does not parse.
        """
        return self._watch(
            "FetchJWTBundles",
            workload_pb2.JWTBundlesRequest(),
            workload_pb2.JWTBundlesResponse,
            parse_jwt_bundles_response,
        )

    async def fetch_x509_context(self) -> X509Context:
        """The first FetchX509SVID message (then the stream is closed).

        Raises:
            WorkloadApiError, SvidgateError: as `watch_x509_context`.
        """
        stream = self.watch_x509_context()
        try:
            return await anext(stream)
        finally:
            await stream.aclose()

    async def fetch_jwt_bundles(self) -> dict[TrustDomain, Bundle]:
        """The first FetchJWTBundles message (then the stream is closed).

        Raises:
            WorkloadApiError, BundleError: as `watch_jwt_bundles`.
        """
        stream = self.watch_jwt_bundles()
        try:
            return await anext(stream)
        finally:
            await stream.aclose()

    async def fetch_jwt_svids(
        self, audience: Collection[str], spiffe_id: SpiffeId | None = None
    ) -> tuple[JwtSvid, ...]:
        """FetchJWTSVID: JWT-SVIDs for `audience`, for every identity of the caller or only `spiffe_id`.

        The tokens are parsed (not validated: they come from our own trusted endpoint) so that callers can see
        their subject and expiry.

        Raises:
            WorkloadApiError: the call failed (PermissionDenied when not entitled) or returned no SVID.
            JwtSvidError: a returned token does not parse.
        """
        request = workload_pb2.JWTSVIDRequest(audience=list(audience), spiffe_id=str(spiffe_id or ""))
        try:
            response = await self._unary_unary("FetchJWTSVID", workload_pb2.JWTSVIDResponse)(
                request, metadata=self._metadata, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _error("FetchJWTSVID", exc) from None
        if not response.svids:
            raise WorkloadApiError("FetchJWTSVID: the response has no SVID")
        svids = tuple(parse_jwt_svid_insecure(str(entry.svid)) for entry in response.svids)
        for entry, svid in zip(response.svids, svids, strict=True):
            if str(svid.spiffe_id) != entry.spiffe_id:
                raise WorkloadApiError("FetchJWTSVID: an SVID's spiffe_id is not its token's subject")
        return svids

    async def validate_jwt_svid(self, token: str, audience: str) -> tuple[SpiffeId, Mapping[str, Any]]:
        """ValidateJWTSVID: have the server validate `token` for `audience`.

        Returns:
            The token's SPIFFE ID and its claims.

        Raises:
            WorkloadApiError: the token does not validate (InvalidArgument) or the call failed.
        """
        request = workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token)
        try:
            response = await self._unary_unary("ValidateJWTSVID", workload_pb2.ValidateJWTSVIDResponse)(
                request, metadata=self._metadata, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _error("ValidateJWTSVID", exc) from None
        claims: dict[str, Any] = MessageToDict(response.claims)
        try:
            return SpiffeId.parse(str(response.spiffe_id)), claims
        except SpiffeIdError as exc:
            raise WorkloadApiError(f"ValidateJWTSVID: invalid spiffe_id in the response: {exc}") from None
