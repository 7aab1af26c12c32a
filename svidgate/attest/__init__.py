"""Caller attestation beyond SO_PEERCRED: who a kernel-verified PID is, in the platform's own terms.

`svidgate.attest.k8s` turns a caller's PID into its Kubernetes pod and container (cgroup -> pod UID and
container ID -> the kubelet's pod list), which `k8s:` selectors and templated SPIFFE IDs use. Imports the
identity domain and the configuration types only; never gRPC, never the services.
"""
