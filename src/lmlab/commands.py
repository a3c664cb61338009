"""What every ``lmlab`` subcommand shares: one exit-status convention.

0 on success; 2 for bad usage (a wrong flag or argument; one line ``<prog>: error: ...`` on stderr); 1 when the
command was understood but failed on its input (a damaged run, a checkpoint that does not load, ...); ``--help``
exits 0.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def run_command(run: Callable[[Any], int | None], argv: list[str] | None, usage: type[Exception] | tuple = (),
                failures: type[Exception] | tuple = (), prog: str = "") -> int:
    """``run(argv)``'s exit status (None counts as 0), 2 for a ``usage`` exception, 1 for a ``failures`` one, each
    reported as one line on stderr prefixed with ``prog``."""
    prefix = f"{prog}: error: " if prog else "error: "
    try:
        return run(argv) or 0
    except usage as e:
        print(f"{prefix}{e}", file=sys.stderr)
        return 2
    except failures as e:
        print(f"{prefix}{e}", file=sys.stderr)
        return 1
    except SystemExit as e:  # --help, or argparse's own usage error (already printed)
        return int(e.code or 0)
