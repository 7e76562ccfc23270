"""Leak check: DIMMs of 1, 2 and 8 blocks (128 MiB, 256 MiB, 1 GiB with 128 MiB blocks) through
CYCLES add / online_movable / offline / remove cycles; nothing may drift.

Boots its own guest (`boot()`): the baseline must be a pristine guest's, not one that earlier
scenarios have churned, and the guest is memmap_on_memory=1, memhp_default_state=offline.
On 6.1 only the one-block DIMM self-hosts its memmap (the others take it from boot RAM); on 6.8+
every block of every DIMM does. Both paths are freed on removal, and both are checked here.

Reads: every read of the counters follows `sync; echo 3 > drop_caches`. Before the first hot-add
IDLE_READS reads of the idle, pristine guest give the pristine values and the noise floor (the
standard deviation of free memory and of SUnreclaim between reads on this very guest); after the
last cycle IDLE_READS more give the end values. One warm-up cycle precedes the measured ones,
because the first hot-add allocates once-only things (zonelist rebuilds, slab caches for the new
sysfs objects).

What is judged:
* exact, after every cycle against the warmed-up baseline AND at the end against the pristine
  boot: MemTotal, spanned/present/managed of zones Normal and Movable, nr_memmap_pages (6.11+),
  the set of memory blocks. These are page counts the kernel adds and subtracts; any difference
  is a bug.
* the trend of free memory (MemFree + the per-cpu free lists, which MemFree leaves out) and of
  SUnreclaim over the measured cycles (CYCLES, extended up to MAX_CYCLES while the measured
  noise cannot yet resolve the target): the least-squares slope must stay below the
  threshold of leakcheck.leak_limit, whose target is a leak of one 4 KiB page per hot-removed
  block (11 blocks per cycle: 44 kB per cycle). The rule text of each verdict states the noise
  used, the slope's standard error and the resulting detection limit; when the guest is too
  noisy for the target the scenario says so (INFRA after the kernel's verdicts), never a silent
  pass.
* the memory a removal gives back to boot RAM (free memory after each DIMM's removal minus
  before it, settled reads): for the cycle's last removal, the 8-block DIMM, its mean over the
  cycles must be blocks x memmap size when the memmap came from boot RAM (6.1: no split) and 0
  when it is self-hosted (6.8+), plus up to two direct-map PMD-table pages, within
  Z * max(sqrt(2) * sigma, scatter of the gains) / sqrt(CYCLES). The first removals of a cycle are recorded, not judged:
  the guest is still busy right after the offline (two settled reads in a row there differ by
  hundreds of kB, SUnreclaim grows by 100-150 kB; measured on 6.12), so the first removal reads
  ~150 kB short on both kernels, given back by the next cycle.
* end against pristine for the noisy counters: the mean of the end reads of free memory may lie
  below the pristine mean, and SUnreclaim above it, by less than one block's memmap (a memmap or
  its block lost once, e.g. in the warm-up cycle, which the trend cannot see). That is this
  check's stated detection limit.
Each cycle also checks the ACPI event order of every removal and that the Movable zone grew by
exactly expect.online_deltas() while online, so a cycle that silently did less is caught.
"""
from __future__ import annotations

import math
import shlex
import statistics
import time

from harness.memory import expect, leakcheck
from harness.memory.checks import Verdict, Verdicts
from harness.errors import InfraError
from harness.memory.blocks import block_path, dimm_blocks, wait_blocks
from harness.memory.dimm import add_dimm, remove_dimm
from harness.memory.observe import snapshot
from harness.scenarios._common import facts_as_booted

CYCLES = 20                     # measured cycles at least, after one warm-up cycle
MAX_CYCLES = 40                 # more while the measured noise cannot resolve the target yet
IDLE_READS = 6                  # idle reads at the start (pristine, noise floor) and at the end
SIZES_IN_BLOCKS = (1, 2, 8)
EJECTED = ["ACPI_DEVICE_OST:132", "DEVICE_DELETED", "ACPI_DEVICE_OST:0"]
SETTLE = "sync; echo 3 > /proc/sys/vm/drop_caches"
EXACT = ("MemTotal", "nr_memmap_pages", "Normal spanned", "Normal present", "Normal managed",
         "Movable spanned", "Movable present", "Movable managed")


def counters(snap) -> dict:
    z = {f"{zone} {f}": getattr(snap.zone(0, zone), f) for zone in ("Normal", "Movable")
         for f in ("spanned", "present", "managed")}
    m = {k: snap.meminfo.get(k) for k in ("MemTotal", "MemFree", "Slab", "SUnreclaim", "Shmem")}
    zi = snap.raw.get("/proc/zoneinfo", "")
    m["pcp_pages"] = leakcheck.pcp_pages(zi)
    m["free"] = leakcheck.free_kb(snap.meminfo, zi)
    if "nr_memmap_pages" in snap.vmstat:
        m["nr_memmap_pages"] = snap.vmstat["nr_memmap_pages"]
    return {**m, **z, "blocks": sorted(snap.blocks)}


