#!/usr/bin/env python3
"""Regenerate the key tables of docs/configuration.md from the configuration model.

Usage: ``python scripts/gen_config_docs.py`` rewrites the tables between the page's
``<!-- generated: NAME -->`` and ``<!-- end generated -->`` markers; ``--check`` only reports (exit 1)
when the committed page differs from what the model says (tests/unit/config/test_reference.py runs it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from svidgate.config.reference import render

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed tables are stale")
    args = parser.parse_args(argv)
    current = PAGE.read_text(encoding="utf-8")
    wanted = render(current)
    if current == wanted:
        return 0
    if args.check:
        print(f"{PAGE}: the key tables are stale; run scripts/gen_config_docs.py", file=sys.stderr)
        return 1
    PAGE.write_text(wanted, encoding="utf-8")
    print(f"rewrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
