"""Leak check: DIMMs of 1, 2 and 8 blocks (128 MiB, 256 MiB, 1 GiB with 128 MiB blocks) through
CYCLES add / online_movable / offline / remove cycles; nothing may drift.

Boots its own guest (`boot()`): the baseline must be a pristine guest's, not one that earlier
scenarios have churned, and the guest is default memmap_on_memory=1, memhp_default_state=offline.
On 6.1 only the one-block DIMM self-hosts its memmap (the others take it from boot RAM); on 6.8+
every block of every DIMM does. Both paths are freed on removal, and both are checked here.

What is compared, and how strictly (the baseline is taken after one warm-up cycle, because
the first hot-add allocates once-only things: the Movable zone's per-cpu pagesets, zonelist
rebuilds, slab caches for the new sysfs objects):
* exact: MemTotal, spanned/present/managed of zones Normal and Movable, nr_memmap_pages
  (6.11+), the set of memory blocks in sysfs. These are plain page counts the kernel adds and
  subtracts; any difference is a bug.
* with a tolerance, as the median of the last 5 cycles minus the median of the first 5
  measured cycles: free memory (MemFree plus the per-cpu free lists, which MemFree leaves
  out and which swing by megabytes between reads) and SUnreclaim (unreclaimable slab, read
  after drop_caches). See harness.leakcheck.tolerances() for the figures and why.
Each cycle also checks the ACPI event order of every removal and that the Movable zone grew
by exactly expect.online_deltas() while online, so a cycle that silently did less is caught.
"""
from __future__ import annotations

import time

from harness import expect, leakcheck
from harness.checks import Verdicts
from harness.hotplug import add_dimm, block_path, remove_dimm, wait_blocks
from harness.observe import gather_facts, snapshot

CYCLES = 20                     # measured cycles, after one warm-up cycle
SIZES_IN_BLOCKS = (1, 2, 8)
EJECTED = ["ACPI_DEVICE_OST:132", "DEVICE_DELETED", "ACPI_DEVICE_OST:0"]
SETTLE = "sync; echo 3 > /proc/sys/vm/drop_caches"
EXACT = ("MemTotal", "nr_memmap_pages", "Normal spanned", "Normal present", "Normal managed",
         "Movable spanned", "Movable present", "Movable managed")


def counters(snap) -> dict:
    z = {f"{zone} {f}": getattr(snap.zone(0, zone), f) for zone in ("Normal", "Movable")
         for f in ("spanned", "present", "managed")}
    m = {k: snap.meminfo.get(k) for k in ("MemTotal", "MemFree", "Slab", "SUnreclaim")}
    zi = snap.raw.get("/proc/zoneinfo", "")
    m["pcp_pages"] = leakcheck.pcp_pages(zi)
    m["free"] = leakcheck.free_kb(snap.meminfo, zi)
    if "nr_memmap_pages" in snap.vmstat:
        m["nr_memmap_pages"] = snap.vmstat["nr_memmap_pages"]
    return {**m, **z, "blocks": sorted(snap.blocks)}


def one_cycle(vm, facts, v: Verdicts, n: int) -> None:
    bs = facts.block_size
    before = snapshot(vm.guest)
    dimms = [add_dimm(vm.qmp, k * bs, bs) for k in SIZES_IN_BLOCKS]
    blocks = [b for d in dimms for b in d.block_ids]
    wait_blocks(vm.guest, blocks)
    vm.run("for b in " + " ".join(str(b) for b in blocks) + "; do echo online_movable > "
           + block_path(0).replace("memory0", "memory$b") + "/state || exit 1; done", timeout=300, check=True)
    onl = snapshot(vm.guest)
    want = sum(expect.online_deltas(facts, expect.decide(facts, d.size), len(d.block_ids))["managed"] for d in dimms)
    v.eq(f"cycle {n}: Movable managed delta", want,
         onl.zone(0, "Movable").managed - before.zone(0, "Movable").managed,
         "sum over the DIMMs of block_pages - self-hosted vmemmap pages per block")
    vm.run("for b in " + " ".join(str(b) for b in blocks) + "; do echo offline > "
           + block_path(0).replace("memory0", "memory$b") + "/state || exit 1; done", timeout=300, check=True)
    for d in dimms:
        res = remove_dimm(vm.qmp, d)
        v.eq(f"cycle {n}: {d.id} remove events", EJECTED, list(res.event_names),
             "offline blocks are ejected: OST 132, DEVICE_DELETED, OST 0")
    wait_blocks(vm.guest, blocks, present=False)
    v.raise_if_failed()


def test_leak_add_remove_cycles(boot, measure):
    vm = boot()
    facts = gather_facts(vm.guest, vm.kernel)
    tol = leakcheck.tolerances(facts, CYCLES, sum(SIZES_IN_BLOCKS))
    measure("tolerance", tol)
    v = Verdicts()
    pristine = snapshot(vm.guest)
    one_cycle(vm, facts, v, 0)                 # warm-up
    vm.run(SETTLE, timeout=60)
    base = counters(snapshot(vm.guest))
    v.eq("blocks after the warm-up cycle", sorted(pristine.blocks), base["blocks"], "no stray blocks")
    series, times = [], []
    for n in range(1, CYCLES + 1):
        t0 = time.monotonic()
        one_cycle(vm, facts, v, n)
        times.append(round(time.monotonic() - t0, 2))
        vm.run(SETTLE, timeout=60)
        c = counters(snapshot(vm.guest))
        series.append({k: c[k] for k in c if k != "blocks"})
        v.eq(f"cycle {n}: memory blocks", base["blocks"], c["blocks"], "every block of every DIMM left sysfs")
        for k in EXACT:
            if k in base:
                v.eq(f"cycle {n}: {k}", base[k], c.get(k), "page counts return exactly after each cycle")
        v.raise_if_failed()
    last = counters(snapshot(vm.guest))
    measure("cycle_s", times)
    measure("series", series)
    drift = leakcheck.drift(base, last)
    measure("drift", drift)
    for k in EXACT:
        if k in base:
            v.eq(f"{k} drift after {CYCLES} cycles", 0, drift.get(k),
                 "page counts the kernel adds on add/online and subtracts on offline/remove")
    wdrift = {k: leakcheck.window_drift(series, k) for k in ("free", "SUnreclaim", "MemFree", "Slab")}
    measure("window_drift", wdrift)
    v.within("free memory (MemFree + per-cpu lists) drift, last vs first window (kB)", 0, wdrift["free"],
             tol["free"], tol["why_free"])
    v.within("SUnreclaim drift, last vs first window (kB)", 0, wdrift["SUnreclaim"], tol["SUnreclaim"],
             tol["why_slab"])
    v.raise_if_failed()
