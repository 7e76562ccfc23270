"""Where a hot-added block's memmap lives: on the DIMM's own node 1 with memmap_on_memory, on the
fallback node 0 without it; and what /proc/vmstat nr_memmap_pages counts on both paths.

Guests: boot() per memmap_on_memory value (1 and 0), numa_nodes=2: node 0 holds the boot RAM and
node 1 starts without memory. Both are boot-time state, and node 1 stays online once a DIMM has
brought it up, so no guest is shared (as in test_numa).

Rules (kernel sources read: Debian 6.1.192 and 6.12.117, the same code in both):
* A first DIMM on node 1 is added and removed before anything is measured: bringing node 1 online
  (__try_online_node(), register_one_node()) allocates once-only things from node 0.
* Feature on: the memmap comes from the DIMM itself (vmemmap_alloc_block_buf() with the altmap
  -> altmap_alloc_block_buf()), so node 0's free memory (its MemFree plus its zones' per-cpu
  free lists) does not move at the add beyond the per-block structures, and the DIMM's first
  vmemmap pages, which are node 1's, carry kpageflags bit 37 once it is online (6.0+).
* Feature off: vmemmap_alloc_block(size, nid=1) calls alloc_pages_node(1, GFP_KERNEL | ...)
  without __GFP_THISNODE. Node 1 has no populated zone while the DIMM is still offline, so the
  page allocator falls back along node 1's zonelist to node 0: node 0's free memory drops by the
  memmap (block_pages * sizeof(struct page) per block), and no page of the DIMM carries bit 37.
  The band is expect.add_time_free_drop_bounds_kb(), applied to node 0 alone.
* The removal gives node 0 back what the add took from it (the memmap when it came from node 0,
  nothing when it was self-hosted) and what onlining took (node 1's kswapd/kcompactd threads and
  zone pagesets, freed when its last block goes offline: offline_pages() -> kswapd_stop(),
  kcompactd_stop(), zone_pcp_reset()). So the judged figure is node 0's free memory after the
  removal against before the add: back to it within 3 * noise on either side. A memmap from
  node 0 that is never freed leaves it a whole memmap short; the gain at the removal alone is
  recorded, not judged (it also holds the online-time allocations: -64..756 kB above the add's
  drop in 14 runs on 6.1 and 6.12, so the add-time band applied to it failed once).
* nr_memmap_pages (6.11+) rises by expect.nr_memmap_pages_delta() at the add on BOTH paths
  (mm/sparse-vmemmap.c populate_section_memmap() adds section_nr_vmemmap_pages(), which ignores
  the altmap) and falls back at the removal; absent before 6.11.
The memory map per step (before add, after add, after online, after removal) goes to the HTML
report (_common.memory_map).
"""
from __future__ import annotations

import pytest

from harness.memory import expect, leakcheck
from harness.memory.checks import Verdict, Verdicts
from harness.memory.observe import snapshot
from harness.memory.parsers import parse_meminfo
from harness.scenarios._common import (facts_as_booted, hot_added, memory_map, owner_private_pfns, pfn_span,
                                       set_states)

PARAM = {"on": "1", "off": "0"}
SETTLE = "sync; echo 3 > /proc/sys/vm/drop_caches"


def node_free_kb(vm, node: int) -> int:
    """Node `node`'s MemFree plus the per-cpu free lists of its zones, in kB, read in one command."""
    out = vm.run(f"{SETTLE}; cat /sys/devices/system/node/node{node}/meminfo; echo @@memhp@@; cat /proc/zoneinfo",
                 timeout=60, check=True).stdout
    mem, _, zi = out.partition("@@memhp@@")
    info = parse_meminfo(mem)
    pcp = leakcheck.pcp_pages_by_node(zi)
    return leakcheck.free_kb(info, "") + pcp.get(node, 0) * leakcheck.PAGE_KB


