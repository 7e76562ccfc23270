"""Hot-add a one-block DIMM and a 1 GiB DIMM with memmap_on_memory on and off; nr_memmap_pages.

Guests: shared (no trace). The parameter is boot-time state, so there are two shared guests,
memory_hotplug.memmap_on_memory=1 ("on") and =0 ("off"), both memhp_default_state=offline;
the tests are ordered so each boots once. Every test removes its DIMM, also on failure
(_common.hot_added), and a guest whose cleanup failed is shut down, not reused.

What is judged, each number from harness.memory.expect on facts read off the guest:
- sysfs after the add: one memoryN per block, phys_index, state offline, valid_zones; MemTotal
  unchanged.
- the memory the add takes from existing RAM: MemFree plus the per-cpu free lists
  (_common.free_kb) drops by the memmap size when the memmap is not self-hosted and stays flat
  when it is (expect.add_time_free_drop_bounds_kb). Plain MemFree is recorded too; it is not
  judged, because a 2 MiB memmap can come from or go to a per-cpu list and hide from it.
- after online_movable: the vmemmap pages the DIMM hosts itself, measured as the Movable
  zone's present minus managed delta, equal decide()'s blocks * vmemmap pages (0 when the
  feature does not apply: 1 GiB on 6.1 because of the one-block rule, everything when off);
  the first pages of each block carry kpageflags bit 37 exactly when it applies.
- /proc/vmstat nr_memmap_pages (6.11+): rises per hot-added block and returns to its
  baseline after the removal; before 6.11 the field must be absent.
Each add records a memmap_cost row for the report, the number of blocks seen hosting
their memmap (self_hosted_blocks), and the memory map of every step (before the add, after
the add, after online_movable, after offlining the blocks, after the removal) for the HTML
report (_common.memory_map). The "on" cases SKIP, naming why, on a kernel where the
feature can never apply; the bit-37 check is not judged before 6.0.
"""
from __future__ import annotations

import pytest

from harness.memory import expect
from harness.memory.checks import Verdicts, check_between
from harness.memory.observe import snapshot
from harness.scenarios._common import (check_new_blocks, check_owner_private, facts_as_booted, free_kb, hot_added,
                                       memory_map, memtotal, record_self_hosted, require_feature, self_hosted_pages,
                                       set_states)

PARAM = {"on": "1", "off": "0"}
# (param, DIMM): grouped by param, so each shared guest boots once.
CASES = [("on", "1block"), ("on", "1GiB"), ("off", "1block"), ("off", "1GiB")]


def _size(facts: expect.KernelFacts, what: str) -> int:
    return facts.block_size if what == "1block" else expect.GiB


def test_nr_memmap_pages(shared_guest):
    """nr_memmap_pages rises by the memmap of every hot-added block and falls back on removal (6.11+); absent before."""
    vm = shared_guest(memmap_on_memory=PARAM["on"])
    facts = facts_as_booted(vm)
    size = 2 * facts.block_size
    per = expect.nr_memmap_pages_delta(facts, 2)
    v = Verdicts()
    base = snapshot(vm.guest)
    with hot_added(vm, size) as dimm:
        added = snapshot(vm.guest)
    gone = snapshot(vm.guest)
    if per is None:
        for when, s in (("at boot", base), ("after the add", added), ("after the removal", gone)):
            v.eq(f"/proc/vmstat nr_memmap_pages {when}", "absent",
                 s.vmstat.get("nr_memmap_pages", "absent"),
                 f"nr_memmap_pages arrived in 6.11; this kernel is {facts.release}")
    else:
        rule = expect.nr_memmap_pages_delta.__doc__.strip().splitlines()[0]
        counts = [s.vmstat.get("nr_memmap_pages") for s in (base, added, gone)]
        v.eq("/proc/vmstat has nr_memmap_pages (6.11+)", [True] * 3, [c is not None for c in counts],
             f"nr_memmap_pages arrived in 6.11; this kernel is {facts.release}")
        v.raise_if_failed()
        v.eq(f"nr_memmap_pages delta after adding {dimm.id} ({len(dimm.block_ids)} blocks)", per,
             counts[1] - counts[0], rule)
        v.eq("nr_memmap_pages after the removal", counts[0], counts[2],
             "section_deactivate() subtracts what section_activate() added")
    v.raise_if_failed()


