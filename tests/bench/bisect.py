"""Benchmark of memhp bisect on the planted history (tests/bisect/history.py).

    .venv/bin/python tests/bench/bisect.py [--cold | --fresh] [--repeat N] [--keep-temp]

Bisects c00..main with -k dimm_lifecycle (the planted commit, with the build-breaking one
skipped on the way) and prints, from the one run: the first build (the bad endpoint), the
median incremental build and the median boot-and-test of the steps after the endpoints, the
total wall time, and whether every step after the endpoints took at most 90 s, build included.

  (default)  the cache as it is: the history's bisect folder, published builds and ccache.
             Steps recorded by an earlier bisect are replayed (their figures are the recorded ones).
  --cold     a fresh temporary object tree, builds folder and ccache folder (a temporary cache
             root for the bisect's own folders only; the guests' kernels and images still come
             from the usual cache), removed at the end: every step builds, the first one from
             nothing. The user's cache is neither read for builds nor written.
  --fresh    as --cold, but with the usual ccache folder (a warm-ccache, cold-object-tree run).

Nothing in the user's cache is deleted in any mode.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and this file (bisect.py) would
# stand in for the standard library's bisect that random, statistics and tempfile import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "bisect"))

import history  # noqa: E402
from harness.cache import cache_root  # noqa: E402
from harness.workflows import bisect  # noqa: E402

STEP_GOAL_S = 90.0
K = "dimm_lifecycle"


def _ccache_stats(ccache_dir: Path) -> Dict[str, int]:
    env = dict(os.environ, CCACHE_DIR=str(ccache_dir))
    try:
        r = subprocess.run(["ccache", "--print-stats"], env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition("\t")
        if v.strip().isdigit():
            out[k] = int(v)
    return out


def _med(xs: List[float]) -> str:
    return f"{statistics.median(xs):.0f}s" if xs else "n/a"


def figures(doc: Dict[str, Any], wall: float) -> List[str]:
    """The benchmark's lines from memhp bisect's --json document."""
    steps = doc["steps"]
    ends, later = steps[:2], steps[2:]
    recorded = sum(1 for s in steps if s["recorded"])
    built_later = [s for s in later if s["build_s"] > 0]
    tested_later = [s for s in later if s["runs"]]
    whole = [s["build_s"] + s["test_s"] for s in later]
    slow = [s for s in later if s["build_s"] + s["test_s"] > STEP_GOAL_S]
    lines = [doc["message"],
             f"steps: {len(steps)} ({len(later)} after the endpoints); {recorded} replayed from records"]
    for s in ends:
        lines.append(f"{s['role']} {s['commit'][:12]}: build {s['build_s']:.0f}s"
                     f"{' (cached build)' if s['build_s'] == 0 else ''}, boot and test {s['test_s']:.0f}s")
    lines += [
        f"cold first build (bad endpoint): {ends[0]['build_s']:.0f}s"
        + (" -- 0: a cached build; run with --cold for a cold one" if ends[0]['build_s'] == 0 else ""),
        f"median incremental step build (after the endpoints, {len(built_later)} built): "
        f"{_med([s['build_s'] for s in built_later])}",
        f"median boot-and-test per step (after the endpoints, {len(tested_later)} tested): "
        f"{_med([s['test_s'] for s in tested_later])}",
        f"slowest step after the endpoints (build + boot and test): {max(whole, default=0):.0f}s",
        f"every step after the endpoints <= {STEP_GOAL_S:.0f}s: {'yes' if not slow else 'NO'}"
        + (f" ({', '.join(s['commit'][:12] + ' ' + format(s['build_s'] + s['test_s'], '.0f') + 's' for s in slow)})"
           if slow else ""),
        f"total: {wall:.0f}s",
    ]
    return lines


def _stop(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    # Ctrl-C, kill or a closed terminal: stop the build (its programs die with this process) and
    # still remove the temporary folder; SIGINT may arrive ignored when started in the background.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--cold", action="store_true", help="temporary object tree, builds and ccache")
    mode.add_argument("--fresh", action="store_true", help="temporary object tree and builds, the usual ccache")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--keep-temp", action="store_true", help="keep the temporary folder (--cold/--fresh)")
    a = ap.parse_args()
    repo = history.make_history()
    tmp: Optional[Path] = None
    root = cache_root()
    if a.cold or a.fresh:
        # Beside the usual cache (same file system, room for an object tree), but a folder of its own.
        tmp = Path(tempfile.mkdtemp(prefix="bisect-bench-", dir=os.environ.get("TMPDIR") or "/var/tmp"))
        if a.fresh:
            (tmp / "ccache").symlink_to(root / "ccache")
        root = tmp
    print(f"bisect bench: {repo}, c00..main, -k {K}, --repeat {a.repeat}, "
          f"{'cold' if a.cold else 'fresh object tree, usual ccache' if a.fresh else 'cache as it is'}"
          + (f" (temporary cache root {tmp})" if tmp else ""), flush=True)
    before = _ccache_stats(root / "ccache")
    out = Path(tempfile.mkdtemp(prefix="bisect-bench-json-")) / "bench.json"
    o = bisect.Options(tree=repo, good="c00", bad="main", k=K, repeat=a.repeat, json_path=out, cache=tmp)
    t0 = time.monotonic()
    try:
        try:
            status = bisect.main(o)
        except bisect.UsageError as e:   # EndpointError included
            print(f"memhp bisect stopped: {e}")
            return 1
        except bisect.InfraError as e:
            print(f"memhp bisect stopped (infrastructure): {e}")
            return 1
        wall = time.monotonic() - t0
        after = _ccache_stats(root / "ccache")
    finally:
        if tmp is not None and not a.keep_temp:
            shutil.rmtree(tmp, ignore_errors=True)    # a symlinked ccache (--fresh) is unlinked, not emptied
    doc = json.loads(out.read_text())
    print("\n".join(["", "---- bisect benchmark ----"] + figures(doc, wall)))
    if after:
        hits = sum(after.get(k, 0) - before.get(k, 0) for k in ("direct_cache_hit", "preprocessed_cache_hit"))
        print(f"ccache this run: {hits} hits, {after.get('cache_miss', 0) - before.get('cache_miss', 0)} misses")
    return 0 if status == bisect.EXIT_FOUND else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bisect bench: interrupted (the temporary folder, if any, was removed)", file=sys.stderr)
        sys.exit(130)
