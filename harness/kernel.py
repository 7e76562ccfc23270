"""Kernel specs -> KernelArtifact (image, config, modules, release).

Specs:
  debian:6.1, debian:6.12     newest linux-image-<ver>*-cloud-amd64-unsigned from Debian's archive
  debian-src:6.1, :6.12       Debian's linux-source-<ver>, built with kconfigs/ (see kbuild.py)
  PATH                        a bzImage, or a folder with bzImage|vmlinuz* and config (a build output)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

DEFAULT_SPEC = "debian:6.12"


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
        from harness.expect import parse_release
        return parse_release(self.release)