def settled(vm) -> dict:
    vm.run(SETTLE, timeout=60, check=True)
    return counters(snapshot(vm.guest))


def _states(vm, blocks, state: str) -> None:
    vm.run("for b in " + " ".join(f"{b:d}" for b in blocks) + f"; do echo {shlex.quote(state)} > "
           + block_path(0).replace("memory0", "memory$b") + "/state || exit 1; done", timeout=300, check=True)


def one_cycle(vm, facts, v: Verdicts, n: int) -> dict:
    """Add, online_movable, offline, remove the three DIMMs; returns the removal's facts."""
    bs = facts.block_size
    before = snapshot(vm.guest)
    dimms = [add_dimm(vm.qmp, k * bs) for k in SIZES_IN_BLOCKS]
    ids = {d.id: dimm_blocks(d, bs) for d in dimms}
    blocks = [b for d in dimms for b in ids[d.id]]
    wait_blocks(vm.guest, blocks)
    _states(vm, blocks, "online_movable")
    onl = snapshot(vm.guest)
    want = sum(expect.online_deltas(facts, expect.decide(facts, d.size), len(ids[d.id]))["managed"] for d in dimms)
    v.eq(f"cycle {n}: Movable managed delta", want,
         onl.zone(0, "Movable").managed - before.zone(0, "Movable").managed,
         "sum over the DIMMs of block_pages - self-hosted vmemmap pages per block")
    _states(vm, blocks, "offline")
    pre = settled(vm)
    per_dimm = {}
    last = pre
    for d in dimms:
        res = remove_dimm(vm.qmp, d)
        v.eq(f"cycle {n}: {d.id} remove events", EJECTED, list(res.event_names),
             "offline blocks are ejected: OST 132, DEVICE_DELETED, OST 0")
        v.raise_if_failed()
        wait_blocks(vm.guest, ids[d.id], present=False)
        now = settled(vm)
        per_dimm[len(ids[d.id])] = now["free"] - last["free"]
        last = now
    post = last
    return {"gain_kb": post["free"] - pre["free"], "post": post, "per_dimm": per_dimm}


def _mean(rows, key) -> float:
    return statistics.fmean(r[key] for r in rows)


