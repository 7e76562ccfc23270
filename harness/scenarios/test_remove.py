"""Removal: what device_del does to a DIMM in each state the guest can hold it in.

* offline blocks, and blocks online in Movable: the guest offlines and ejects them. Events in
  order: ACPI_DEVICE_OST 132 (eject in progress), DEVICE_DELETED, ACPI_DEVICE_OST 0 (the last
  one names only the slot). Every counter returns to its baseline and object-del succeeds,
  where it failed with QEMU's "is in use" before. These use `shared_vm`: they leave no trace.
* online in Normal with unmovable pages: OST 132 then 130 (busy), no DEVICE_DELETED, the DIMM
  stays and dmesg says "Offline failed.". This one boots its own guest (`boot()`), because the
  guest keeps the DIMM and its unmovable pages for good.
* eject disabled (/sys/firmware/acpi/hotplug/memory/enabled = 0): OST 128 only, the DIMM
  stays. Uses `shared_vm`: it turns eject back on in a finally and removes the DIMM properly,
  and that removal is checked too (hot_added removes it if a check failed first), so it
  leaves no trace.

The offline and Movable removals record a memory map per step for the HTML report
(_common.memory_map).

Every expected number comes from harness.memory.expect on facts read off the guest; the event order
and OST codes are QEMU's ACPI hotplug protocol (hw/acpi/memory_hotplug.c, ACPI _OST).
"""
from __future__ import annotations

import time

from harness.memory import expect
from harness.memory.blocks import wait_blocks
from harness.memory.checks import Verdicts
from harness.memory.dimm import OST_BUSY, OST_FAILURE, OST_IN_PROGRESS, OST_SUCCESS, memory_devices, remove_dimm
from harness.errors import Hang, QMPCommandError
from harness.memory.observe import snapshot
from harness.scenarios._common import (check_zone_deltas, facts_as_booted, facts_of, hot_added, memory_map,
                                       memtotal, record_self_hosted, self_hosted_pages, set_states)

EJECTED = (f"ACPI_DEVICE_OST:{OST_IN_PROGRESS}", "DEVICE_DELETED", f"ACPI_DEVICE_OST:{OST_SUCCESS}")
EJECT_RULE = ("a DIMM whose blocks the guest can offline is ejected: OST 132 (in progress), DEVICE_DELETED, "
              "then OST 0 naming the slot")
EJECT_ENABLED = "/sys/firmware/acpi/hotplug/memory/enabled"


def backend_objects(qmp) -> list:
    """ids of the memory backends under /objects (the boot RAM's pc.ram included)."""
    return sorted(o["name"] for o in qmp.execute("qom-list", {"path": "/objects"})
                  if str(o.get("type", "")).startswith("child<memory-backend"))


def object_del_refusal(qmp, memdev: str):
    """object-del on a backend still used by a DIMM; QEMU's refusal, or None if it went through."""
    try:
        qmp.execute("object-del", {"id": memdev})
    except QMPCommandError as e:
        return e
    return None


def check_in_use(v: Verdicts, qmp, memdev: str) -> None:
    err = object_del_refusal(qmp, memdev)
    v.eq(f"object-del {memdev} while plugged", "refused: ... is in use",
         "accepted" if err is None else ("refused: ... is in use" if "is in use" in err.desc else f"refused: {err.desc}"),
         "QEMU refuses to delete a backend a DIMM still uses (\"... is in use, can not be deleted\")")


def check_back_to_baseline(v: Verdicts, facts, base, gone, node: int = 0) -> None:
    v.eq("memory blocks after remove", sorted(base.blocks), sorted(gone.blocks),
         "the DIMM's blocks leave sysfs and no other block appears")
    v.eq("MemTotal after remove (kB)", memtotal(base), memtotal(gone), "removal returns MemTotal to its baseline")
    for zone in ("Movable", "Normal"):
        for f in ("spanned", "present", "managed"):
            v.eq(f"{zone} {f} after remove", getattr(base.zone(node, zone), f), getattr(gone.zone(node, zone), f),
                 "offline+remove reverses every online/add delta; the zone shrinks back")
    if expect.nr_memmap_pages_delta(facts, 1) is not None:   # 6.11+: the kernel must print it, before and after
        v.eq("nr_memmap_pages after remove (6.11+)", base.vmstat.get("nr_memmap_pages", "absent"),
             gone.vmstat.get("nr_memmap_pages", "absent"),
             "section_deactivate() subtracts what section_activate() added")
        v.eq("nr_memmap_pages in /proc/vmstat (6.11+)", True, "nr_memmap_pages" in base.vmstat,
             f"nr_memmap_pages arrived in 6.11; this kernel is {facts.release}")


