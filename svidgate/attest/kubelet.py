"""The kubelet's pod list: fetch it (``GET /pods`` on the authenticated HTTPS port), index it, cache it.

`parse_pod_list` is pure: PodList JSON in, a `PodIndex` of every container that has started (its
``status.*containerStatuses[].containerID``) out. `KubeletClient.fetch` is one blocking HTTPS request (the
attestor runs it in a worker thread). `KubeletPods` answers lookups from the last list while it is younger
than the TTL and fetches again on a miss -- a pod that started after the last fetch -- at most once per
`MIN_REFRESH_INTERVAL` however many callers miss at once (one fetch in flight, shared), retrying until the
caller's deadline: the kubelet reports a new container's ID a moment after the container starts.

The bearer token is read from its file on every fetch (projected tokens are rotated) and never logged.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from svidgate.attest.cgroup import PodContainer
from svidgate.errors import AttestationError
from svidgate.identity.entitlement import KubernetesWorkload

log = logging.getLogger(__name__)

#: A kubelet runs at most a few hundred pods (110 by default); their list is well under this.
MAX_POD_LIST_BYTES = 32 * 1024 * 1024
#: However many callers miss at once, the kubelet is asked at most this often.
MIN_REFRESH_INTERVAL = 0.5

_STATUS_KEYS = ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses")
_SPEC_KEYS = ("containers", "initContainers", "ephemeralContainers")


@dataclass(frozen=True, slots=True)
class PodIndex:
    """The containers of one pod list, by (pod UID, container ID), and the pod UIDs it lists."""

    containers: Mapping[tuple[str, str], KubernetesWorkload] = field(default_factory=dict)
    pod_uids: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "containers", MappingProxyType(dict(self.containers)))

    def find(self, wanted: PodContainer) -> KubernetesWorkload | None:
        return self.containers.get((wanted.pod_uid, wanted.container_id))


def _str(mapping: Any, key: str) -> str:
    value = mapping.get(key, "") if isinstance(mapping, dict) else ""
    return value if isinstance(value, str) else ""


def _dict(mapping: Any, key: str) -> dict[str, Any]:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, dict) else {}


def _list(mapping: Any, key: str) -> list[Any]:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, list) else []


def container_id(runtime_id: str) -> str:
    """``containerd://<id>``, ``cri-o://<id>``, ``docker://<id>`` -> ``<id>`` ("" when there is no scheme)."""
    scheme, sep, rest = runtime_id.partition("://")
    return rest if sep and scheme else ""


