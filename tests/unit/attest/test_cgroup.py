"""Pod UID and container ID from ``/proc/<pid>/cgroup`` lines, as each driver and runtime writes them."""

from __future__ import annotations

import pytest

from svidgate.attest.cgroup import PodContainer, pod_container
from svidgate.errors import AttestationError

UID = "2c48913c-b29f-11e7-9350-020968147796"
UID_ = UID.replace("-", "_")
CID = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"
STATIC_UID = "8dd8f0bf1a1ea35f2aa6b2d2b08e1c72"  # a static (mirror) pod's UID is a config hash
FOUND = PodContainer(UID, CID)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # cgroup v1, cgroupfs driver (one line per hierarchy; the pod is in several).
        (
            f"12:pids:/kubepods/besteffort/pod{UID}/{CID}\n"
            f"11:memory:/kubepods/besteffort/pod{UID}/{CID}\n"
            "1:name=systemd:/\n",
            FOUND,
        ),
        (f"4:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}\n", FOUND),
        (f"4:memory:/kubepods/pod{UID}/{CID}\n", FOUND),  # Guaranteed QoS: no QoS level
        (f"4:memory:/kubepods/besteffort/pod{UID}/crio-{CID}\n", FOUND),  # CRI-O with cgroupfs
        # cgroup v1, systemd driver, each runtime.
        (
            "3:devices:/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{UID_}.slice/docker-{CID}.scope\n",
            FOUND,
        ),
        # cgroup v2 (one line), systemd driver.
        (
            f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
            f"cri-containerd-{CID}.scope\n",
            FOUND,
        ),
        (f"0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope\n", FOUND),
        # kind: the kubelet's cgroups nested under kubelet.slice.
        (
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
            FOUND,
        ),
        # cgroup v2, cgroupfs driver; and a static pod.
        (f"0::/kubepods/besteffort/pod{UID}/{CID}\n", FOUND),
        (f"0::/kubepods/pod{STATIC_UID}/{CID}\n", PodContainer(STATIC_UID, CID)),
        # Not a pod container: nothing to attest.
        ("0::/\n", None),
        ("0::/user.slice/user-1000.slice/session-2.scope\n", None),
        ("12:pids:/system.slice/containerd.service\n", None),
        (f"0::/docker/{CID}\n", None),  # a plain Docker container, no pod
        (f"0::/kubepods/besteffort/pod{UID}\n", None),  # the pod's own cgroup, not a container's
        (f"0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope\n", None),  # CRI-O's monitor
        (f"0::/kubepods/besteffort/pod{UID}/{CID[:12]}\n", None),  # a short ID is not a runtime's ID
        (f"0::/kubepods/besteffort/pod{UID.upper()}/{CID}\n", None),
        (f"0::/kubepods/besteffort/pod{UID}/{CID}.scope\n", None),  # cgroupfs pod dir with a systemd scope
        ("garbage\n\n::\n", None),
        ("", None),
    ],
)
def test_pod_container(text: str, expected: PodContainer | None) -> None:
    assert pod_container(text) == expected


def test_hierarchies_naming_two_containers_are_refused() -> None:
    other = "a" * 64
    text = f"12:pids:/kubepods/besteffort/pod{UID}/{CID}\n0::/kubepods/besteffort/pod{UID}/{other}\n"
    with pytest.raises(AttestationError) as info:
        pod_container(text)
    assert info.value.reason == "ambiguous_cgroup"