def remove_and_check(vm, v: Verdicts, dimm, base, measure, label: str) -> None:
    """device_del a DIMM the guest can eject; check the events, sysfs, counters and QEMU objects."""
    t0 = time.monotonic()
    res = remove_dimm(vm.qmp, dimm)
    measure(f"{label}_remove_s", round(time.monotonic() - t0, 2))
    measure(f"{label}_events", list(res.event_names))
    v.eq("remove events in order", list(EJECTED), list(res.event_names), EJECT_RULE)
    v.raise_if_failed()
    wait_blocks(vm.guest, dimm.block_ids, present=False)
    gone = snapshot(vm.guest)
    check_back_to_baseline(v, facts_of(vm), base, gone, dimm.node or 0)
    v.eq("query-memory-devices after remove", [], [d for d in memory_devices(vm.qmp) if d.get("id") == dimm.id],
         "QEMU forgets an ejected DIMM")
    v.eq(f"{dimm.memdev} in /objects", False, dimm.memdev in backend_objects(vm.qmp), "object-del removed the backend")


def test_remove_offline_dimm(shared_vm, measure):
    vm = shared_vm
    facts = facts_as_booted(vm)
    v = Verdicts()
    base = snapshot(vm.guest)
    with memory_map(vm, measure, expect.decide(facts, facts.block_size), removal=True) as mm, \
            hot_added(vm, facts.block_size) as dimm:
        mm.step("before add", base)
        added = snapshot(vm.guest)
        mm.step("after add", added, [dimm])
        for b in dimm.block_ids:
            v.eq(f"memory{b}/state before remove", "offline", added.block(b).state if added.block(b) else None,
                 "memhp_default_state=offline leaves new blocks offline")
        check_in_use(v, vm.qmp, dimm.memdev)
        v.raise_if_failed()
        remove_and_check(vm, v, dimm, base, measure, "offline")
        v.raise_if_failed()


def test_remove_online_movable_dimm(shared_vm, measure):
    vm = shared_vm
    facts = facts_as_booted(vm)
    size = 2 * facts.block_size          # two blocks: on 6.8+ the per-block altmap split is removed too
    decision = expect.decide(facts, size)
    measure("decision", decision.reason)
    v = Verdicts()
    base = snapshot(vm.guest)
    with memory_map(vm, measure, decision, removal=True) as mm, hot_added(vm, size) as dimm:
        mm.step("before add", base)
        set_states(vm.guest, dimm.block_ids, "online_movable")
        onl = snapshot(vm.guest)
        mm.step("after online", onl, [dimm])
        node = dimm.node or 0
        check_zone_deltas(v, base, onl, node, "Movable", expect.online_deltas(facts, decision, len(dimm.block_ids)),
                          "while online", f"{expect.online_deltas.__doc__.strip().splitlines()[0]}; {decision.reason}")
        record_self_hosted(measure, facts, self_hosted_pages(base, onl, node, "Movable"))
        for b in dimm.block_ids:
            blk = onl.block(b)
            v.eq(f"memory{b}/state before remove", "online", blk.state if blk else None, "online_movable was written")
            v.eq(f"memory{b}/valid_zones before remove", ("Movable",), tuple(blk.valid_zones) if blk else (),
                 "an online block reports only its zone")
        check_in_use(v, vm.qmp, dimm.memdev)
        v.raise_if_failed()
        remove_and_check(vm, v, dimm, base, measure, "movable")
        v.raise_if_failed()


# Many small directories on tmpfs: their dentries and inodes are slab, i.e. unmovable kernel
# memory. The boot RAM (1 GiB) lies wholly below 4 GiB, in DMA32, so the hot-added block onlined
# with online_kernel is the guest's only ZONE_NORMAL and GFP_KERNEL allocations try it first.
UNMOVABLE_FILL = ("mkdir -p /tmp/memhp-unmovable && cd /tmp/memhp-unmovable && i=0; "
                  "while [ $i -lt {n} ]; do mkdir d$i; i=$((i+1)); done")


def test_remove_online_normal_busy(boot, measure):
    vm = boot()
    facts = facts_as_booted(vm)
    v = Verdicts()
    base = snapshot(vm.guest)
    with hot_added(vm, facts.block_size, remove=False) as dimm:
        _normal_busy(vm, v, dimm, base, measure)


