"""`python -m svidgate`: the same command line as the `svidgate` script."""

from __future__ import annotations

import sys

from svidgate.cli import main

if __name__ == "__main__":
    sys.exit(main())
