"""Find the Kubernetes pod UID and container ID in a process's ``/proc/<pid>/cgroup``. Pure.

The kubelet names a container's cgroup after its pod and the container runtime after the container, in one
of two ways (the kubelet's ``--cgroup-driver``), under cgroup v1 (one line per hierarchy) or v2 (one
``0::`` line):

- cgroupfs: ``/kubepods/<qos>/pod<uid>/<container id>`` (``/kubepods/pod<uid>/...`` for Guaranteed pods;
  CRI-O may prefix the ID with ``crio-``);
- systemd: ``/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice/<runtime>-<id>.scope``
  with runtime ``cri-containerd``, ``crio`` or ``docker`` (kind nests this under ``kubelet.slice``).

Only the last two path components are looked at, and both must match exactly: a 64-hex container ID (what
containerd, CRI-O and Docker use) directly inside a pod directory. Anything else -- a pod's own cgroup,
CRI-O's ``crio-conmon-<id>.scope`` monitor, a process outside Kubernetes -- is "not in a pod container".
Lines of different hierarchies that name different containers are refused rather than guessed between.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from svidgate.errors import AttestationError

# A pod UID is a UUID; a static pod's is a 32-hex hash. The systemd driver writes '_' for '-'.
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"
_POD_CGROUPFS_RE = re.compile(rf"pod({_UID})\Z")
_POD_SYSTEMD_RE = re.compile(rf"(?:[a-z-]+-)?pod({_UID})\.slice\Z")
_CONTAINER_RE = re.compile(r"(?:(?:cri-containerd|crio|docker)-)?([0-9a-f]{64})(\.scope)?\Z")


@dataclass(frozen=True, slots=True)
class PodContainer:
    """The pod and container a process runs in, as its cgroup names them.

    Attributes:
        pod_uid: `metadata.uid` of the pod, with dashes.
        container_id: the runtime's container ID (64 hex digits), without the ``<runtime>://`` prefix.
    """

    pod_uid: str
    container_id: str


def pod_container_of_path(path: str) -> PodContainer | None:
    """The pod and container named by one cgroup path, or None when it is not a pod container's cgroup.

    Args:
        path: a cgroup path as in ``/proc/<pid>/cgroup`` (after the second ``:``).
    """
    parts = path.rstrip("/").split("/")
    if len(parts) < 3:
        return None
    pod_part, container_part = parts[-2], parts[-1]
    container = _CONTAINER_RE.match(container_part)
    if container is None:
        return None
    systemd = container.group(2) is not None
    pod = (_POD_SYSTEMD_RE if systemd else _POD_CGROUPFS_RE).match(pod_part)
    if pod is None:
        return None
    return PodContainer(pod.group(1).replace("_", "-"), container.group(1))


def pod_container(cgroup_file: str) -> PodContainer | None:
    """The pod and container of a process, from the text of its ``/proc/<pid>/cgroup``.

    Args:
        cgroup_file: the file's text (``hierarchy-ID:controllers:path`` per line).

    Returns:
        The pod and container, or None when no line names one (a process outside any pod container).

    Raises:
        AttestationError: ``ambiguous_cgroup``, lines name different containers.
    """
    found: PodContainer | None = None
    for line in cgroup_file.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        current = pod_container_of_path(fields[2])
        if current is None:
            continue
        if found is not None and current != found:
            raise AttestationError(
                "ambiguous_cgroup",
                "the process's cgroups name two containers "
                f"({found.container_id[:12]} in pod {found.pod_uid}, "
                f"{current.container_id[:12]} in pod {current.pod_uid})",
            )
        found = current
    return found
