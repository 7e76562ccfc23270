"""Requests that are refused: by QEMU before the guest sees anything, and by the guest kernel
after QEMU accepted them.

QEMU-side refusals must surface QEMU's own words (QMPCommandError.desc, quoted from QEMU 7.2:
hw/mem/memory-device.c, hw/mem/pc-dimm.c, backends/hostmem.c, hw/core/qdev.c, qdev-monitor.c),
leave the guest untouched (a command still runs, MemTotal unchanged) and leave no backend
object behind (harness.memory.dimm.add_dimm deletes the backend it created when device_add fails;
checked with qom-list /objects).

The guest-side refusal is a 64 MiB DIMM: QEMU places it (2 MiB granularity) and reports the
insert OST as status 0, but the kernel rejects any range that is not a multiple of the
memory block ("Block size [0x8000000] unaligned hotplug range", "add_memory failed").
harness.memory.blocks.confirm_add must turn that into GuestRefused, quoting the kernel, within its
deadline, and the DIMM must still be removable with device_del.

All of it runs on the module's `shared_vm`: QEMU refusals never reach the guest, and every
DIMM a scenario plugs is removed again (hot_added; the pool checks for leftovers), so no
trace is left. The guest refusal is defined last in the module (pytest keeps definition
order), so even if its removal misbehaved no other scenario would see it.
"""
from __future__ import annotations

import contextlib
import time

from harness.memory.blocks import confirm_add, dmesg_lines
from harness.memory.checks import Verdicts
from harness.memory.dimm import add_dimm, memory_devices, remove_dimm
from harness.errors import GuestRefused, QMPCommandError
from harness.memory.observe import snapshot
from harness.scenarios._common import facts_as_booted, hot_added, memtotal

MiB = 1024 * 1024
QEMU_ALIGN = 2 * MiB        # backends/hostmem.c / pc-dimm: sizes are multiples of the host page size (2 MiB THP)


def backend_objects(qmp) -> list:
    return sorted(o["name"] for o in qmp.execute("qom-list", {"path": "/objects"})
                  if str(o.get("type", "")).startswith("child<memory-backend"))


class Untouched:
    """Baseline of what a refused request must not change: QEMU's objects and devices, the guest's MemTotal."""

    def __init__(self, vm):
        self.vm = vm
        self.objects = backend_objects(vm.qmp)
        self.devices = sorted(d.get("id") for d in memory_devices(vm.qmp))
        self.memtotal = memtotal(snapshot(vm.guest))

    def check(self, v: Verdicts, what: str) -> None:
        v.eq(f"{what}: backend objects", self.objects, backend_objects(self.vm.qmp),
             "a refused device_add leaves no memory backend behind")
        v.eq(f"{what}: memory devices", self.devices, sorted(d.get("id") for d in memory_devices(self.vm.qmp)),
             "a refused request plugs nothing")
        v.eq(f"{what}: guest runs a command", 0, self.vm.run("true", timeout=60).status,
             "the guest never saw the request")
        v.eq(f"{what}: MemTotal (kB)", self.memtotal, memtotal(snapshot(self.vm.guest)),
             "the guest never saw the request")


def refusal(fn):
    """Run fn; return QEMU's QMPCommandError, or None if QEMU accepted the request."""
    try:
        fn()
    except QMPCommandError as e:
        return e
    return None


def check_refusal(v: Verdicts, what: str, err, want_class: str, want_desc: str, rule: str, measure) -> None:
    measure(what, {"class": err.error_class, "desc": err.desc} if err else None)
    v.eq(f"{what}: QEMU refused", True, err is not None, rule)
    if err is None:
        return
    v.eq(f"{what}: error class", want_class, err.error_class, rule)
    v.eq(f"{what}: QEMU's message contains", want_desc, want_desc if want_desc in err.desc else err.desc, rule)


