"""What loading svidgate's configuration costs: import, first and later loads of a realistic file.

Run it with the interpreter of the checkout to measure (``.venv/bin/python bench/config_load.py``); it starts
a fresh interpreter per sample, so the import and the first load (when the schema library builds its
validators) are measured as a command line run pays them. Prints a table; asserts nothing.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import textwrap

#: 200 workloads and 200 policies: a large node's configuration.
N = 200

_PROGRAM = textwrap.dedent(
    """
    import time
    t0 = time.perf_counter()
    from svidgate.config import parse_config
    t1 = time.perf_counter()
    workloads = "".join(
        f"  - {{spiffe_id: spiffe://example.org/w{i}, selectors: [envoy:node_id:n{i}, unix:uid:1000]}}\\n"
        for i in range({n})
    )
    policies = "".join(
        f"    - {{name: p{i}, match: {{hosts: [h{i}.example.org], path_prefix: /api, methods: [GET]}},"
        f" audiences: [spiffe://example.org/api], allow: [spiffe://example.org/w1]}}\\n"
        for i in range({n})
    )
    text = "trust_domain: example.org\\nworkloads:\\n" + workloads + "authz:\\n  policies:\\n" + policies
    t2 = time.perf_counter()
    parse_config(text, "bench")
    t3 = time.perf_counter()
    parse_config(text, "bench")
    t4 = time.perf_counter()
    print(t1 - t0, t3 - t2, t4 - t3)
    """
)


def main() -> None:
    program = _PROGRAM.replace("{n}", str(N))
    samples = [
        [
            float(x)
            for x in subprocess.run(
                [sys.executable, "-c", program], capture_output=True, text=True, check=True
            ).stdout.split()
        ]
        for _ in range(7)
    ]
    print(
        f"{'import svidgate.config':>24} {'first load':>12} {'next load':>12}   ({N} workloads, {N} policies)"
    )
    medians = [statistics.median(s[i] for s in samples) * 1000 for i in range(3)]
    print(f"{medians[0]:21.1f} ms {medians[1]:9.1f} ms {medians[2]:9.1f} ms")


if __name__ == "__main__":
    main()
