"""One-line messages for the user on stderr, prefixed with memhp: the VM layer's warn()."""
from __future__ import annotations

import sys


def warn(msg: str) -> None:
    """A one-line warning on stderr; the run goes on."""
    print(f"memhp: warning: {msg}", file=sys.stderr, flush=True)


def info(msg: str) -> None:
    """A one-line note on stderr (stdout stays the command's own output)."""
    print(f"memhp: {msg}", file=sys.stderr, flush=True)