def test_rejects_size_not_2mib_multiple(shared_vm, measure):
    vm = shared_vm
    facts = facts_as_booted(vm)
    v, before = Verdicts(), Untouched(vm)
    err = refusal(lambda: add_dimm(vm.qmp, facts.block_size + QEMU_ALIGN // 2))
    check_refusal(v, "size 128 MiB + 1 MiB", err, "GenericError", f"backend memory size must be multiple of {QEMU_ALIGN:#x}",
                  "pc-dimm sizes must be multiples of the backend's page size (2 MiB)", measure)
    before.check(v, "after the size refusal")
    v.raise_if_failed()


def test_rejects_bad_slot(shared_vm, measure):
    vm = shared_vm
    facts = facts_as_booted(vm)
    slots = vm.config.slots
    bad = slots + 5
    v, before = Verdicts(), Untouched(vm)
    err = refusal(lambda: add_dimm(vm.qmp, facts.block_size, slot=bad))
    check_refusal(v, f"slot {bad}", err, "GenericError", f"invalid slot number {bad}, valid range is [0-{slots - 1}]",
                  f"-m ...,slots={slots} gives slots 0..{slots - 1}", measure)
    before.check(v, "after the slot refusal")
    v.raise_if_failed()


def test_rejects_bad_node(shared_vm, measure):
    vm = shared_vm
    facts = facts_as_booted(vm)
    nodes = vm.config.numa_nodes
    bad = nodes + 4
    v, before = Verdicts(), Untouched(vm)
    err = refusal(lambda: add_dimm(vm.qmp, facts.block_size, node=bad))
    check_refusal(v, f"node {bad}", err, "GenericError",
                  f"DIMM property node has value {bad}' which exceeds the number of numa nodes: {nodes}",
                  "hw/mem/pc-dimm.c pc_dimm_realize(): the node must be one of the machine's NUMA nodes", measure)
    before.check(v, "after the node refusal")
    v.raise_if_failed()


def test_rejects_more_than_maxmem(shared_vm, measure):
    vm = shared_vm
    facts = facts_as_booted(vm)
    space = (vm.config.maxmem_mb - vm.config.mem_mb) * MiB
    v = Verdicts()
    with hot_added(vm, facts.block_size) as first:          # so "currently ... in use" is not zero
        before = Untouched(vm)
        err = refusal(lambda: add_dimm(vm.qmp, space - first.size + QEMU_ALIGN))
        check_refusal(v, "DIMM beyond maxmem", err, "GenericError",
                      f"not enough space, currently {first.size:#x} in use of total space for memory devices {space:#x}",
                      "hw/mem/memory-device.c memory_device_check_addable(): used + size must fit in maxmem - mem",
                      measure)
        before.check(v, "after the maxmem refusal")
        v.raise_if_failed()


def test_rejects_no_free_slots(shared_vm, measure):
    vm = shared_vm
    facts = facts_as_booted(vm)
    slots = vm.config.slots
    v = Verdicts()
    with contextlib.ExitStack() as stack:
        plugged = [stack.enter_context(hot_added(vm, facts.block_size)) for _ in range(slots)]
        v.eq("slots in use", sorted(range(slots)), sorted(d.slot for d in plugged), "one DIMM per slot")
        before = Untouched(vm)
        err = refusal(lambda: add_dimm(vm.qmp, facts.block_size))
        check_refusal(v, f"DIMM number {slots + 1}", err, "GenericError", "no free slots available",
                      f"all {slots} slots are taken", measure)
        before.check(v, "after the slots refusal")
        v.raise_if_failed()


def test_rejects_busy_memdev(shared_vm, measure):
    vm = shared_vm
    facts = facts_as_booted(vm)
    v = Verdicts()
    with hot_added(vm, facts.block_size) as first:
        before = Untouched(vm)
        err = refusal(lambda: add_dimm(vm.qmp, facts.block_size, memdev=first.memdev, reuse_memdev=True))
        check_refusal(v, "second DIMM on a used memdev", err, "GenericError",
                      f"can't use already busy memdev: {first.memdev}",
                      "hw/mem/pc-dimm.c: a memory backend serves one DIMM", measure)
        before.check(v, "after the busy memdev refusal")
        v.eq("the first DIMM's backend survived", True, first.memdev in backend_objects(vm.qmp),
             "reuse_memdev=True: add_dimm must not delete a backend it did not create")
        v.raise_if_failed()


def test_rejects_device_del_unknown(shared_vm, measure):
    vm = shared_vm
    v, before = Verdicts(), Untouched(vm)
    err = refusal(lambda: vm.qmp.execute("device_del", {"id": "memhp-no-such-dimm"}))
    check_refusal(v, "device_del of an unknown id", err, "DeviceNotFound", "memhp-no-such-dimm",
                  "qdev-monitor.c find_device_state(): DeviceNotFound names the id", measure)
    before.check(v, "after the unknown device_del")
    v.raise_if_failed()


# Defined last on purpose: pytest runs a module's tests in definition order, and this is the
# one request the guest itself sees.
def test_rejects_guest_refuses_unaligned_dimm(shared_vm, measure):
    """64 MiB, half a block: QEMU accepts it, the guest refuses it, in bounded time."""
    vm = shared_vm
    facts = facts_as_booted(vm)
    size = facts.block_size // 2
    v = Verdicts()
    base = snapshot(vm.guest)
    since = dmesg_lines(vm.guest)
    mark = vm.qmp.mark()
    dimm = add_dimm(vm.qmp, size)
    bound = 30.0
    t0 = time.monotonic()
    err = None
    try:
        confirm_add(vm.guest, dimm, facts.block_size, timeout=bound, since_line=since)
    except GuestRefused as e:
        err = e
    took = round(time.monotonic() - t0, 2)
    measure("refusal_s", took)
    measure("kernel_line", getattr(err, "kernel_line", None))
    # The insert OST may trail the kernel's refusal line; wait for it on a deadline.
    vm.qmp.wait_event("ACPI_DEVICE_OST", {"data": {"info": {"device": dimm.id}}}, timeout=30, after=mark)
    osts = [e["data"]["info"] for e in vm.qmp.events(mark) if e.get("event") == "ACPI_DEVICE_OST"
            and e.get("data", {}).get("info", {}).get("device") == dimm.id]
    measure("insert_ost", osts)
    v.eq("insert OST status", [0], [i.get("status") for i in osts],
         "QEMU's insert OST reports 0 even though the guest refused the range (ORACLE: confirm every add in sysfs)")
    v.eq("confirm_add raised GuestRefused", True, err is not None,
         "the kernel refuses a range that is not a whole number of memory blocks")
    line = getattr(err, "kernel_line", "") or ""
    v.eq("the quoted kernel line names the range", True,
         f"unaligned hotplug range: start {dimm.addr:#x}, size {dimm.size:#x}" in line,
         "mm/memory_hotplug.c check_hotplug_memory_range(): "
         "\"Block size [%#lx] unaligned hotplug range: start %#llx, size %#llx\"")
    dm = vm.guest.dmesg().splitlines()[since:]
    v.eq("dmesg 'add_memory failed'", True, any("add_memory failed" in ln for ln in dm),
         "drivers/acpi/acpi_memhotplug.c acpi_memory_enable_device()")
    after = snapshot(vm.guest)
    v.eq("memory blocks", sorted(base.blocks), sorted(after.blocks), "no block was created for the refused range")
    v.eq("MemTotal (kB)", memtotal(base), memtotal(after), "nothing was added")
    v.eq("guest runs a command", 0, vm.run("true", timeout=60).status, "a refused add leaves the guest healthy")
    res = remove_dimm(vm.qmp, dimm)
    measure("remove_events", list(res.event_names))
    v.eq("device_del of the refused DIMM", True, res.deleted,
         "the guest has nothing to offline, so the eject goes through")
    v.eq("remove events", ["ACPI_DEVICE_OST:132", "DEVICE_DELETED", "ACPI_DEVICE_OST:0"], list(res.event_names),
         "the usual eject sequence")
    v.eq("backend deleted", False, dimm.memdev in backend_objects(vm.qmp), "object-del after DEVICE_DELETED")
    v.raise_if_failed()