def _check_add_cost(v: Verdicts, facts, dec, size: int, base, added) -> dict:
    """MemFree + per-cpu lists drop at the add against expect.add_time_free_drop_bounds_kb."""
    cost = expect.add_time_memfree_cost_kb(facts, dec, size)
    lo, hi = expect.add_time_free_drop_bounds_kb(facts, dec, size)
    drop = free_kb(base) - free_kb(added)
    v.add(check_between("MemFree + per-cpu lists drop at the add (kB)", lo, hi, drop,
                        f"the memmap costs {cost} kB of existing RAM: "
                        f"{expect.add_time_memfree_cost_kb.__doc__.strip().splitlines()[0]}; "
                        f"{expect.add_time_free_drop_bounds_kb.__doc__.strip().splitlines()[0]}; "
                        f"decision: {dec.reason}"))
    return {"memfree_drop_kb": drop, "expected_kb": cost,
            "memfree_raw_drop_kb": base.meminfo["MemFree"] - added.meminfo["MemFree"]}


def _check_online_movable(v: Verdicts, vm, facts, dec, dimm, added, mm) -> int:
    """online_movable every block; the self-hosted vmemmap pages (present - managed delta) and bit 37."""
    ids = list(dimm.block_ids)
    set_states(vm.guest, ids, "online_movable", v)
    v.raise_if_failed()
    onl = snapshot(vm.guest)
    mm.step("after online", onl, [dimm])
    mm.seen(dimm)
    node = dimm.node or 0
    hosted = self_hosted_pages(added, onl, node, "Movable")
    want_hosted = dec.vmemmap_pages_per_block * dec.blocks if dec.applies else 0
    v.eq(f"self-hosted vmemmap pages after online_movable of {len(ids)} blocks (Movable present - managed delta)",
         want_hosted, hosted,
         f"each block with the feature keeps its vmemmap pages out of managed; decision: {dec.reason}")
    dp = (onl.zone(node, "Movable").present or 0) - (added.zone(node, "Movable").present or 0)
    v.eq("Movable present delta", len(ids) * facts.block_pages, dp, "present rises by block_pages per onlined block")
    n_check = expect.vmemmap_pages_per_block(facts) + 8
    for b in ids:
        check_owner_private(v, vm.guest, facts, dec, b, n_check)
    return hosted


@pytest.mark.parametrize("param,what", CASES, ids=[f"{p}-{w}" for p, w in CASES])
def test_hot_add(shared_guest, measure, param, what):
    vm = shared_guest(memmap_on_memory=PARAM[param])
    facts = facts_as_booted(vm)
    if param == "on":
        require_feature(facts, measure)
    size = _size(facts, what)
    dec = expect.decide(facts, size)
    measure("decision", dec.reason)
    v = Verdicts()
    with memory_map(vm, measure, dec) as mm:
        base = snapshot(vm.guest)
        mm.step("before add", base)
        with hot_added(vm, size) as dimm:
            added = snapshot(vm.guest)
            mm.step("after add", added, [dimm])
            check_new_blocks(v, base, added, dimm.block_ids, f"{dimm.id} at {dimm.addr:#x}")
            v.eq("blocks per DIMM", size // facts.block_size, len(dimm.block_ids),
                 f"a {size >> 20} MiB DIMM spans size / block_size ({facts.block_size >> 20} MiB) blocks")
            cost = _check_add_cost(v, facts, dec, size, base, added)
            v.raise_if_failed()
            hosted = _check_online_movable(v, vm, facts, dec, dimm, added, mm)
            record_self_hosted(measure, facts, hosted)
            measure("memmap_cost", {"dimm_mib": size >> 20, "param": param, **cost, "self_hosted_pages": hosted,
                                    "applies": dec.applies, "reason": dec.reason, "kernel": facts.release})
            # Offlined here (hot_added's cleanup would do it anyway) so the map shows the state.
            set_states(vm.guest, dimm.block_ids, "offline", v)
            mm.step("after offline", snapshot(vm.guest), [dimm])
        gone = snapshot(vm.guest)
        mm.step("after removal", gone)
    v.eq("MemTotal after the removal (kB)", memtotal(base), memtotal(gone), "removal returns MemTotal to its baseline")
    v.eq("Movable present after the removal", base.zone(0, "Movable").present, gone.zone(0, "Movable").present,
         "removal returns the zone counters to their baseline")
    v.raise_if_failed()