def _normal_busy(vm, v: Verdicts, dimm, base, measure) -> None:
    set_states(vm.guest, dimm.block_ids, "online_kernel")
    vm.run(UNMOVABLE_FILL.format(n=3000), timeout=300, check=True)
    filled = snapshot(vm.guest)
    node = dimm.node or 0
    measure("normal_pages_in_use_before_remove", filled.zone(node, "Normal").managed - filled.zone(node, "Normal").free)

    t0 = time.monotonic()
    res = remove_dimm(vm.qmp, dimm, timeout=120)
    measure("refusal_s", round(time.monotonic() - t0, 2))
    measure("events", list(res.event_names))
    busy = (f"ACPI_DEVICE_OST:{OST_IN_PROGRESS}", f"ACPI_DEVICE_OST:{OST_BUSY}")
    v.eq("refused_status", OST_BUSY, res.refused_status,
         "the guest cannot offline a Normal block holding unmovable pages: OST 130 (0x82, busy)")
    v.eq("remove events in order", list(busy), list(res.event_names),
         "OST 132 (eject in progress), then OST 130 (busy); QEMU 7.2 sends nothing else")
    v.raise_if_failed()
    # Absence of DEVICE_DELETED, on a deadline: it must not come late either.
    late = None
    try:
        late = vm.qmp.wait_event("DEVICE_DELETED", {"data": {"device": dimm.id}}, timeout=5)
    except Hang:
        pass
    v.eq("DEVICE_DELETED within 5 s after the refusal", None, late, "the refusal is final")

    v.eq("DIMM in query-memory-devices", [dimm.id],
         [d.get("id") for d in memory_devices(vm.qmp) if d.get("id") == dimm.id], "the DIMM stays plugged")
    alive = vm.run("true", timeout=60)
    v.eq("guest runs a command after the refusal", 0, alive.status, "a refused eject leaves the guest healthy")
    after = snapshot(vm.guest)
    for b in dimm.block_ids:
        blk = after.block(b)
        v.eq(f"memory{b} still in sysfs", True, blk is not None, "the block was not removed")
        v.eq(f"memory{b}/state", "online", blk.state if blk else None, "the failed offline rolled back to online")
    v.eq("MemTotal (kB)", memtotal(filled), memtotal(after), "the block is still online and counted")
    dmesg = vm.guest.dmesg()
    offline_failed = [ln.strip() for ln in dmesg.splitlines() if "Offline failed" in ln]
    measure("dmesg_offline_failed", offline_failed[:2])
    v.eq("dmesg 'Offline failed.'", True, bool(offline_failed),
         "drivers/acpi/scan.c acpi_scan_try_to_offline(): dev_warn(\"Offline failed.\")")
    v.eq("dmesg names the block", True, any(f"memory{dimm.block_ids[0]}" in ln for ln in offline_failed),
         "the warning is printed for the memory block device that would not go offline")
    check_in_use(v, vm.qmp, dimm.memdev)
    v.raise_if_failed()
    measure("base_memtotal_kb", memtotal(base))


def test_remove_eject_disabled(shared_vm, measure):
    vm = shared_vm
    facts = facts_as_booted(vm)
    v = Verdicts()
    base = snapshot(vm.guest)
    with hot_added(vm, facts.block_size) as dimm:
        try:
            vm.guest.write(EJECT_ENABLED, "0").check()
            v.eq(f"{EJECT_ENABLED} readback", "0", vm.guest.read(EJECT_ENABLED).strip(), "the knob is writable by root")
            mark_lines = len(vm.guest.dmesg().splitlines())
            res = remove_dimm(vm.qmp, dimm, timeout=60)
            measure("events", list(res.event_names))
            v.eq("refused_status", OST_FAILURE, res.refused_status,
                 "with eject disabled the guest answers the eject request with OST 128 (0x80) at once")
            v.eq("remove events", [f"ACPI_DEVICE_OST:{OST_FAILURE}"], list(res.event_names),
                 "no 132 first: the guest never starts the eject")
            v.eq("DIMM in query-memory-devices", [dimm.id],
                 [d.get("id") for d in memory_devices(vm.qmp) if d.get("id") == dimm.id], "the DIMM stays plugged")
            still = snapshot(vm.guest)
            for b in dimm.block_ids:
                v.eq(f"memory{b} still in sysfs", True, still.block(b) is not None, "the block was not removed")
            new = vm.guest.dmesg().splitlines()[mark_lines:]
            v.eq("dmesg 'Eject disabled'", True, any("Eject disabled" in ln for ln in new),
                 "drivers/acpi/scan.c acpi_generic_hotplug_event(): \"Eject disabled\"")
            v.raise_if_failed()
        finally:
            vm.guest.write(EJECT_ENABLED, "1")
        # Eject on again: the DIMM must be ejectable as usual (hot_added's exit then has nothing to do).
        remove_and_check(vm, v, dimm, base, measure, "reenabled")
        v.raise_if_failed()