def test_leak_add_remove_cycles(boot, measure):
    vm = boot()
    facts = facts_as_booted(vm)
    v = Verdicts()
    t_start = time.monotonic()
    idle0 = [settled(vm) for _ in range(IDLE_READS)]
    pristine = idle0[-1]
    sigma = {k: leakcheck.noise_sd([r[k] for r in idle0]) for k in ("free", "SUnreclaim")}
    measure("noise_floor_kb", {k: round(s, 1) for k, s in sigma.items()})
    measure("pristine_reads", [{k: r[k] for k in ("free", "SUnreclaim", "MemFree", "pcp_pages")} for r in idle0])

    one_cycle(vm, facts, v, 0)                 # warm-up
    base = settled(vm)
    v.eq("blocks after the warm-up cycle", pristine["blocks"], base["blocks"], "no stray blocks")
    series, times, removals = [], [], []
    blocks = sum(SIZES_IN_BLOCKS)
    target = leakcheck.target_kb(blocks)
    for n in range(1, MAX_CYCLES + 1):
        if n > CYCLES and leakcheck.resolves(series, target, sigma):
            break
        t0 = time.monotonic()
        rem = one_cycle(vm, facts, v, n)
        times.append(round(time.monotonic() - t0, 2))
        c = rem.pop("post")
        removals.append(rem)
        series.append({k: c[k] for k in c if k != "blocks"})
        v.eq(f"cycle {n}: memory blocks", base["blocks"], c["blocks"], "every block of every DIMM left sysfs")
        for k in EXACT:
            if k in base:
                v.eq(f"cycle {n}: {k}", base[k], c.get(k), "page counts return exactly after each cycle")
        v.raise_if_failed()
    idle1 = [settled(vm) for _ in range(IDLE_READS)]
    end = idle1[-1]
    measure("cycles", len(series))
    measure("cycle_s", times)
    measure("series", series)
    measure("removal_gain_kb", [r["gain_kb"] for r in removals])
    measure("end_reads", [{k: r[k] for k in ("free", "SUnreclaim", "MemFree", "pcp_pages")} for r in idle1])

    # Exact counters against the pristine boot, not only against the warmed-up baseline.
    v.eq("memory blocks, end vs pristine boot", pristine["blocks"], end["blocks"], "every hot-added block left")
    for k in EXACT:
        if k in pristine or k in end:
            v.eq(f"{k}, end vs pristine boot", pristine.get(k), end.get(k),
                 f"page counts the kernel adds on add/online and subtracts on offline/remove: after "
                 f"{len(series) + 1} cycles they are the pristine boot's")

    # Trends: a leak is a falling free memory or a growing SUnreclaim.
    verdicts, trends, unresolved = leakcheck.judge_leak_series(
        series, target, sigma, "per cycle",
        f"target: one 4 KiB page per hot-removed block = {blocks} x 4 = {target} kB/cycle")
    for x in verdicts:
        v.add(x)
    measure("trend", trends)

    # What a removal gives back to boot RAM. Judged on the cycle's last removal (the 8-block DIMM):
    # measured on 6.1 and 6.12, the first removal after the offline reads ~150 kB short and the
    # second less so, the last one not. Not the removal's doing: two settled reads in a row right
    # after an offline already differ by -460..+604 kB of free memory, with SUnreclaim growing by
    # 100-150 kB between them (6.12), i.e. the guest is still busy after the offline.
    memmap_kb = expect.vmemmap_bytes_per_block(facts) // expect.KiB
    last_k = SIZES_IN_BLOCKS[-1]
    last_dec = expect.decide(facts, last_k * facts.block_size)
    gains = [r["per_dimm"][last_k] for r in removals]
    want = leakcheck.removal_free_gain_kb(0 if last_dec.applies else last_k, memmap_kb)
    spread = max(math.sqrt(2) * sigma["free"], statistics.stdev(gains))   # per gain: two reads, or the seen scatter
    noise = leakcheck.Z * spread / math.sqrt(len(gains))
    pt_kb = 2 * leakcheck.PAGE_KB
    mean_gain = statistics.fmean(gains)
    measure("removal_gain", {"total_kb": [r["gain_kb"] for r in removals],
                             "per_dimm_kb": {k: [r["per_dimm"][k] for r in removals] for k in SIZES_IN_BLOCKS},
                             "last_dimm_expected_kb": want, "last_dimm_mean_kb": round(mean_gain, 1)})
    v.add(Verdict(f"free memory given back by removing the {last_k}-block DIMM, mean over {len(gains)} cycles (kB)",
                  want - noise <= mean_gain <= want + pt_kb + noise,
                  f"[{want - noise:.0f}, {want + pt_kb + noise:.0f}]", round(mean_gain, 1),
                  f"{leakcheck.removal_free_gain_kb.__doc__.splitlines()[0]} ... {last_k} blocks x {memmap_kb} kB when "
                  f"the memmap came from boot RAM, 0 when self-hosted ({last_dec.reason}); plus up to 2 direct-map "
                  f"PMD-table pages (x86 remove_pagetable() frees a table once its GiB is empty; the DIMM spans "
                  f"two); read noise {leakcheck.Z:g} x {spread:.0f} kB (the larger of sqrt(2) x the idle noise floor "
                  f"and the gains' own scatter) / sqrt({len(gains)}). Judged on the last removal of the cycle: the guest is not yet quiet right "
                  f"after the offline (measured on 6.12: two settled reads in a row there differ by up to 600 kB "
                  f"of free memory, SUnreclaim growing 100-150 kB), so the first removal reads ~150 kB short"))

    # End against the pristine boot for the noisy counters.
    free_loss = _mean(idle0, "free") - _mean(idle1, "free")
    measure("end_vs_pristine_kb", {"free_loss": round(free_loss, 1),
                                   "SUnreclaim_gain": round(_mean(idle1, "SUnreclaim") - _mean(idle0, "SUnreclaim"), 1)})
    v.add(Verdict("free memory lost since the pristine boot (mean of end reads vs pristine reads, kB)",
                  free_loss < memmap_kb, f"< {memmap_kb}", round(free_loss, 1),
                  f"detection limit: a one-time loss of one block's memmap ({memmap_kb} kB) or more, e.g. in "
                  f"the warm-up cycle, which the trend cannot see; below that, once-only allocations of the "
                  f"first hot-add and the trend's own limit account for the difference"))
    slab_gain = _mean(idle1, "SUnreclaim") - _mean(idle0, "SUnreclaim")
    v.add(Verdict("SUnreclaim gained since the pristine boot (mean of end reads vs pristine reads, kB)",
                  slab_gain < memmap_kb, f"< {memmap_kb}", round(slab_gain, 1),
                  f"detection limit: a one-time growth of one block's memmap size ({memmap_kb} kB) or more; "
                  f"smaller once-only slab of the first hot-add (new caches' first slabs) is allowed"))
    measure("scenario_s", round(time.monotonic() - t_start, 1))
    v.raise_if_failed()
    if unresolved:
        raise InfraError("the guest is too noisy to resolve a leak of one page per block: " + "; ".join(unresolved))
