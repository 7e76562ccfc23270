"""A/B boots: variants of the guest image recipe, firmware or CPU model, booted alternately.

    .venv/bin/python tests/bench/boot_ab.py --kernel debian:6.12 --runs 8 \\
        --variant old=RECIPE_DIR --variant new=guest-images
    .venv/bin/python tests/bench/boot_ab.py --kernel debian:6.12 --runs 6 \\
        --variant max=guest-images,cpu=max --variant ivy=guest-images,cpu=IvyBridge

A variant is NAME=RECIPE[,cpu=MODEL][,firmware=qboot]; MODEL may not hold commas here (use
`+feature` forms QEMU accepts after a plain name, e.g. `Nehalem` or `max`). The boots alternate
between the variants, so the host's drift (this 2-core machine's TCG speed moved by 25% within
an hour) hits each alike; separate `memhp bench` runs are too far apart to compare init changes
of 50-100 ms. Each variant's medians: ssh_ready_ratio (launch -> SSH ready over the kernel's own
time to /init, as `memhp bench`), the overhead in seconds, and bench's phase breakdown.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harness.kernels.kernel import resolve  # noqa: E402
from harness.vm.image import build  # noqa: E402
from harness.workflows import bench  # noqa: E402


def parse_variant(text: str):
    """'new=guest-images,cpu=max' -> ('new', Path('guest-images'), 'max', None). Pure."""
    name, _, rest = text.partition("=")
    parts = rest.split(",")
    if not name or not parts[0]:
        raise SystemExit(f"--variant {text!r}: want NAME=RECIPE[,cpu=MODEL][,firmware=qboot]")
    opts = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return name, Path(parts[0]), opts.get("cpu"), opts.get("firmware")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="debian:6.12")
    ap.add_argument("--runs", type=int, default=6, help="boots per variant")
    ap.add_argument("--variant", action="append", required=True)
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    kernel = resolve(args.kernel)
    images = {name: build(kernel, recipe=recipe) for name, recipe, _, _ in variants}
    root = Path(tempfile.mkdtemp(prefix="boot-ab-"))
    boots = {name: [] for name, _, _, _ in variants}
    n = 0
    for _ in range(args.runs):
        for name, _, cpu, firmware in variants:
            n += 1
            d = root / f"{n}-{name}"
            d.mkdir()
            b = bench.boot_once(kernel, images[name], d, "tcg", bench.QBOOT if firmware == "qboot" else None, cpu)
            boots[name].append(b)
            print(f"{name}: ssh-ready {b.ssh_ready:.2f}s kernel-to-/init {b.to_init:.2f}s "
                  f"ratio {b.ssh_ready / b.to_init:.3f}", flush=True)
    for name, bs in boots.items():
        print(f"== {name}: ssh_ready_ratio {statistics.median(b.ssh_ready / b.to_init for b in bs):.3f}, "
              f"overhead {statistics.median(b.ssh_ready - b.to_init for b in bs):.3f}s, "
              f"serial_ready_ratio {statistics.median(b.serial_ready / b.to_init for b in bs):.3f} "
              f"(median of {len(bs)})")
        for line in bench.breakdown(bs):
            print("   " + line)
    print(f"logs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
