"""`svidgate demo` (svidgate.demo.run_demo) end to end: real Envoys, mTLS with SVIDs, JWT-SVID inject and
validate, the backend seeing the caller's SPIFFE ID."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from svidgate.demo import run_demo

pytestmark = pytest.mark.e2e


async def test_demo_reaches_the_backend_with_the_callers_spiffe_id() -> None:
    out = io.StringIO()
    code = await run_demo(out=out)
    text = out.getvalue()
    assert code == 0, text
    assert '"backend_saw_x_spiffe_id": "spiffe://example.org/frontend"' in text
    assert '"backend_saw_a_token": false' in text
    assert "\n401\n" in text
    # It cleaned up after itself.
    workdir = Path(text.split("workdir:", 1)[1].split()[0])
    assert not workdir.exists()
