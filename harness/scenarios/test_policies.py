"""Online policies: memhp_default_state=offline|online|online_kernel|online_movable at boot.

Guests: boot() per policy. The policy is boot-time state, and a block auto-onlined to Normal
usually cannot be offlined again (the kernel puts unmovable pages in it at once), so those
guests keep their DIMM and die at the end of the test. The offline and online_movable
guests remove theirs (and that removal must succeed).

Rules: auto_online_blocks reads back the policy; a hot-added one-block DIMM lands as
expect.auto_online_zone says (offline: offline, valid_zones "Normal Movable"; online and
online_kernel: online in Normal; online_movable: online in Movable), and that zone's
spanned/present/managed and MemTotal rise by expect.online_deltas (managed without the
vmemmap pages, memory_hotplug.memmap_on_memory=1 here). The memory map per step goes to the
HTML report (_common.memory_map).
"""
from __future__ import annotations

import pytest

from harness.memory import expect
from harness.memory.blocks import block_states, wait_until
from harness.memory.checks import Verdicts
from harness.errors import CheckFailed
from harness.memory.observe import snapshot
from harness.scenarios._common import check_zone_deltas, facts_as_booted, hot_added, memory_map, memtotal


@pytest.mark.parametrize("policy", expect.AUTO_ONLINE_POLICIES)
def test_auto_online_policy(boot, measure, policy):
    vm = boot(default_state=policy, memmap_on_memory="1")
    facts = facts_as_booted(vm)
    g = vm.guest
    size = facts.block_size
    dec = expect.decide(facts, size)
    zone = expect.auto_online_zone(policy)
    zone_rule = expect.auto_online_zone.__doc__.strip().splitlines()[0]
    want_state = "offline" if zone is None else "online"
    v = Verdicts()
    base = snapshot(g)
    v.eq("auto_online_blocks", policy, base.auto_online_blocks,
         f"memhp_default_state={policy} sets the policy that auto_online_blocks reads back")
    v.raise_if_failed()
    with memory_map(vm, measure, dec, removal=True) as mm, hot_added(vm, size, remove=zone != "Normal") as dimm:
        mm.step("before add", base)
        ids = list(dimm.block_ids)
        try:   # auto-onlining follows the creation of the sysfs blocks
            wait_until(lambda: set(block_states(g, ids).values()) == {want_state},
                       f"blocks {ids} to become {want_state}", timeout=30, guest=g)
        except CheckFailed:
            pass   # the guest answers: judged below, block by block, with the rule
        s = snapshot(g)
        mm.step(f"after add ({policy})", s, [dimm])
        node = dimm.node or 0
        for b in ids:
            blk = s.block(b)
            v.eq(f"memory{b}/state under {policy}", want_state, blk.state if blk else None, zone_rule)
            v.eq(f"memory{b}/valid_zones under {policy}", (zone,) if zone else ("Normal", "Movable"),
                 tuple(blk.valid_zones) if blk else None, zone_rule)
        if zone is None:
            v.eq("MemTotal delta (kB)", 0, memtotal(s) - memtotal(base), "a block left offline adds nothing to MemTotal")
        else:
            want = expect.online_deltas(facts, dec, len(ids))
            check_zone_deltas(v, base, s, node, zone, want, f"under {policy}",
                              f"{expect.online_deltas.__doc__.strip().splitlines()[0]}; decision: {dec.reason}")
            v.eq(f"MemTotal delta under {policy} (kB)", want["MemTotal"], memtotal(s) - memtotal(base),
                 f"MemTotal grows by the managed pages in kB; decision: {dec.reason}")
        v.raise_if_failed()
