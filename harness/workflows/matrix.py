"""`memhp run` over a matrix: several kernels, one shard of the scenarios, a baseline to compare with.

The front end (harness.cli) collects the scenarios and runs pytest for one kernel; this module
decides everything around it:

  plan_shard     which scenarios shard I/N runs: deterministic and balanced, by the recorded
                 durations of a previous report when one is given (longest first, each to the
                 least-loaded shard), else by module (a module stays whole, so its shared guest
                 boots once; modules by size, largest first)
  run_matrix     the suite on each kernel in turn (each in its own artifacts folder when there
                 are several), one live progress line on a terminal
  outputs        report.json (one kernel: as before; several: a "kernels" list), the kernel x
                 scenario table, the memmap cost per kernel, the comparison with a baseline
  exit_status    the worst over all kernels; with --fail-on new, 1 only for new failures
"""
from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from harness.errors import HarnessError, UsageError
from harness.reports import baseline as basecmp
from harness.reports import matrixtable, merge, report
from harness.reports.report import Result
from harness.reports.rundir import RunDirError, kernel_docs, read_report


@dataclass(frozen=True)
class Shard:
    index: int      # 1-based
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


MAX_SHARDS = 1000


def parse_shard(text: str) -> Shard:
    """--shard I/N: 1 <= I <= N <= MAX_SHARDS."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise UsageError(f"--shard {text!r}: give I/N, e.g. 1/4 (the first of four shards)")
    i, n = int(m.group(1)), int(m.group(2))
    if not 1 <= n <= MAX_SHARDS or not 1 <= i <= n:
        raise UsageError(f"--shard {text}: I must be 1..N and N 1..{MAX_SHARDS}")
    return Shard(i, n)


@dataclass(frozen=True)
class Item:
    """One collected scenario: its pytest node id, its report name ("module::case") and module."""
    nodeid: str
    name: str
    module: str


def load_report(opt: str, path: str) -> Dict[str, Any]:
    """A report.json (or a run folder holding one) given on the command line; bad input if unreadable."""
    try:
        return read_report(Path(path))[1]
    except RunDirError as e:
        raise UsageError(f"{opt}: {e}") from None


def durations_of(doc: Mapping[str, Any]) -> Dict[str, float]:
    """Each scenario's recorded duration, the mean over the report's kernels (so every kernel's job
    cuts the same shards from the same file)."""
    seen: Dict[str, List[float]] = {}
    for kd in kernel_docs(doc):
        for r in kd.get("results", []):
            if isinstance(r, dict) and isinstance(r.get("duration"), (int, float)) and r.get("name"):
                seen.setdefault(str(r["name"]), []).append(float(r["duration"]))
    return {k: statistics.fmean(v) for k, v in seen.items()}


def _lpt(weights: Sequence[Tuple[str, float]], count: int) -> List[List[str]]:
    """Longest first, each to the least-loaded shard (ties: the lower index). Deterministic."""
    loads = [0.0] * count
    parts: List[List[str]] = [[] for _ in range(count)]
    for key, w in sorted(weights, key=lambda kw: (-kw[1], kw[0])):
        i = min(range(count), key=lambda j: (loads[j], j))
        loads[i] += w
        parts[i].append(key)
    return parts


def assign(items: Sequence[Item], count: int, durations: Optional[Mapping[str, float]] = None
           ) -> List[List[Item]]:
    """Every item in exactly one of `count` shards, each shard in collection order.

    With durations: scenario by scenario, weighted by its recorded duration (one never recorded
    weighs the median of those recorded). Without: whole modules, weighted by their scenario count."""
    if durations:
        known = [durations[i.name] for i in items if i.name in durations]
        default = statistics.median(known) if known else 1.0
        parts = _lpt([(i.nodeid, float(durations.get(i.name, default))) for i in items], count)
        where = {key: n for n, keys in enumerate(parts) for key in keys}
        return [[i for i in items if where[i.nodeid] == n] for n in range(count)]
    modules: Dict[str, int] = {}
    for i in items:
        modules[i.module] = modules.get(i.module, 0) + 1
    parts = _lpt(list(modules.items()), count)
    where = {m: n for n, mods in enumerate(parts) for m in mods}
    return [[i for i in items if where[i.module] == n] for n in range(count)]


def plan_shard(items: Sequence[Item], shard: Optional[Shard], durations: Optional[Mapping[str, float]] = None
               ) -> List[Item]:
    return list(items) if shard is None else assign(items, shard.count, durations)[shard.index - 1]


# ---------------------------------------------------------------- running
@dataclass(frozen=True)
class KernelRun:
    """One kernel's part of a run."""
    spec: str
    kernel: Mapping[str, Any]           # report.json's "kernel": release, spec, ...
    results: Tuple[Result, ...]
    dir: Path                           # its artifacts folder
    wall: float = 0.0
    error: str = ""                     # the kernel could not be run (fetch, build, boot); see results


# runner(spec, dir, items, progress) -> KernelRun; it raises HarnessError when the kernel cannot run.
Runner = Callable[[str, Path, Sequence[Item], Any], KernelRun]


def kernel_dirs(specs: Sequence[str]) -> List[str]:
    """A folder name per kernel spec, readable and distinct: debian:6.1 -> debian_6.1."""
    out: List[str] = []
    for i, spec in enumerate(specs, 1):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_.")[-60:] or f"kernel{i}"
        out.append(name if name not in out else f"{name}-{i}")
    return out


