"""Pure helpers of the leak scenario (harness/scenarios/test_leak.py): what is counted, and how
much drift is allowed. Text in, numbers out; unit-tested in tests/unit/test_scenario_helpers.py.
"""
from __future__ import annotations

import re
import statistics
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from harness import expect

_COUNT = re.compile(r"^\s+count:\s+(\d+)\s*$")


def pcp_pages(zoneinfo: str) -> int:
    """Pages sitting on the per-cpu free lists: the sum of every "count:" line (they only occur
    under a zone's "pagesets", one per cpu) in /proc/zoneinfo.

    Those pages are free but not in MemFree (NR_FREE_PAGES counts the buddy lists only,
    mm/page_alloc.c), so MemFree alone jumps by up to cpus * pcp->high pages between two reads.
    """
    return sum(int(m.group(1)) for m in (_COUNT.match(line) for line in
                                         (zoneinfo or "").replace("\r", "").split("\n")) if m)


def free_kb(meminfo: Mapping[str, int], zoneinfo: str, page_size: int = 4096) -> Optional[int]:
    """MemFree plus the per-cpu free lists, in kB: free memory without the pcp noise."""
    if "MemFree" not in meminfo:
        return None
    return meminfo["MemFree"] + pcp_pages(zoneinfo) * page_size // 1024


WINDOW = 5   # cycles per median window of the noisy counters


def window_drift(series: Sequence[Mapping[str, Optional[int]]], key: str, window: int = WINDOW) -> Optional[float]:
    """median(last `window` values) - median(first `window` values) of one counter over the cycles.

    The noisy counters (free memory, SUnreclaim) move by a few hundred kB between single
    reads; a median over a window of cycles is steady, and a leak still grows by
    (len(series) - window) cycles' worth between the two windows. None when the series is
    shorter than two windows or a value is missing.
    """
    vals = [row.get(key) for row in series]
    if len(vals) < 2 * window or any(not isinstance(x, int) for x in vals):
        return None
    return statistics.median(vals[-window:]) - statistics.median(vals[:window])


def tolerances(facts: expect.KernelFacts, cycles: int, blocks_per_cycle: int,
               window: int = WINDOW) -> Dict[str, object]:
    """Allowed window_drift (kB): free memory half one block's memmap, SUnreclaim 256 kB.

    The two windows lie span = cycles - window cycles apart.
    Free memory (MemFree + pcp lists): half the memmap of one block (1024 kB with 128 MiB
    blocks and a 64-byte struct page). The leak this check exists for, a memmap or pages of a
    block not given back on removal, costs a whole block's memmap (2048 kB) or more per cycle,
    so it overshoots the bound span-fold; a steady leak of bound/span kB per cycle shows too.
    Below the bound is noise (measured: single reads within +-250 kB once the pcp lists are
    counted): the syslog file on tmpfs growing by a few lines per cycle, dropbear's sessions,
    vmalloc's lazily freed areas.
    SUnreclaim (after drop_caches): 256 kB, 64 pages (measured: single reads within +-150 kB,
    window medians within 125 kB). A leaked memory_block and its sysfs kobjects (about 1 kB
    per block) over blocks_per_cycle * span blocks passes it.
    """
    memmap_kb = expect.vmemmap_bytes_per_block(facts) // expect.KiB
    free_tol = memmap_kb // 2
    span = max(1, cycles - window)
    return {"free": free_tol, "SUnreclaim": 256,
            "why_free": (f"half one block's memmap ({memmap_kb} kB, {facts.struct_page_size}-byte struct page); "
                         f"median of the last {window} cycles minus median of the first {window}, {span} cycles "
                         f"apart: a leak of {free_tol // span} kB or more per cycle shows"),
            "why_slab": (f"64 slab pages, medians as above; a ~1 kB leak per block over {blocks_per_cycle} blocks "
                         f"x {span} cycles ({blocks_per_cycle * span} kB) shows")}


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
