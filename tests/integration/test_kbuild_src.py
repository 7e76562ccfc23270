"""Real kernel builds from Debian's linux-source-6.1 (minutes cold; cached after).

Run with MEMHP_CACHE set to share builds across a CI run: `pytest -m kbuild -s`.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import pytest

from harness.errors import ConfigSymbolsDropped, PatchError
from harness.kernels.kbuild import KCONFIG_DIR, resolve_debian_src, source_tree
from harness.kernels.kconfig import dropped_symbols, memmap_blockers, missing_for_hotplug, parse_config, parse_fragment

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


# ---------------------------------------------------------------- interrupting a build

MEMHP = Path(sys.executable).with_name("memhp")


def _build_processes(root: Path) -> List[Tuple[int, str]]:
    """(pid, comm) of live processes working for a build under root: cwd or argv inside it."""
    out = []
    needle = str(root).encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
            if "\nState:\tZ" in status:
                continue
            try:
                cwd = os.readlink(d / "cwd")
            except OSError:
                cwd = ""
            if cwd.startswith(str(root)) or needle in (d / "cmdline").read_bytes():
                out.append((int(d.name), (d / "comm").read_text().strip()))
        except OSError:
            continue
    return out


def _interrupt_while_compiling(tree: Path, cache: Path, sig: int, log: Path) -> Tuple[int, set, str]:
    """Start `memhp kernel build` into cache, wait until a compiler runs, send sig; return
    (memhp's exit status, the commands seen working for the build, stderr)."""
    env = dict(os.environ, MEMHP_CACHE=str(cache))
    with open(log, "w") as err:
        p = subprocess.Popen([str(MEMHP), "kernel", "build", "--tree", str(tree), "--jobs", "2"], env=env,
                             stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
        seen: set = set()
        try:
            deadline = time.monotonic() + 1500        # copying the 1.5 GB tree and configuring come first
            while time.monotonic() < deadline and p.poll() is None:
                seen |= {comm for _, comm in _build_processes(cache)}
                if "cc1" in seen:
                    break
                time.sleep(0.5)
            assert "cc1" in seen, f"no compiler ran for the build (memhp exit {p.poll()}; saw {sorted(seen)})"
            p.send_signal(sig)
            rc = p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    return rc, seen, log.read_text()


def test_sigterm_and_sighup_kill_the_whole_build(tmp_path):
    """Real: `memhp kernel build` of linux-source-6.1 into a fresh cache, interrupted while gcc runs.

    After SIGTERM, and again after SIGHUP on the resumed build, memhp exits 130 with one line,
    and no make, gcc or cc1 of that build is left running."""
    tree = source_tree("6.1")           # the shared cache's unpacked tree, only read
    cache = tmp_path / "cache"
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            rc, seen, err = _interrupt_while_compiling(tree, cache, sig, tmp_path / f"stderr-{sig.name}")
            left = []
            deadline = time.monotonic() + 10       # the group gets SIGTERM, SIGKILL 5 s later
            while time.monotonic() < deadline:
                left = _build_processes(cache)
                if not left:
                    break
                time.sleep(0.2)
            print(f"\n{sig.name}: memhp exit {rc}; build processes seen {sorted(seen)}; left {left}")
            assert {"make", "cc1"} <= seen, seen
            assert left == [], f"{sig.name}: build processes outlived memhp: {left}"
            assert rc == 130, f"{sig.name}: exit {rc}\n{err}"
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err
            assert not (cache / "builds").exists() or not any(
                (b / ".complete").exists() for b in (cache / "builds").iterdir()), "an interrupted build was published"
    finally:
        subprocess.run(["rm", "-rf", str(cache)], timeout=600)
