"""The first whole scenario: one block-sized DIMM through add, online_movable, offline, remove.

Runs with memory_hotplug.memmap_on_memory=1 and memhp_default_state=offline (the shared_vm
defaults); the parameter must read back as booted (facts_as_booted), and on a kernel where
the feature can never apply the scenario is a SKIP naming why. Every expected number comes
from harness.memory.expect, from facts read off the guest. Each step's memory map goes to
the results for the HTML report (_common.memory_map).
"""
from __future__ import annotations

from harness.memory import expect
from harness.memory.blocks import wait_blocks
from harness.memory.checks import Verdicts
from harness.memory.dimm import remove_dimm
from harness.memory.observe import snapshot
from harness.memory.parsers import find_splats
from harness.scenarios._common import (check_new_blocks, check_zone_deltas, facts_as_booted, hot_added, memory_map,
                                       memtotal, record_self_hosted, require_feature, self_hosted_pages, set_states)


def _online_movable(vm, v: Verdicts, facts, decision, dimm, base, measure, mm):
    set_states(vm.guest, dimm.block_ids, "online_movable", v)
    v.raise_if_failed()
    onl = snapshot(vm.guest)
    mm.step("after online", onl, [dimm])
    mm.seen(dimm)
    node = dimm.node or 0
    want = expect.online_deltas(facts, decision, len(dimm.block_ids))
    check_zone_deltas(v, base, onl, node, "Movable", want, "after online_movable",
                      f"online_movable: {expect.online_deltas.__doc__.strip().splitlines()[0]}; {decision.reason}")
    v.eq("MemTotal delta (kB)", want["MemTotal"], memtotal(onl) - memtotal(base),
         "MemTotal grows by the managed pages in kB")
    for b in dimm.block_ids:
        blk = onl.block(b)
        v.eq(f"memory{b}/valid_zones after online_movable", ("Movable",), tuple(blk.valid_zones) if blk else None,
             "an online block reports only its zone")
    record_self_hosted(measure, facts, self_hosted_pages(base, onl, node, "Movable"))
    v.raise_if_failed()


def _offline(vm, v: Verdicts, dimm, added, mm):
    set_states(vm.guest, dimm.block_ids, "offline", v)
    v.raise_if_failed()
    off = snapshot(vm.guest)
    mm.step("after offline", off, [dimm])
    node = dimm.node or 0
    check_zone_deltas(v, added, off, node, "Movable", {"spanned": 0, "present": 0, "managed": 0}, "after offline",
                      "offlining reverses every online delta exactly")
    v.eq("MemTotal after offline (kB)", memtotal(added), memtotal(off), "offlining reverses every online delta exactly")
    v.raise_if_failed()


def _remove(vm, v: Verdicts, dimm, base, mm):
    res = remove_dimm(vm.qmp, dimm)
    v.eq("remove events", ["ACPI_DEVICE_OST:132", "DEVICE_DELETED", "ACPI_DEVICE_OST:0"], list(res.event_names),
         "offline blocks are ejected: OST 132, DEVICE_DELETED, OST 0")
    v.raise_if_failed()
    wait_blocks(vm.guest, dimm.block_ids, present=False)
    gone = snapshot(vm.guest)
    mm.step("after removal", gone)
    v.eq("MemTotal after remove (kB)", memtotal(base), memtotal(gone), "removal returns MemTotal to its baseline")
    check_zone_deltas(v, base, gone, dimm.node or 0, "Movable", {"spanned": 0, "present": 0, "managed": 0},
                      "after remove", "removal returns the zone counters to baseline")
    splats = find_splats(vm.guest.dmesg())
    v.eq("dmesg splats", [], [s.kind for s in splats], "no WARNING/BUG/Oops/Bad page state/Altmap in dmesg")
    v.raise_if_failed()


def test_block_sized_dimm_lifecycle(shared_vm, measure):
    vm = shared_vm
    facts = facts_as_booted(vm)
    require_feature(facts, measure)
    decision = expect.decide(facts, facts.block_size)
    measure("decision", decision.reason)
    v = Verdicts()
    base = snapshot(vm.guest)
    with memory_map(vm, measure, decision) as mm, hot_added(vm, facts.block_size) as dimm:
        mm.step("before add", base)
        added = snapshot(vm.guest)
        mm.step("after add", added, [dimm])
        check_new_blocks(v, base, added, dimm.block_ids, dimm.id)
        v.raise_if_failed()
        _online_movable(vm, v, facts, decision, dimm, base, measure, mm)
        _offline(vm, v, dimm, added, mm)
        _remove(vm, v, dimm, base, mm)