@pytest.mark.parametrize("param", ["on", "off"])
def test_memmap_node_of_a_node1_dimm(boot, measure, param):
    vm = boot(numa_nodes=2, memmap_on_memory=PARAM[param])
    facts = facts_as_booted(vm)
    size = facts.block_size
    dec = expect.decide(facts, size)
    if param == "on" and not dec.applies:
        pytest.skip(f"memmap_on_memory cannot apply to a {size >> 20} MiB DIMM here: {dec.reason}")
    measure("decision", dec.reason)
    v = Verdicts()
    with hot_added(vm, size, node=1):
        pass                                   # warm-up: node 1 comes online once
    base = snapshot(vm.guest)
    free0 = node_free_kb(vm, 0)
    # The memory map per step for the HTML report; the removal's snapshot is taken after the
    # node-0 measurement, so it cannot disturb it.
    with memory_map(vm, measure, dec) as mm:
        with hot_added(vm, size, node=1) as dimm:
            added = snapshot(vm.guest)
            mm.step("before add", base)
            mm.step("after add", added, [dimm])
            drop = free0 - node_free_kb(vm, 0)
            lo, hi = expect.add_time_free_drop_bounds_kb(facts, dec, size)
            cost = expect.add_time_memfree_cost_kb(facts, dec, size)
            measure("node0_free_drop_kb", {"observed": drop, "band": [lo, hi], "memmap_kb": cost})
            where = ("the DIMM itself (altmap), so node 0 gives only the per-block structures" if dec.applies else
                     "alloc_pages_node(1, GFP_KERNEL) without __GFP_THISNODE: node 1 has no populated zone yet, "
                     "so the memmap comes from node 0")
            v.add(Verdict("node 0 free memory (MemFree + its per-cpu lists) drop at the add of a node-1 DIMM (kB)",
                          lo <= drop <= hi, f"[{lo}, {hi}]", drop,
                          f"the memmap ({cost} kB of node 0) comes from {where}; "
                          f"{expect.add_time_free_drop_bounds_kb.__doc__.strip().splitlines()[0]}; {dec.reason}"))
            per = expect.nr_memmap_pages_delta(facts, len(dimm.block_ids))
            if per is None:
                v.eq("/proc/vmstat nr_memmap_pages after the add", "absent",
                     added.vmstat.get("nr_memmap_pages", "absent"),
                     f"nr_memmap_pages arrived in 6.11; this kernel is {facts.release}")
            else:
                v.eq(f"nr_memmap_pages delta at the add (feature {param})", per,
                     added.vmstat.get("nr_memmap_pages", 0) - base.vmstat.get("nr_memmap_pages", 0),
                     f"{expect.nr_memmap_pages_delta.__doc__.strip().splitlines()[0]}: section_nr_vmemmap_pages() "
                     f"ignores the altmap, so self-hosted or not counts the same")
            set_states(vm.guest, dimm.block_ids, "online_movable", v)
            v.raise_if_failed()
            mm.step("after online", snapshot(vm.guest), [dimm])
            if tuple(facts.version[:2]) < (6, 0):
                v.add(Verdict("kpageflags bit 37 of the node-1 DIMM", True, "not judged", "not judged",
                              f"bit 37 marks self-hosted vmemmap pages only since 6.0; this kernel is {facts.release}"))
            else:
                for b in dimm.block_ids:
                    first = b * facts.block_pages
                    want = list(expect.vmemmap_pfns(facts, dec, b))
                    seen = owner_private_pfns(vm.guest, range(first, first + expect.vmemmap_pages_per_block(facts) + 8))
                    v.eq(f"memory{b} (node 1): pfns with kpageflags bit 37", pfn_span(want), pfn_span(seen),
                         f"with the feature the memmap lives in the block's first pages, on node 1; without it, in "
                         f"node 0 and no page of the DIMM is a vmemmap page; {dec.reason}")
            v.raise_if_failed()
            free_before_removal = node_free_kb(vm, 0)
        free_after = node_free_kb(vm, 0)
        measure("node0_free_gain_at_removal_kb", free_after - free_before_removal)
        net = free_after - free0
        nlo, nhi = expect.cycle_free_return_bounds_kb()
        measure("node0_free_after_removal_vs_before_add_kb", {"observed": net, "band": [nlo, nhi]})
        v.add(Verdict("node 0 free memory after removing the node-1 DIMM, against before its add (kB)",
                      nlo <= net <= nhi, f"[{nlo}, {nhi}]", net,
                      f"the removal frees what the add and the online took from node 0 "
                      f"(depopulate_section_memmap() -> vmemmap_free() for a memmap from boot RAM, nothing for a "
                      f"self-hosted one; node 1's kswapd/kcompactd and pagesets at its last offline): "
                      f"{expect.cycle_free_return_bounds_kb.__doc__.strip().splitlines()[0]}; {dec.reason}"))
        gone = snapshot(vm.guest)
        mm.step("after removal", gone)
        if "nr_memmap_pages" in base.vmstat:
            v.eq("nr_memmap_pages after the removal", base.vmstat["nr_memmap_pages"],
                 gone.vmstat.get("nr_memmap_pages"), "depopulate_section_memmap() subtracts what was added")
        v.raise_if_failed()
