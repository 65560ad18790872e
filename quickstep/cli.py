"""What the four console scripts share: running a typer app as a function that returns its exit status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def run_app(app: Any, argv: Sequence[str] | None, prog: str) -> int:
    """Run the typer `app` on `argv` (default: sys.argv) as `prog`; its exit status (2: bad input, as click
    reports usage errors) instead of a SystemExit, so `main(argv)` can be called from tests and other code."""
    try:
        app(args=None if argv is None else list(argv), prog_name=prog)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
