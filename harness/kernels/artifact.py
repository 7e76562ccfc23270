"""KernelArtifact: what every later stage needs to know about a kernel, wherever it came from
(a Debian package, a build, a path). Below kernel.py and kbuild.py, which both make them."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple


def release_version(release: str) -> Tuple[int, int, int]:
    """Leading "X.Y[.Z]" of a uname -r string; anything unparsable is (0, 0, 0)."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", release or "")
    if not m:
        return (0, 0, 0)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


@dataclass(frozen=True)
class KernelArtifact:
    spec: str                    # what the user asked for, e.g. "debian:6.12"
    image: Path                  # bzImage / vmlinuz
    config: Optional[Path]       # the kernel's .config, if found
    modules: Optional[Path]      # lib/modules/<release> folder with uncompressed .ko, if any
    release: str                 # uname -r, e.g. "6.12.117+deb12-cloud-amd64" ("" if unknown)
    source: Optional[Path] = None  # kernel source tree, when known (selftests come from here)

    @property
    def version(self) -> Tuple[int, int, int]:
        return release_version(self.release)
