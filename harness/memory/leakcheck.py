"""Pure helpers of the leak scenario (harness/scenarios/test_leak.py): what is counted, the trend
test that judges the noisy counters, and its detection limit. Numbers in, numbers out;
unit-tested in tests/unit/test_leakcheck.py.

Why a trend test: a leak of one 4 KiB page per hot-removed block is 4 kB per block per cycle,
far below the read-to-read noise of free memory (a few hundred kB). A fixed band on the drift
between two windows cannot see it; a least-squares slope over n cycles can, because its
standard error falls as n**-1.5: se = sigma / sqrt(sum((x - mean x)**2)), and
sum((x - mean x)**2) = n(n**2 - 1)/12 for x = 0..n-1.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from harness.memory.checks import Verdict, need_field

_COUNT = re.compile(r"^\s+count:\s+(\d+)\s*$")
_NODE_ZONE = re.compile(r"^Node\s+(\d+),\s+zone\s+\S+")

PAGE_KB = 4
Z = 3.0   # one-sided 3 sigma: a false alarm on pure noise has probability 0.13 %


def pcp_pages(zoneinfo: str) -> int:
    """Pages sitting on the per-cpu free lists: the sum of every "count:" line (they only occur
    under a zone's "pagesets", one per cpu) in /proc/zoneinfo.

    Those pages are free but not in MemFree (NR_FREE_PAGES counts the buddy lists only,
    mm/page_alloc.c), so MemFree alone jumps by up to cpus * pcp->high pages between two reads.
    """
    return sum(pcp_pages_by_node(zoneinfo).values())


def pcp_pages_by_node(zoneinfo: str) -> Dict[int, int]:
    """{node: pages on the per-cpu lists of that node's zones}, from /proc/zoneinfo."""
    out: Dict[int, int] = {}
    node = 0
    for line in (zoneinfo or "").replace("\r", "").split("\n"):
        m = _NODE_ZONE.match(line)
        if m:
            node = int(m.group(1))
            out.setdefault(node, 0)
            continue
        c = _COUNT.match(line)
        if c:
            out[node] = out.get(node, 0) + int(c.group(1))
    return out


def free_kb(meminfo: Mapping[str, int], zoneinfo: str, page_size: int = 4096) -> int:
    """MemFree plus the per-cpu free lists, in kB: free memory without the pcp noise.

    Never a number that could land inside a band when MemFree is missing; by checks.need_field's
    rule: nothing read from /proc/meminfo is MissingData (INFRA), a /proc/meminfo read without
    MemFree is the kernel no longer providing it (CheckFailed, FAIL)."""
    mem_free = need_field(meminfo, "MemFree", "/proc/meminfo",
                          "every kernel memhp targets prints MemFree (fs/proc/meminfo.c)")
    return mem_free + pcp_pages(zoneinfo) * page_size // 1024


# ---------------------------------------------------------------- trend test
@dataclass(frozen=True)
class Trend:
    """Least-squares line through (cycle index, value)."""
    slope: float          # units per cycle
    intercept: float
    resid_sd: float       # sample sd of the residuals (n - 2 degrees of freedom)
    n: int


def sxx(n: int) -> float:
    """sum((x - mean x)**2) for x = 0..n-1, i.e. n(n**2 - 1)/12."""
    return n * (n * n - 1) / 12.0


def fit_trend(ys: Sequence[float]) -> Trend:
    """Ordinary least squares of ys against 0..n-1. Needs n >= 3 values, none missing."""
    vals = [float(y) for y in ys]
    n = len(vals)
    if n < 3:
        raise ValueError(f"a trend needs at least 3 values, got {n}")
    xbar = (n - 1) / 2.0
    ybar = sum(vals) / n
    slope = sum((i - xbar) * (y - ybar) for i, y in enumerate(vals)) / sxx(n)
    icpt = ybar - slope * xbar
    rss = sum((y - (icpt + slope * i)) ** 2 for i, y in enumerate(vals))
    return Trend(slope, icpt, math.sqrt(rss / (n - 2)), n)


def noise_sd(reads: Sequence[float]) -> float:
    """Sample standard deviation of repeated reads of one counter on an idle guest (>= 2 reads)."""
    if len(reads) < 2:
        raise ValueError("a noise floor needs at least 2 reads")
    return statistics.stdev(float(r) for r in reads)


@dataclass(frozen=True)
class LeakLimit:
    """How a slope is judged, and what it can see.

    target: the leak rate that must be caught (units per cycle);
    sigma: per-read noise used (the larger of the idle noise floor and the residual scatter);
    se: standard error of the slope for that sigma over n cycles;
    threshold: a slope above it fails: max(target / 2, Z * se);
    detect: the smallest leak rate caught with probability >= 99.87 %: threshold + Z * se;
    resolves: detect <= target, i.e. the run is sensitive enough for the target.
    """
    target: float
    n: int
    sigma: float
    se: float
    threshold: float
    detect: float

    @property
    def resolves(self) -> bool:
        return self.detect <= self.target

    def rule(self, unit: str = "kB") -> str:
        return (f"least-squares slope over {self.n} cycles must stay <= {self.threshold:.1f} {unit}/cycle "
                f"(max(target/2, {Z:g} se)); noise sigma {self.sigma:.1f} {unit} per read (idle noise floor "
                f"measured on this guest, or the residual scatter if larger) gives slope se {self.se:.2f} "
                f"{unit}/cycle; detection limit {self.detect:.1f} {unit}/cycle (caught with >= 99.87 %), "
                f"target {self.target:g} {unit}/cycle")


def leak_limit(target: float, n: int, sigma: float) -> LeakLimit:
    """The threshold and detection limit of the slope test for a leak of `target` per cycle."""
    if n < 3:
        raise ValueError("a trend needs at least 3 cycles")
    se = sigma / math.sqrt(sxx(n))
    threshold = max(target / 2.0, Z * se)
    return LeakLimit(target=target, n=n, sigma=sigma, se=se, threshold=threshold, detect=threshold + Z * se)


def judge_trend(ys: Sequence[float], target: float, idle_sigma: float):
    """(Trend, LeakLimit, leaked?) for one counter's per-cycle series. A loss of free memory is a
    negative slope; pass -ys for free memory so that a leak is always a positive slope."""
    t = fit_trend(ys)
    lim = leak_limit(target, t.n, max(idle_sigma, t.resid_sd))
    return t, lim, t.slope > lim.threshold


def target_kb(blocks_removed_per_cycle: int) -> int:
    """The leak rate every leak scenario must catch: one 4 KiB page per hot-removed memory block
    (pc-dimm: per DIMM block ejected; virtio-mem: per memory block unplugged), in kB per cycle."""
    return blocks_removed_per_cycle * PAGE_KB


def resolves(series: Sequence[Mapping[str, float]], target: float, sigma: Mapping[str, float],
             keys: Iterable[str] = ("free", "SUnreclaim")) -> bool:
    """Whether the cycles so far resolve the target on every judged counter (noise only: the slope
    is not looked at, so stopping on it does not bias the slope test). series: one row per cycle;
    sigma: the idle noise floor per key."""
    for key in keys:
        t = fit_trend([row[key] for row in series])
        if not leak_limit(target, len(series), max(sigma[key], t.resid_sd)).resolves:
            return False
    return True


def cycles_needed(target: float, sigma: float, start: int = 3, limit: int = 1000) -> Optional[int]:
    """The fewest cycles at which leak_limit(target, n, sigma) resolves the target; None beyond limit."""
    for n in range(max(3, start), limit + 1):
        if leak_limit(target, n, sigma).resolves:
            return n
    return None


def drift(base: Mapping[str, Optional[int]], last: Mapping[str, Optional[int]],
          keys: Optional[Iterable[str]] = None) -> Dict[str, int]:
    """last - base for every numeric key present (non-None) in both."""
    ks: List[str] = list(keys) if keys is not None else [k for k in last if k in base]
    out: Dict[str, int] = {}
    for k in ks:
        b, a = base.get(k), last.get(k)
        if isinstance(b, int) and isinstance(a, int):
            out[k] = a - b
    return out


def removal_free_gain_kb(blocks_without_selfhosting: int, memmap_kb: int) -> int:
    """Free memory a removal gives back to the boot RAM: the memmap of every block whose memmap was
    allocated from it (sparse_remove_section -> depopulate_section_memmap -> vmemmap_free frees it);
    a self-hosted memmap lives in the DIMM and gives nothing back."""
    return blocks_without_selfhosting * memmap_kb


# The two counters a leak moves, with the sign that makes a leak positive.
LEAK_KEYS = (("free", -1, "free memory (MemFree + per-cpu lists) lost"), ("SUnreclaim", 1, "SUnreclaim gained"))


def judge_leak_series(series: Sequence[Mapping[str, float]], target: float, sigma: Mapping[str, float],
                      per: str, target_why: str) -> Tuple[List[Verdict], Dict[str, dict], List[str]]:
    """One verdict per LEAK_KEYS counter on the least-squares slope of `series` (one row per cycle),
    the trends to record, and why the noise could not resolve `target` (empty when it could).
    Shared by the pc-dimm and virtio-mem leak scenarios: the same detection for both.
    per: what a cycle is ("per cycle"); target_why: how `target` follows from the cycle."""
    verdicts, trends, unresolved = [], {}, []
    for key, sign, what in LEAK_KEYS:
        t, lim, leaked = judge_trend([sign * row[key] for row in series], target, sigma[key])
        trends[key] = {"slope_kb_per_cycle": round(sign * t.slope, 2), "threshold": round(lim.threshold, 1),
                       "detect": round(lim.detect, 1), "se": round(lim.se, 2), "sigma": round(lim.sigma, 1)}
        verdicts.append(Verdict(f"{what} {per} (least-squares slope, kB/cycle)", not leaked,
                                f"<= {lim.threshold:.1f}", round(t.slope, 2), f"{target_why}; " + lim.rule()))
        if not lim.resolves:
            unresolved.append(f"{key}: detection limit {lim.detect:.1f} kB/cycle > target {target} kB/cycle "
                              f"(noise sigma {lim.sigma:.1f} kB)")
    return verdicts, trends, unresolved
