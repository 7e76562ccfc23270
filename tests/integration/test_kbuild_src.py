"""Real kernel builds from Debian's linux-source-6.1 (minutes cold; cached after).

Run with MEMHP_CACHE set to share builds across a CI run: `pytest -m kbuild -s`.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from harness.errors import ConfigSymbolsDropped, PatchError
from harness.kbuild import KCONFIG_DIR, resolve_debian_src, source_tree
from harness.kconfig import dropped_symbols, memmap_blockers, missing_for_hotplug, parse_config, parse_fragment

from kbuild_helpers import (BAD_PATCH, DMESG_MARKER, MARKER_PATCH, UNSATISFIABLE, build_info, patched_61,
                            pristine_61)

pytestmark = pytest.mark.kbuild


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pristine():
    t0 = time.monotonic()
    art = pristine_61()
    print(f"\ndebian-src:6.1 pristine: {time.monotonic() - t0:.1f}s in this call, "
          f"{build_info(art)['seconds']}s when it was built, release {art.release}")
    return art


def test_debian_src_61_builds_with_every_fragment_symbol(pristine):
    assert pristine.image.is_file() and pristine.image.stat().st_size > 500_000
    assert pristine.spec == "debian-src:6.1"
    assert pristine.release.startswith("6.1.")
    assert pristine.modules is None          # everything needed is built in
    cfg = parse_config(pristine.config.read_text())
    for frag in KCONFIG_DIR.glob("*.config"):
        assert dropped_symbols(parse_fragment(frag.read_text()), cfg) == []
    assert missing_for_hotplug(cfg) == []
    assert memmap_blockers(cfg) == []
    assert (pristine.source / "tools/testing/selftests/memory-hotplug/mem-on-off-test.sh").is_file()


def test_second_identical_build_is_a_cache_hit(pristine):
    t0 = time.monotonic()
    again = pristine_61()
    took = time.monotonic() - t0
    print(f"\ncache hit: {took:.2f}s")
    assert took < 30
    assert again == pristine
    assert again.image.parent == pristine.image.parent


def test_unsatisfiable_symbols_are_named(pristine):
    with pytest.raises(ConfigSymbolsDropped) as e:
        resolve_debian_src("6.1", fragments=[UNSATISFIABLE])
    syms = {sym for sym, _, _ in e.value.dropped}
    assert syms == {"CONFIG_MEMHP_NO_SUCH_SYMBOL", "CONFIG_KASAN_SW_TAGS"}
    assert "CONFIG_KASAN_SW_TAGS (asked 'y', got 'n')" in str(e.value)


def test_patch_that_does_not_apply_leaves_tree_untouched(pristine):
    tree = source_tree("6.1")
    files = [tree / "mm" / "memory_hotplug.c", tree / "mm" / "Kconfig"]
    before = [_sha(f) for f in files]
    with pytest.raises(PatchError) as e:
        resolve_debian_src("6.1", patches=[MARKER_PATCH, BAD_PATCH])
    msg = str(e.value)
    assert BAD_PATCH.name in msg and "mm/memory_hotplug.c" in msg and "hunk #1 FAILED" in msg
    assert [_sha(f) for f in files] == before
    # the private build copy was rolled back too (the first patch of the series included)
    src = Path(build_info(pristine)["build_dir"]) / "src"
    assert [_sha(src / f.relative_to(tree)) for f in files] == before


def test_marker_patch_builds_incrementally(pristine):
    t0 = time.monotonic()
    patched = patched_61()
    took = time.monotonic() - t0
    # Whichever of the two was built first paid the cold build; the second reused its object
    # tree (test_kbuild_boot may have built the patched kernel first) and must be far quicker.
    first, second = sorted([pristine, patched], key=lambda a: (a.image.parent / "build.json").stat().st_mtime)
    cold, inc = build_info(first)["seconds"], build_info(second)["seconds"]
    print(f"\ncold build {cold}s ({'pristine' if first is pristine else 'patched'}), incremental "
          f"build {inc}s ({took:.1f}s in this call)")
    assert patched.image.parent != pristine.image.parent
    assert _sha(patched.image) != _sha(pristine.image)
    assert patched.release == pristine.release
    # by name: the cache is keyed by content, so an earlier clone's path may be on record
    assert [Path(p).name for p in build_info(patched)["patches"]] == [MARKER_PATCH.name]
    assert inc < cold / 3, f"the second build took {inc}s, not far below the first's {cold}s"
    # the user's tree never sees the patch
    assert DMESG_MARKER not in (source_tree("6.1") / "mm" / "memory_hotplug.c").read_text()
