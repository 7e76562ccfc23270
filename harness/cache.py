"""The cache folder: $XDG_CACHE_HOME/memhp, default ~/.cache/memhp (MEMHP_CACHE overrides)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional, Union

from harness.errors import CacheError


def cache_root(override: Optional[Union[str, Path]] = None) -> Path:
    if override:
        root = Path(override)
    elif os.environ.get("MEMHP_CACHE"):
        root = Path(os.environ["MEMHP_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "memhp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CacheError(f"cache folder {root} is not writable: {e.strerror or e}. "
                         f"Set MEMHP_CACHE or XDG_CACHE_HOME to a writable folder.") from None
    return root


def hash_inputs(parts: Iterable[Union[bytes, str, Path]]) -> str:
    """Stable hash of a sequence of inputs; Paths hash by content (files) or name+content (dirs)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path):
            if p.is_dir():
                for f in sorted(x for x in p.rglob("*") if x.is_file()):
                    h.update(str(f.relative_to(p)).encode())
                    h.update(f.read_bytes())
            else:
                h.update(p.read_bytes())
        elif isinstance(p, str):
            h.update(p.encode())
        else:
            h.update(p)
        h.update(b"\0")
    return h.hexdigest()[:16]
