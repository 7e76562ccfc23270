"""Benchmark of memhp bisect on the planted history (tests/bisect/history.py).

    .venv/bin/python tests/bench/bisect.py [--keep] [--repeat N]

Bisects c00..main with -k dimm_lifecycle and prints: the first build (the bad endpoint, from an
empty object tree), the median incremental build and the median whole step (build + boot and
test) after the endpoints, the median boot-and-test per run, and the total wall time.
By default the history's bisect folder (clone, object tree, step records) and its published
builds are removed first, so every step builds; ccache's folder is kept, and its hit rate for
the run is printed (a cold ccache: delete ~/.cache/memhp/ccache before). --keep measures the
cache as it is (a rerun replays the recorded steps).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "bisect"))

import history  # noqa: E402
from harness.cache import cache_root  # noqa: E402


def _forget(repo: Path) -> None:
    """Remove the bisect folders cloned from repo and the builds made from it."""
    root = cache_root()
    objects = str((repo / ".git" / "objects").resolve())
    for d in (root / "bisect").glob("*"):
        alt = d / "src" / ".git" / "objects" / "info" / "alternates"
        if alt.is_file() and objects in alt.read_text():
            shutil.rmtree(d)
    for bj in (root / "builds").glob("*/build.json"):
        if json.loads(bj.read_text()).get("tree") == str(repo):
            shutil.rmtree(bj.parent)


def _ccache_stats() -> dict:
    env = dict(os.environ, CCACHE_DIR=str(cache_root() / "ccache"))
    r = subprocess.run(["ccache", "--print-stats"], env=env, capture_output=True, text=True)
    out = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition("\t")
        if v.strip().isdigit():
            out[k] = int(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="store_true", help="do not clear the history's bisect folder and builds")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    repo = history.make_history()
    if not a.keep:
        _forget(repo)
    before = _ccache_stats()
    out = Path(tempfile.mkdtemp()) / "bench.json"
    t0 = time.monotonic()
    p = subprocess.run([str(ROOT / ".venv" / "bin" / "memhp"), "bisect", "--tree", str(repo), "--good", "c00",
                        "--bad", "main", "-k", "dimm_lifecycle", "--repeat", str(a.repeat), "--json", str(out)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    wall = time.monotonic() - t0
    after = _ccache_stats()
    if p.returncode != 0 or not out.is_file():
        print(p.stdout, p.stderr, sep="\n")
        print(f"memhp bisect exited {p.returncode}")
        return 1
    doc = json.loads(out.read_text())
    steps = doc["steps"]
    built = [s for s in steps if not s["recorded"] and s["build_s"] > 0]
    later = [s for s in steps[2:] if not s["recorded"] and s["build_s"] > 0]
    runs = [s["test_s"] / len(s["runs"]) for s in steps if s["runs"] and not s["recorded"]]
    med = lambda xs: f"{statistics.median(xs):.0f}s" if xs else "n/a"  # noqa: E731
    hits = sum(after.get(k, 0) - before.get(k, 0) for k in ("direct_cache_hit", "preprocessed_cache_hit"))
    misses = after.get("cache_miss", 0) - before.get("cache_miss", 0)
    print(doc["message"])
    print(f"steps: {len(steps)} ({len(steps) - 2} after the endpoints), {len(built)} built here")
    print(f"first build (bad endpoint): {steps[0]['build_s']:.0f}s")
    print(f"median incremental build: {med([s['build_s'] for s in later])}")
    print(f"median step after the endpoints (build + boot and test): "
          f"{med([s['build_s'] + s['test_s'] for s in later])}; slowest "
          f"{max((s['build_s'] + s['test_s'] for s in later), default=0):.0f}s")
    print(f"median boot and test per run: {med(runs)}")
    print(f"ccache this run: {hits} hits, {misses} misses")
    print(f"total: {wall:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
