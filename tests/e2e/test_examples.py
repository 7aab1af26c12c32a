"""Every envoy-example runs exactly as its README says: the same files, the same commands, the same output.

Each example's ``## Run it`` commands run in private network, mount and PID namespaces
(`tests.support.examples`), so the shipped ports and socket paths never clash with anything else on the
machine and nothing the commands start outlives the test.
"""

from __future__ import annotations

import pytest

from tests.support.examples import EXAMPLES, log_tail, output_matches, readme_session, run_in_namespaces

pytestmark = pytest.mark.e2e

RUNNABLE = ["ext-authz", "sds-mtls", "inject", "shared-root"]


@pytest.mark.parametrize("name", RUNNABLE)
def test_example_runs_as_its_readme_says(name: str) -> None:
    session = readme_session(EXAMPLES / name / "README.md")
    run = run_in_namespaces(session.script)
    logs = log_tail(run.stderr)
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{logs}"
    assert output_matches(session.expected, run.stdout), (
        f"expected:\n{session.expected}\ngot:\n{run.stdout}\nstderr:\n{log_tail(run.stderr)}"
    )