def run_matrix(specs: Sequence[str], art: Path, items: Sequence[Item], runner: Runner, progress: Any = None
               ) -> List[KernelRun]:
    """The suite on each kernel in turn. One kernel writes into `art` itself (the layout of a plain
    run); several each get art/<kernel_dirs>. With several kernels, a kernel that cannot be run
    (its fetch, build or boot failed) is recorded, each selected scenario classified from the
    error, and the next kernel runs; with one, the error stops the run as it always did."""
    runs: List[KernelRun] = []
    dirs = kernel_dirs(specs)
    for spec, name in zip(specs, dirs):
        d = art if len(specs) == 1 else art / name      # the runner makes it once the kernel resolved
        if progress is not None:
            progress.start_kernel(spec, [i.name for i in items])
        if not items:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            runs.append(KernelRun(spec, {"spec": spec, "release": ""}, (), d))
            continue
        try:
            runs.append(runner(spec, d, items, progress))
        except HarnessError as e:
            if len(specs) == 1 or isinstance(e, UsageError):
                raise
            outcome = report.classify(e)
            msg = f"kernel {spec} could not be run: {type(e).__name__}: {e}"
            runs.append(KernelRun(spec, {"spec": spec, "release": ""},
                                  tuple(Result(name=i.name, outcome=outcome, message=msg) for i in items), d,
                                  error=msg))
        if progress is not None:
            progress.end_kernel()
    return runs


# ---------------------------------------------------------------- outputs
def shard_json(shard: Optional[Shard], selection: Sequence[Item]) -> Optional[Dict[str, Any]]:
    """What report.json records for `memhp report --merge` to check overlaps and gaps."""
    if shard is None:
        return None
    return {"index": shard.index, "count": shard.count, "selection": [i.name for i in selection]}


def kernel_json(run: KernelRun, shard: Optional[Dict[str, Any]], dirname: Optional[str] = None) -> Dict[str, Any]:
    results = [asdict(r) for r in run.results]
    return merge.kernel_doc(run.kernel, results, shard=shard, dir=dirname, error=run.error or None)


def report_json(runs: Sequence[KernelRun], shard: Optional[Dict[str, Any]],
                compared: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """report.json of the whole run: a single-kernel document for one kernel (the format every
    earlier run has), {"kernels": [...], "summary", "exit_status"} for several."""
    if len(runs) == 1:
        return merge.combine([kernel_json(runs[0], shard)], baseline=compared)
    names = kernel_dirs([r.spec for r in runs])
    return merge.combine([kernel_json(r, shard, n) for r, n in zip(runs, names)], shard=shard, baseline=compared)


def write_kernel_reports(art: Path, runs: Sequence[KernelRun], shard: Optional[Dict[str, Any]]) -> None:
    """With several kernels, each kernel's folder gets its own single-kernel report.json too, so
    `memhp report art/<kernel>` renders that kernel alone (html is one page per kernel)."""
    if len(runs) > 1:
        for r in runs:
            r.dir.mkdir(parents=True, exist_ok=True, mode=0o700)    # a kernel that could not run has none yet
            report.write_doc(r.dir / "report.json", kernel_json(r, shard))


def junit_suites(runs: Sequence[KernelRun]) -> List[Tuple[str, Sequence[Result]]]:
    return [(f"memhp.{r.spec}", r.results) for r in runs]


def tables(runs: Sequence[KernelRun]) -> str:
    """The scenario table (one kernel: as always; several: kernel x scenario), then the memmap cost."""
    if len(runs) == 1:
        text = report.table(runs[0].results)
        cost = report.memmap_cost_table(runs[0].results)
    else:
        cols = [(r.spec, r.results) for r in runs]
        text = matrixtable.kernel_table(cols)
        cost = matrixtable.memmap_cost_columns(cols)
    return text + (f"\n\n{cost}" if cost else "")


def kernel_docs_of(runs: Sequence[KernelRun]) -> List[Dict[str, Any]]:
    return [kernel_json(r, None) for r in runs]


def compare(runs: Sequence[KernelRun], baseline_doc: Mapping[str, Any], universe: Optional[set] = None
            ) -> Tuple[basecmp.Change, ...]:
    return basecmp.compare(kernel_docs(baseline_doc), kernel_docs_of(runs), universe)


FAIL_ON = ("any", "new")


def exit_status(runs: Sequence[KernelRun], changes: Optional[Sequence[basecmp.Change]] = None,
                fail_on: str = "any", empty_ok: bool = False) -> int:
    """The worst over all kernels (a kernel failure, 1, outranks infrastructure, 3). With
    fail_on="new" (needs a baseline): 1 only when a scenario newly fails; known failures give 0,
    and infrastructure still gives 3. empty_ok: a shard that holds no scenario passes."""
    results = [r for run in runs for r in run.results]
    if not results:
        return report.EXIT_OK if empty_ok else report.EXIT_INFRA
    status = report.exit_status(results)
    if fail_on == "new" and changes is not None:
        if any(c.is_new_failure for c in changes):
            return report.EXIT_KERNEL
        return report.EXIT_INFRA if any(r.outcome == report.INFRA for r in results) else report.EXIT_OK
    return status
