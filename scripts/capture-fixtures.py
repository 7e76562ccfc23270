#!/usr/bin/env python3
"""Capture real guest text into tests/data/<kernel>/ for the parser and observation tests.

For each kernel spec (default: debian:6.1 and debian:6.12) this boots a guest with
memory_hotplug.memmap_on_memory=1 and memhp_default_state=offline, saves the raw reads
("before"), hot-adds one 128 MiB pc-dimm, onlines its blocks movable, and saves the same
reads again ("after"). Layout, per kernel (the file names tests/unit/test_parsers.py loads):

  tests/data/debian-6.1/            the "after" state (hot-added block online in Movable)
      zoneinfo meminfo vmstat pagetypeinfo   /proc/<name>
      sysfs-dump                    parsers.SYSFS_DUMP_CMD output
      snapshot                      observe.snapshot_cmd() output
      facts                         observe.FACTS_CMD output
      facts.json                    observe.gather_facts() (struct page size from the guest's BTF)
      dmesg                         dmesg
      console.log                   the whole serial console of the run (boot to shutdown)
      CAPTURE                       release, spec, DIMM address/blocks, QEMU argv, date
  tests/data/debian-6.1/before/     the same reads (no console.log) before the hot-add

Regenerate with:  .venv/bin/python scripts/capture-fixtures.py [debian:6.1 debian:6.12 ...]
The tests that read these files assert relations that hold on any correct kernel
(block size, zone ordering, the Movable zone's growth), not the numbers of one capture,
so a recapture on a newer point release keeps them green.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.memory import observe, parsers
from harness.vm.guest import VM  # noqa: E402
from harness.memory.blocks import dimm_blocks, set_block_state, wait_blocks  # noqa: E402
from harness.memory.dimm import add_dimm  # noqa: E402
from harness.vm.image import build  # noqa: E402
from harness.kernels.kernel import resolve  # noqa: E402

MiB = 1 << 20
DIMM_SIZE = 128 * MiB
PROC = ("zoneinfo", "meminfo", "vmstat", "pagetypeinfo")


def reads(vm) -> dict:
    out = {name: vm.run(f"cat /proc/{name}", timeout=60, check=True).stdout for name in PROC}
    out["sysfs-dump"] = vm.run(parsers.SYSFS_DUMP_CMD, timeout=60, check=True).stdout
    out["snapshot"] = vm.run(observe.snapshot_cmd(), timeout=60, check=True).stdout
    out["facts"] = vm.run(observe.FACTS_CMD, timeout=60, check=True).stdout
    out["dmesg"] = vm.run("dmesg", timeout=60, check=True).stdout
    return out


def save(folder: Path, texts: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text)


def capture(spec: str, dest_root: Path, accel: str) -> Path:
    kernel = resolve(spec)
    image = build(kernel)
    dest = dest_root / spec.replace(":", "-")
    with tempfile.TemporaryDirectory(prefix="memhp-capture-") as tmp:
        logs = Path(tmp)
        with VM(kernel, image, logs, accel=accel, memmap_on_memory="1", default_state="offline") as vm:
            before = reads(vm)
            block_size = parsers.parse_block_size(vm.run(
                "cat /sys/devices/system/memory/block_size_bytes", check=True).stdout)
            dimm = add_dimm(vm.qmp, DIMM_SIZE)
            ids = dimm_blocks(dimm, block_size)
            wait_blocks(vm.guest, ids)
            for b in ids:
                set_block_state(vm.guest, b, "online_movable").check()
            after = reads(vm)
            facts = observe.gather_facts(vm.guest, kernel)
            argv = vm.machine.describe()
            release = vm.run("uname -r", check=True).stdout.strip()
        if dest.exists():
            shutil.rmtree(dest)
        save(dest / "before", before)
        save(dest, after)
        (dest / "facts.json").write_text(json.dumps(dataclasses.asdict(facts), indent=1) + "\n")
        shutil.copy(logs / "console.log", dest / "console.log")
    (dest / "CAPTURE").write_text(
        f"spec: {spec}\nrelease: {release}\ncaptured: {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
        f"cmdline: memory_hotplug.memmap_on_memory=1 memhp_default_state=offline\n"
        f"dimm: {dimm.id} size={dimm.size:#x} addr={dimm.addr:#x} blocks={list(ids)} "
        f"-> online_movable\nblock_size: {block_size:#x}\n"
        f"before/: the reads before the hot-add; top level: the same reads after online_movable\n"
        f"regenerate: .venv/bin/python scripts/capture-fixtures.py {spec}\n"
        f"argv (run folder and port vary): {argv}\n")
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", default=["debian:6.1", "debian:6.12"])
    ap.add_argument("--dest", default=str(REPO / "tests" / "data"))
    ap.add_argument("--accel", default="auto", choices=("auto", "tcg", "kvm"))
    args = ap.parse_args()
    for spec in args.specs:
        dest = capture(spec, Path(args.dest), args.accel)
        print(f"{spec}: {sorted(p.name for p in dest.iterdir())} in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