def parse_pod_list(document: bytes) -> PodIndex:
    """Index a kubelet ``/pods`` response (a v1 PodList).

    Items or fields of the wrong type are skipped, not trusted: a container is indexed only with a pod UID, a
    namespace, a name and a ``<runtime>://<id>`` container ID.

    Raises:
        AttestationError: ``kubelet_bad_response``, the document is not a PodList.
    """
    try:
        data = json.loads(document)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AttestationError("kubelet_bad_response", f"the pod list is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("items"), list):
        raise AttestationError("kubelet_bad_response", "the pod list has no items[]")
    containers: dict[tuple[str, str], KubernetesWorkload] = {}
    pod_uids: set[str] = set()
    for item in data["items"]:
        metadata, spec, status = _dict(item, "metadata"), _dict(item, "spec"), _dict(item, "status")
        uid, namespace, name = _str(metadata, "uid"), _str(metadata, "namespace"), _str(metadata, "name")
        if not (uid and namespace and name):
            continue
        pod_uids.add(uid)
        labels = tuple(sorted((k, v) for k, v in _dict(metadata, "labels").items() if isinstance(v, str)))
        spec_images = {_str(c, "name"): _str(c, "image") for key in _SPEC_KEYS for c in _list(spec, key)}
        for key in _STATUS_KEYS:
            for container in _list(status, key):
                cid = container_id(_str(container, "containerID"))
                container_name = _str(container, "name")
                if not cid or not container_name:
                    continue
                images = (
                    spec_images.get(container_name, ""),
                    _str(container, "image"),
                    _str(container, "imageID"),
                )
                containers[(uid, cid)] = KubernetesWorkload(
                    namespace=namespace,
                    service_account=_str(spec, "serviceAccountName") or _str(spec, "serviceAccount"),
                    pod_name=name,
                    pod_uid=uid,
                    node_name=_str(spec, "nodeName"),
                    container_name=container_name,
                    container_images=tuple(dict.fromkeys(i for i in images if i)),
                    labels=labels,
                )
    return PodIndex(containers, frozenset(pod_uids))


class KubeletClient:
    """Fetches ``GET /pods`` from the kubelet with a bearer token over verified TLS.

    Args:
        url: ``https://host:port`` (`KubernetesConfig.kubelet_url`).
        token_file: the bearer token's file, read on every fetch.
        ca_file: PEM roots to verify the kubelet's certificate (chain and host name); None = do not verify
            (`kubelet_insecure_skip_verify`, warned at start-up).
        timeout: socket timeout of one fetch, seconds.
    """

    def __init__(self, url: str, token_file: Path, ca_file: Path | None, timeout: float) -> None:
        parsed = urllib.parse.urlsplit(url)
        self._host = parsed.hostname or ""
        self._port = parsed.port or 10250
        self._token_file = token_file
        self._ca_file = ca_file
        self._timeout = timeout
        self._context: ssl.SSLContext | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._context is None:
            if self._ca_file is None:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            else:
                try:
                    context = ssl.create_default_context(cafile=str(self._ca_file))
                except (OSError, ssl.SSLError) as exc:
                    raise AttestationError(
                        "kubelet_ca_unreadable", f"{self._ca_file}: cannot load the kubelet CA: {exc}"
                    ) from None
            self._context = context
        return self._context

    def fetch(self) -> PodIndex:
        """One pod list fetch (blocking).

        Raises:
            AttestationError: ``kubelet_unreachable`` (connect, TLS or timeout), ``kubelet_error`` (an HTTP
                status other than 200; 401/403 mean the token or its RBAC), ``kubelet_bad_response``, or
                ``token_unreadable``.
        """
        try:
            token = self._token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AttestationError("token_unreadable", f"{self._token_file}: {exc}") from None
        connection = http.client.HTTPSConnection(
            self._host, self._port, timeout=self._timeout, context=self._ssl_context()
        )
        try:
            connection.request(
                "GET", "/pods", headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
            )
            response = connection.getresponse()
            body = response.read(MAX_POD_LIST_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise AttestationError("kubelet_unreachable", f"GET /pods: {exc}") from None
        finally:
            connection.close()
        if response.status != 200:
            hint = " (check the token and the nodes/proxy RBAC)" if response.status in (401, 403) else ""
            raise AttestationError("kubelet_error", f"GET /pods: HTTP {response.status}{hint}")
        if len(body) > MAX_POD_LIST_BYTES:
            raise AttestationError("kubelet_bad_response", f"the pod list is over {MAX_POD_LIST_BYTES} bytes")
        return parse_pod_list(body)


Fetch = Callable[[], PodIndex]
Sleep = Callable[[float], Awaitable[None]]


class KubeletPods:
    """The cached pod list, refreshed on a miss. Use from one event loop.

    Args:
        fetch: one blocking fetch (`KubeletClient.fetch`); run in a worker thread.
        ttl: seconds a fetched list answers hits (`kubernetes.pod_cache_ttl`).
        clock: monotonic seconds.
        sleep: how a retry waits for the next allowed fetch.
        on_fetch: called with ``ok`` or the failure reason after every fetch (metrics).
    """

    def __init__(
        self,
        fetch: Fetch,
        ttl: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        on_fetch: Callable[[str], None] | None = None,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._sleep = sleep
        self._on_fetch = on_fetch
        self._index: PodIndex | None = None
        self._fetched_at = float("-inf")
        self._inflight: asyncio.Future[PodIndex] | None = None

    async def lookup(self, wanted: PodContainer, deadline: float) -> KubernetesWorkload:
        """The workload of a pod container, fetching the list again while it is missing, until `deadline`.

        Args:
            wanted: the pod UID and container ID from the caller's cgroup.
            deadline: `clock` time after which no further fetch is started (the caller also bounds the
                whole call, a hanging kubelet included, with `asyncio.timeout`).

        Raises:
            AttestationError: ``pod_not_listed`` / ``container_not_listed`` (still missing at the deadline),
                or why the kubelet could not be asked (`KubeletClient.fetch`).
        """
        while True:
            index = self._index
            now = self._clock()
            if index is not None and now < self._fetched_at + self._ttl:
                found = index.find(wanted)
                if found is not None:
                    return found
            wait = self._fetched_at + MIN_REFRESH_INTERVAL - now
            if wait > 0 and self._inflight is None:
                if index is not None and now + wait >= deadline:
                    raise _miss(index, wanted)
                await self._sleep(wait)
                continue
            index = await self._refresh()
            found = index.find(wanted)
            if found is not None:
                return found
            if self._clock() + MIN_REFRESH_INTERVAL >= deadline:
                raise _miss(index, wanted)

    def miss(self, wanted: PodContainer) -> AttestationError | None:
        """Why the last fetched list does not hold `wanted` (None: no list yet, or it does hold it)."""
        index = self._index
        if index is None or index.find(wanted) is not None:
            return None
        return _miss(index, wanted)

    async def _refresh(self) -> PodIndex:
        if self._inflight is not None:
            return await asyncio.shield(self._inflight)
        inflight = self._inflight = asyncio.get_running_loop().create_future()
        try:
            index = await asyncio.to_thread(self._fetch)
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, AttestationError)
                else AttestationError("kubelet_error", f"GET /pods failed: {exc!r}")
            )
            self._fetched_at = self._clock()
            self._report(error.reason)
            inflight.set_exception(error)
            inflight.exception()  # retrieved: a fetch nobody else waited for is not "never retrieved"
            raise error from None
        finally:
            self._inflight = None
        self._index, self._fetched_at = index, self._clock()
        self._report("ok")
        inflight.set_result(index)
        return index

    def _report(self, result: str) -> None:
        if self._on_fetch is not None:
            self._on_fetch(result)


def _miss(index: PodIndex, wanted: PodContainer) -> AttestationError:
    if wanted.pod_uid in index.pod_uids:
        return AttestationError(
            "container_not_listed",
            f"the kubelet lists pod {wanted.pod_uid} but no container {wanted.container_id[:12]} in it",
        )
    return AttestationError("pod_not_listed", f"the kubelet does not list pod {wanted.pod_uid}")
