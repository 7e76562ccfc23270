"""Online and offline a hot-added block: zone and MemTotal deltas, kpageflags, invalid transitions.

Guests: shared. Two shared guests, memory_hotplug.memmap_on_memory=1 ("on") and =0 ("off"),
both memhp_default_state=offline, since the parameter is boot-time state. The Movable tests
and the invalid-transition test offline what they onlined and remove their DIMM, also on
failure (_common.hot_added): no trace. The "on" cases SKIP, naming why, where the feature
can never apply; kpageflags bit 37 is judged from 6.0 on. A block onlined to Normal cannot be taken back:
the kernel puts unmovable pages in it at once, and offline then says EBUSY (seen on 6.1 and
6.12 within a second). So online_kernel runs last on each guest and keeps its DIMM, which
sets vm.dirty: shared_guest never hands it out again.

Per case (one-block DIMM; echo online_movable or online_kernel):
- the zone's spanned, present and managed and MemTotal rise by expect.online_deltas (managed
  without the vmemmap pages when the feature applies), valid_zones then names only that zone;
- with the feature, exactly the block's first vmemmap pages carry kpageflags bit 37
  (expect.vmemmap_pfns); without it, no page of the block does;
- Movable: offlining reverses every delta exactly and valid_zones reads "Normal Movable" again.
Each online/offline case records its memory map per step for the HTML report (_common.memory_map).
Invalid transitions are refused with EINVAL and change nothing: offline to an offline block,
online and online_kernel to an online Movable block (invalid_transitions), online and
online_movable to an online Normal block (in the online_kernel cases).
"""
from __future__ import annotations

import pytest

from harness.memory import expect
from harness.memory.blocks import set_block_state
from harness.memory.checks import Verdict, Verdicts
from harness.memory.observe import snapshot
from harness.scenarios._common import (check_owner_private, check_zone_deltas, facts_as_booted, hot_added, memory_map,
                                       memtotal, record_self_hosted, require_feature, self_hosted_pages, set_states)

PARAM = {"on": "1", "off": "0"}
ZONE = {"online_movable": "Movable", "online_kernel": "Normal"}
# (param, state written): grouped by param and online_kernel last, so each shared guest
# boots once; the invalid-transition test runs first, on the "on" guest.
CASES = [("on", "online_movable"), ("on", "online_kernel"), ("off", "online_movable"), ("off", "online_kernel")]
EINVAL_RULE = ("drivers/base/memory.c state_store(): device_online()/device_offline() return 1 for a block "
               "already in that state, which state_store turns into -EINVAL")
_RULE_DELTAS = expect.online_deltas.__doc__.strip().splitlines()[0]


def _refused_einval(v: Verdicts, what: str, res, rule: str) -> None:
    text = " ".join(((res.stderr or "") + " " + (res.stdout or "")).split())
    observed = f"accepted (status 0) {text}".strip() if res.ok else f"refused (status {res.status}): {text}"
    v.add(Verdict(what, (not res.ok) and "Invalid argument" in text,
                  "refused with EINVAL (Invalid argument)", observed, rule))


def _refused_keeps(v: Verdicts, g, b: int, write: str, state: str, zones: tuple) -> None:
    """echo write > memoryN/state must fail with EINVAL and leave state, valid_zones and MemTotal as they were."""
    before = snapshot(g)
    _refused_einval(v, f"echo {write} > memory{b}/state (block {state}"
                       f"{' in ' + zones[0] if state == 'online' else ''})",
                    set_block_state(g, b, write), EINVAL_RULE)
    after = snapshot(g)
    blk = after.block(b)
    v.eq(f"memory{b}/state after the refused {write}", state, blk.state if blk else None,
         "a refused write changes nothing")
    v.eq(f"memory{b}/valid_zones after the refused {write}", zones, tuple(blk.valid_zones) if blk else None,
         "a refused write changes nothing")
    v.eq(f"MemTotal after the refused {write} (kB)", memtotal(before), memtotal(after),
         "a refused write changes nothing")


def test_invalid_transitions(shared_guest):
    vm = shared_guest(memmap_on_memory=PARAM["on"])
    facts = facts_as_booted(vm)
    g = vm.guest
    v = Verdicts()
    with hot_added(vm, facts.block_size) as dimm:
        b = dimm.block_ids[0]
        _refused_keeps(v, g, b, "offline", "offline", ("Normal", "Movable"))
        set_states(g, [b], "online_movable", v)
        v.raise_if_failed()
        for write in ("online", "online_kernel"):
            _refused_keeps(v, g, b, write, "online", ("Movable",))
        v.raise_if_failed()


@pytest.mark.parametrize("param,state", CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_online_offline(shared_guest, measure, param, state):
    vm = shared_guest(memmap_on_memory=PARAM[param])
    facts = facts_as_booted(vm)
    if param == "on":
        require_feature(facts, measure)
    g = vm.guest
    size = facts.block_size
    dec = expect.decide(facts, size)
    zone = ZONE[state]
    v = Verdicts()
    base = snapshot(g)
    with memory_map(vm, measure, dec, removal=True) as mm, \
            hot_added(vm, size, remove=(state != "online_kernel")) as dimm:
        mm.step("before add", base)
        ids = list(dimm.block_ids)
        node = dimm.node or 0
        added = snapshot(g)
        mm.step("after add", added, [dimm])
        set_states(g, ids, state, v)
        v.raise_if_failed()
        onl = snapshot(g)
        mm.step(f"after {state}", onl, [dimm])
        want = expect.online_deltas(facts, dec, len(ids))
        check_zone_deltas(v, added, onl, node, zone, want, f"after {state}", f"{_RULE_DELTAS}; decision: {dec.reason}")
        v.eq(f"MemTotal delta after {state} (kB)", want["MemTotal"], memtotal(onl) - memtotal(added),
             f"MemTotal grows by the managed pages in kB; decision: {dec.reason}")
        record_self_hosted(measure, facts, self_hosted_pages(added, onl, node, zone))
        for b in ids:
            blk = onl.block(b)
            v.eq(f"memory{b}/state after {state}", "online", blk.state if blk else None, "the write succeeded")
            v.eq(f"memory{b}/valid_zones after {state}", (zone,), tuple(blk.valid_zones) if blk else None,
                 "an online block reports only its zone")
            check_owner_private(v, g, facts, dec, b, facts.block_pages)
        v.raise_if_failed()
        if state == "online_kernel":
            for write in ("online", "online_movable"):
                _refused_keeps(v, g, ids[0], write, "online", ("Normal",))
            v.raise_if_failed()
            return

        set_states(g, ids, "offline", v)
        v.raise_if_failed()
        off = snapshot(g)
        mm.step("after offline", off, [dimm])
        check_zone_deltas(v, added, off, node, zone, {"spanned": 0, "present": 0, "managed": 0}, "after offline",
                          f"{expect.offline_deltas.__doc__.strip().splitlines()[0]} (back to the value before {state})")
        v.eq("MemTotal after offline (kB)", memtotal(added), memtotal(off),
             "offlining reverses every online delta exactly")
        for b in ids:
            blk = off.block(b)
            v.eq(f"memory{b}/state after offline", "offline", blk.state if blk else None, "the write succeeded")
            v.eq(f"memory{b}/valid_zones after offline", ("Normal", "Movable"),
                 tuple(blk.valid_zones) if blk else None, "an offline block may again go to Normal or Movable")
        v.raise_if_failed()

