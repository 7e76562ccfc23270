"""The first whole scenario: one block-sized DIMM through add, online_movable, offline, remove.

Runs with memory_hotplug.memmap_on_memory=1 and memhp_default_state=offline (the vm fixture's
defaults). Every expected number comes from harness.expect, from facts read off the guest.
"""
from __future__ import annotations

from harness import expect
from harness.checks import Verdicts
from harness.hotplug import add_dimm, block_path, remove_dimm, set_block_state, wait_blocks
from harness.observe import gather_facts, snapshot
from harness.parsers import find_splats


def test_block_sized_dimm_lifecycle(shared_vm, measure):
    vm = shared_vm
    facts = gather_facts(vm.guest, vm.kernel)
    size = facts.block_size
    decision = expect.decide(facts, size)
    measure("facts", {"release": facts.release, "block_size": facts.block_size,
                      "struct_page": facts.struct_page_size, "struct_page_source": facts.struct_page_source,
                      "pageblock_order": facts.pageblock_order, "param": facts.param})
    measure("decision", decision.reason)
    v = Verdicts()
    base = snapshot(vm.guest)

    dimm = add_dimm(vm.qmp, size, facts.block_size)
    wait_blocks(vm.guest, dimm.block_ids)
    added = snapshot(vm.guest)
    v.eq("new memory blocks in sysfs", list(dimm.block_ids), sorted(set(added.blocks) - set(base.blocks)),
         "block N covers [N*block_size, (N+1)*block_size); ids from the DIMM's addr and size")
    for b in dimm.block_ids:
        blk = added.block(b)
        v.eq(f"memory{b} exists", True, blk is not None, "one memoryN per hot-added block")
        if blk is None:
            continue
        v.eq(f"memory{b}/phys_index", b, blk.phys_index, "phys_index is the block id (%08x)")
        v.eq(f"memory{b}/state", "offline", blk.state, "memhp_default_state=offline leaves new blocks offline")
        v.eq(f"memory{b}/online", False, blk.online, "online mirrors state")
        v.eq(f"memory{b}/valid_zones", ("Normal", "Movable"), tuple(blk.valid_zones),
             "an offline hot-added block may go to Normal or Movable")
    v.eq("MemTotal after add (kB)", base.meminfo["MemTotal"], added.meminfo["MemTotal"],
         "adding without onlining does not change MemTotal")
    v.raise_if_failed()

    for b in dimm.block_ids:
        set_block_state(vm.guest, b, "online_movable").check()
    onl = snapshot(vm.guest)
    want = expect.online_deltas(facts, decision, len(dimm.block_ids))
    node = dimm.node or 0
    for field in ("spanned", "present", "managed"):
        v.eq(f"Movable {field} delta", want[field],
             getattr(onl.zone(node, "Movable"), field) - getattr(base.zone(node, "Movable"), field),
             f"online_movable: {field} += {expect.online_deltas.__doc__.strip()}; {decision.reason}")
    v.eq("MemTotal delta (kB)", want["MemTotal"], onl.meminfo["MemTotal"] - base.meminfo["MemTotal"],
         "MemTotal grows by the managed pages in kB")
    for b in dimm.block_ids:
        v.eq(f"memory{b}/valid_zones after online_movable", ("Movable",), tuple(onl.block(b).valid_zones),
             "an online block reports only its zone")
    v.raise_if_failed()

    for b in dimm.block_ids:
        set_block_state(vm.guest, b, "offline").check()
    off = snapshot(vm.guest)
    for field in ("spanned", "present", "managed"):
        v.eq(f"Movable {field} after offline", getattr(added.zone(node, "Movable"), field),
             getattr(off.zone(node, "Movable"), field), "offlining reverses every online delta exactly")
    v.eq("MemTotal after offline (kB)", added.meminfo["MemTotal"], off.meminfo["MemTotal"],
         "offlining reverses every online delta exactly")
    v.raise_if_failed()

    res = remove_dimm(vm.qmp, dimm)
    v.eq("DEVICE_DELETED", True, res.deleted, "offline blocks are ejected: OST 132, DEVICE_DELETED, OST 0")
    v.raise_if_failed()
    wait_blocks(vm.guest, dimm.block_ids, present=False)
    gone = snapshot(vm.guest)
    v.eq("MemTotal after remove (kB)", base.meminfo["MemTotal"], gone.meminfo["MemTotal"],
         "removal returns MemTotal to its baseline")
    v.eq("Movable present after remove", base.zone(node, "Movable").present, gone.zone(node, "Movable").present,
         "removal returns the zone counters to baseline")
    splats = find_splats(vm.guest.dmesg())
    v.eq("dmesg splats", [], [s.kind for s in splats], "no WARNING/BUG/Oops/Bad page state/Altmap in dmesg")
    v.raise_if_failed()
