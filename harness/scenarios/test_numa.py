"""NUMA: a DIMM hot-added to a memory-less node 1 brings the node online with the right MemTotal.

Guests: boot() per memmap_on_memory value, with numa_nodes=2 (node 0 holds the boot RAM,
node 1 starts without memory or CPUs). NUMA layout and the parameter are boot-time state;
the DIMM is removed at the end, but node 1 may stay online, so no guest is shared.

Rules: node 1 is possible but not online at boot; after `device_add pc-dimm node=1` it is
online, /sys/devices/system/node/node1 exists and memoryN/node1 links the block to it; after
online_movable it has memory and its MemTotal (node1/meminfo) is expect.online_deltas'
MemTotal: (block_pages - vmemmap pages) * 4 kB per block with the feature, block_pages * 4
without; its Movable zone rises by the same deltas. The memory map per step goes to the HTML report
(_common.memory_map).
"""
from __future__ import annotations

import pytest

from harness.memory import expect
from harness.memory.checks import Verdicts, need
from harness.memory.observe import snapshot
from harness.scenarios._common import (check_zone_deltas, facts_as_booted, hot_added, memory_map, memtotal,
                                       node_list, node_meminfo, record_self_hosted, require_feature,
                                       self_hosted_pages, set_states)

PARAM = {"on": "1", "off": "0"}
NODE = "/sys/devices/system/node"


def _nodes(g):
    out = g.run(f"cat {NODE}/possible {NODE}/online {NODE}/has_memory; "
                f"[ -d {NODE}/node1 ] && echo yes || echo no", timeout=30, check=True).stdout.split("\n")
    possible, online, has_memory, node1_dir = (out + ["", "", "", ""])[:4]
    return node_list(possible), node_list(online), node_list(has_memory), node1_dir.strip() == "yes"


@pytest.mark.parametrize("param", ["on", "off"])
def test_dimm_on_memoryless_node(boot, measure, param):
    vm = boot(numa_nodes=2, memmap_on_memory=PARAM[param])
    facts = facts_as_booted(vm)
    if param == "on":
        require_feature(facts, measure)
    g = vm.guest
    size = facts.block_size
    dec = expect.decide(facts, size)
    v = Verdicts()
    possible, online, has_memory, _ = _nodes(g)
    v.eq("node 1 possible at boot", True, 1 in possible, "QEMU's SRAT names node 1 (-numa node,nodeid=1)")
    v.eq("node 1 online at boot", False, 1 in online, "node 1 has neither memory nor CPUs at boot")
    v.raise_if_failed()
    base = snapshot(g)
    with memory_map(vm, measure, dec, removal=True) as mm, hot_added(vm, size, node=1) as dimm:
        mm.step("before add", base)
        ids = list(dimm.block_ids)
        added = snapshot(g)
        mm.step("after add", added, [dimm])
        _, online, _, node1_dir = _nodes(g)
        v.eq("node 1 online after the add", True, 1 in online, "adding memory to an offline node brings it online")
        v.eq(f"{NODE}/node1 exists after the add", True, node1_dir, "an online node is registered in sysfs")
        for b in ids:
            blk = added.block(b)
            v.eq(f"memory{b}/node* link", 1, blk.node if blk else None, "each block links to the node of its DIMM")
        v.raise_if_failed()
        node0_before = need(node_meminfo(g, 0), "MemTotal", "/sys/devices/system/node/node0/meminfo")
        set_states(g, ids, "online_movable", v)
        v.raise_if_failed()
        onl = snapshot(g)
        mm.step("after online", onl, [dimm])
        _, _, has_memory, _ = _nodes(g)
        want = expect.online_deltas(facts, dec, len(ids))
        rule = f"{expect.online_deltas.__doc__.strip().splitlines()[0]}; decision: {dec.reason}"
        v.eq("node 1 has memory after online_movable", True, 1 in has_memory, "node 1 now has online memory")
        v.eq("node 1 MemTotal (kB, node1/meminfo)", want["MemTotal"],
             need(node_meminfo(g, 1), "MemTotal", "/sys/devices/system/node/node1/meminfo"),
             f"node 1 held no memory before, so its MemTotal is the online delta: {rule}")
        check_zone_deltas(v, added, onl, 1, "Movable", want, "on node 1", rule)
        record_self_hosted(measure, facts, self_hosted_pages(added, onl, 1, "Movable"))
        v.eq("node 0 MemTotal after online_movable (kB)", node0_before,
             need(node_meminfo(g, 0), "MemTotal", "/sys/devices/system/node/node0/meminfo"),
             "the DIMM's memory counts on node 1 only")
        v.eq("MemTotal delta (kB)", want["MemTotal"], memtotal(onl) - memtotal(added),
             "global MemTotal grows by node 1's")
        v.raise_if_failed()
