"""Kernels built from Debian's linux-source-6.1, shared by integration tests.

All use cache_root() (MEMHP_CACHE), so within one CI run the cold build
happens once and later callers get cache hits in seconds.

  pristine_61()  debian-src:6.1 with kconfigs/
  patched_61()   the same plus tests/data/patches/0001-memhp-pr_info-on-add.patch;
                 every hot-add then logs a line starting with DMESG_MARKER, so a
                 boot test can prove the patched kernel is the one running.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from harness.kernels.kbuild import resolve_debian_src
from harness.kernels.artifact import KernelArtifact

DATA = Path(__file__).resolve().parent.parent / "data"
MARKER_PATCH = DATA / "patches" / "0001-memhp-pr_info-on-add.patch"
BAD_PATCH = DATA / "patches" / "0002-does-not-apply.patch"
UNSATISFIABLE = DATA / "kconfig" / "unsatisfiable.config"
DMESG_MARKER = "memhp: add_memory_resource start="


def pristine_61(cache: Optional[Path] = None) -> KernelArtifact:
    return resolve_debian_src("6.1", cache=cache)


def patched_61(cache: Optional[Path] = None) -> KernelArtifact:
    return resolve_debian_src("6.1", cache=cache, patches=[MARKER_PATCH])


def build_info(art: KernelArtifact) -> dict:
    """build.json of an artifact: release, inputs, build_dir, seconds the build took."""
    return json.loads((art.image.parent / "build.json").read_text())
