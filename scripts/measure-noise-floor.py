#!/usr/bin/env python3
"""Measure the idle noise floor of MemFree + per-cpu free lists, the quantity the hot-add band
(harness.memory.expect.FREE_NOISE_KB) allows for on each side.

For each kernel spec (default: debian:6.1 and debian:6.12) this boots a guest as the hot_add
scenario does (memory_hotplug.memmap_on_memory=1, memhp_default_state=offline, the default
GuestConfig), lets it settle (sync, drop_caches, compact_memory: what the leak scenario does
before its reads), then takes N reads of leakcheck.free_kb() (MemFree + sum of the per-cpu
"count:" lines of /proc/zoneinfo, in kB), INTERVAL seconds apart, with nothing else running.
The hot-add check compares two such reads taken a few seconds apart, so the figure that
matters is the largest change between two consecutive reads; the spread (max - min) over all
reads is printed too.

Prints one line per kernel and a last line with the floor over all kernels:
  debian:6.1 (6.1.0-56-cloud-amd64): n=30 interval=2s max|step|=... kB spread=... kB ...
  noise_floor_kb=... (largest |step| over all kernels)

Run:  .venv/bin/python scripts/measure-noise-floor.py [--reads N] [--interval S] [specs...]
The figures are cited in harness/memory/expect.py (FREE_NOISE_KB's comment).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.kernels.kernel import resolve  # noqa: E402
from harness.memory import leakcheck  # noqa: E402
from harness.memory.parsers import parse_meminfo  # noqa: E402
from harness.vm.guest import VM  # noqa: E402
from harness.vm.image import build  # noqa: E402

SETTLE = "sync; echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory 2>/dev/null; true"
READ = "cat /proc/meminfo; echo @@memhp-zoneinfo; cat /proc/zoneinfo"


def free_kb(vm) -> int:
    text = vm.run(READ, timeout=60, check=True).stdout
    meminfo, zoneinfo = text.split("@@memhp-zoneinfo", 1)
    return leakcheck.free_kb(parse_meminfo(meminfo), zoneinfo)


def measure(spec: str, reads: int, interval: float, accel: str) -> dict:
    kernel = resolve(spec)
    image = build(kernel)
    with tempfile.TemporaryDirectory(prefix="memhp-noise-") as tmp:
        with VM(kernel, image, Path(tmp), accel=accel, memmap_on_memory="1", default_state="offline") as vm:
            vm.run(SETTLE, timeout=120, check=True)
            values = []
            for i in range(reads):
                if i:   # the spacing of two reads around a hot-add, not a wait for a condition
                    vm.run(f"sleep {interval:g}", timeout=interval + 60, check=True)
                values.append(free_kb(vm))
            release = vm.run("uname -r", check=True).stdout.strip()
    steps = [abs(b - a) for a, b in zip(values, values[1:])]
    return {"spec": spec, "release": release, "values": values, "max_step": max(steps),
            "median_step": statistics.median(steps), "spread": max(values) - min(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", default=["debian:6.1", "debian:6.12"])
    ap.add_argument("--reads", type=int, default=30, help="reads per kernel (default 30)")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between reads (default 2)")
    ap.add_argument("--accel", default="auto", choices=("auto", "tcg", "kvm"))
    args = ap.parse_args()
    if args.reads < 2:
        ap.error("--reads must be at least 2")
    floor = 0
    for spec in args.specs:
        m = measure(spec, args.reads, args.interval, args.accel)
        floor = max(floor, m["max_step"])
        print(f"{spec} ({m['release']}): n={args.reads} interval={args.interval:g}s "
              f"max|step|={m['max_step']} kB median|step|={m['median_step']:g} kB spread={m['spread']} kB "
              f"reads={m['values']}", flush=True)
    print(f"noise_floor_kb={floor} (largest |step| between consecutive idle reads over {', '.join(args.specs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
