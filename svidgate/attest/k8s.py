"""Kubernetes workload attestation: a caller's kernel-verified PID -> its pod and container.

For a caller on a unix socket the peercred front knows the PID (SO_PEERCRED). `KubernetesAttestor.attest`:

1. opens ``<proc_root>/<pid>`` and reads the process's start time from ``stat`` (both through that directory
   handle) -- first, because it is the quickest thing to do after the connection is accepted;
2. reads ``cgroup`` through the same handle and finds the pod UID and container ID (`svidgate.attest.cgroup`);
3. looks the container up in the kubelet's pod list (`svidgate.attest.kubelet`; off the event loop, with a
   total deadline of `kubernetes.attest_timeout`);
4. checks that the process is still the one it read (PID reuse), as SPIRE's peertracker does: the directory
   handle must still be readable and ``<proc_root>/<pid>/stat`` must still show the same start time. A PID
   that was reused meanwhile names another process, whose pod is not the caller's.

Whatever goes wrong -- a process outside any pod, a pod the kubelet does not list, an unreachable kubelet, a
process that exited -- the caller simply has no Kubernetes attributes, so no `k8s:` selector matches it: one
log line with the reason, and `svidgate_k8s_attestations_total{result=<reason>}`. Nothing here ends a stream
or touches other callers.

Known limit (shared with SPIRE): a PID reused between the connect and step 1 is not detected here. That
needs the caller to exit and its PID to be handed out again within that window; the front starts
attestation as soon as it has accepted the connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from svidgate.attest.cgroup import pod_container
from svidgate.attest.kubelet import KubeletClient, KubeletPods
from svidgate.errors import AttestationError
from svidgate.identity.entitlement import CallerInfo, KubernetesWorkload

if TYPE_CHECKING:
    from svidgate.attest.metrics import AttestMetrics
    from svidgate.config import KubernetesConfig

log = logging.getLogger(__name__)

#: The cgroup file of a process is a few hundred bytes; this bounds a read of something unexpected.
MAX_PROC_FILE_BYTES = 64 * 1024


def start_time(stat: str) -> str:
    """Field 22 (``starttime``, clock ticks since boot) of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may itself hold spaces and parentheses, so the fields
    are counted from the last ``)``.

    Raises:
        AttestationError: ``bad_proc_stat``.
    """
    end = stat.rfind(")")
    fields = stat[end + 2 :].split() if end >= 0 else []
    # fields[0] is field 3 (state): starttime (22) is fields[19].
    if len(fields) < 20 or not fields[19].isdigit():
        raise AttestationError("bad_proc_stat", "cannot read the process start time")
    return fields[19]


def _read_at(name: str, dir_fd: int) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, MAX_PROC_FILE_BYTES).decode("utf-8", "replace")
    finally:
        os.close(fd)


class KubernetesAttestor:
    """Adds the pod and container to a caller known by its PID.

    Args:
        config: `Config.kubernetes`.
        metrics: collectors, or None.
        pods: the pod list cache (tests inject one); built from `config` when None.
        clock: monotonic seconds (deadlines).
    """

    def __init__(
        self,
        config: KubernetesConfig,
        metrics: AttestMetrics | None = None,
        *,
        pods: KubeletPods | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._proc_root = config.proc_root
        self._timeout = config.attest_timeout
        self._metrics = metrics
        self._clock = clock
        if pods is None:
            client = KubeletClient(
                config.kubelet_url,
                config.token_file,
                None if config.kubelet_insecure_skip_verify else config.kubelet_ca_file,
                timeout=config.attest_timeout,
            )
            pods = KubeletPods(client.fetch, config.pod_cache_ttl, clock=clock, on_fetch=self._count_fetch)
        self._pods = pods

    async def attest(self, caller: CallerInfo) -> CallerInfo:
        """`caller` with its Kubernetes attributes, or unchanged (logged and counted) when there are none.

        Never raises for anything about the caller or the kubelet.
        """
        pid = caller.pid
        try:
            if pid is None or pid <= 0:
                # SO_PEERCRED reports 0 for a peer in a PID namespace svidgate cannot see (run with hostPID).
                raise AttestationError(
                    "no_pid", "the caller's PID is not visible in svidgate's PID namespace"
                )
            workload = await self._attest(pid)
        except AttestationError as exc:
            self._failed(caller, exc.reason, exc.detail)
            return caller
        except Exception as exc:  # a bug here must cost this caller its k8s: attributes, nothing more
            log.exception("k8s.attestation_error", extra={"fields": {**caller.describe()}})
            self._failed(caller, "internal_error", repr(exc))
            return caller
        self._count("attested")
        log.info("k8s.attested", extra={"fields": {"pid": pid, **workload.describe()}})
        return dataclasses.replace(caller, k8s=workload)

    async def _attest(self, pid: int) -> KubernetesWorkload:
        proc = self._proc_root / str(pid)
        try:
            dir_fd = os.open(proc, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise AttestationError("process_gone", f"{proc}: {exc.strerror or exc}") from None
        try:
            try:
                started = start_time(_read_at("stat", dir_fd))
                cgroups = _read_at("cgroup", dir_fd)
            except OSError as exc:
                raise AttestationError("process_gone", f"{proc}: {exc.strerror or exc}") from None
            wanted = pod_container(cgroups)
            if wanted is None:
                raise AttestationError("not_in_pod", "the process's cgroups name no pod container")
            try:
                async with asyncio.timeout(self._timeout):
                    workload = await self._pods.lookup(wanted, self._clock() + self._timeout)
            except TimeoutError:
                # The deadline may cut the last refresh short: say what the list answered until then (a pod
                # the kubelet does not list), and "timeout" only when there was no list to answer at all.
                raise self._pods.miss(wanted) or AttestationError(
                    "timeout", f"no pod list within kubernetes.attest_timeout ({self._timeout}s)"
                ) from None
            self._check_same_process(proc, dir_fd, started)
            return workload
        finally:
            os.close(dir_fd)

    @staticmethod
    def _check_same_process(proc: Path, dir_fd: int, started: str) -> None:
        """Raise unless the process read at the start is still alive under its PID (see the module doc)."""
        try:
            # The handle refers to the process it was opened for even when the PID has been handed to a new
            # one; a dead process's directory reads as empty (Linux 6.x; older kernels fail the read).
            if not os.listdir(dir_fd):
                raise AttestationError("process_gone", "its /proc directory is empty")
            now = start_time((proc / "stat").read_text(encoding="utf-8", errors="replace"))
        except (OSError, AttestationError) as exc:
            raise AttestationError("process_gone", f"the caller exited during attestation ({exc})") from None
        if now != started:
            raise AttestationError(
                "pid_reused", f"{proc} is now another process (start time {now}, was {started})"
            )

    def _failed(self, caller: CallerInfo, reason: str, detail: str) -> None:
        self._count(reason)
        log.warning(
            "k8s.attestation_failed",
            extra={
                "fields": {
                    **caller.describe(),
                    "reason": reason,
                    "detail": detail,
                    "effect": "no k8s: selector matches this caller (its connection is served without them)",
                }
            },
        )

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.attestations.labels(result=result).inc()

    def _count_fetch(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.pod_list_fetches.labels(result=result).inc()
