"""Hotplug operations over QMP: pc-dimm add and remove.

add_dimm: object-add memory-backend-ram + device_add pc-dimm, then query-memory-devices for
the address QEMU chose. remove_dimm: device_del, then wait for DEVICE_DELETED or a failing
ACPI_DEVICE_OST, and object-del on success. QEMU's ACPI OST status codes (ACPI spec, _OST):
0 success, 0x80 (128) eject not supported/failure, 0x82 (130) device busy, 0x84 (132) eject
in progress.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from harness.errors import Hang, QMPCommandError
from harness.qmp import QMP

OST_SUCCESS = 0
OST_FAILURE = 128          # 0x80: e.g. eject disabled in the guest
OST_BUSY = 130             # 0x82: the guest could not offline the memory
OST_IN_PROGRESS = 132      # 0x84: eject request accepted, in progress
OST_SOURCE_EJECT = 3

_ids = itertools.count(1)


@dataclass(frozen=True)
class DimmHandle:
    id: str
    memdev: str
    addr: int
    size: int
    slot: Optional[int]
    node: Optional[int]
    block_ids: Tuple[int, ...]


@dataclass(frozen=True)
class RemoveResult:
    deleted: bool                       # DEVICE_DELETED arrived
    ost_statuses: Tuple[int, ...]       # ACPI_DEVICE_OST statuses for this device, in order
    event_names: Tuple[str, ...]        # every relevant event for this device, in order
    object_deleted: bool = False
    refused_status: Optional[int] = None  # the failing OST status when the guest refused

    @property
    def refused(self) -> bool:
        return self.refused_status is not None


def block_ids_for(addr: int, size: int, block_size: int) -> Tuple[int, ...]:
    from harness.expect import block_ids
    return tuple(block_ids(addr, size, block_size))


def memory_devices(qmp: QMP) -> List[Dict[str, Any]]:
    return [d.get("data", {}) | {"type": d.get("type")} for d in qmp.execute("query-memory-devices")]


def add_dimm(qmp: QMP, size: int, block_size: int, node: Optional[int] = None, slot: Optional[int] = None,
             addr: Optional[int] = None, dimm_id: Optional[str] = None, memdev: Optional[str] = None,
             reuse_memdev: bool = False) -> DimmHandle:
    """Hot-add a pc-dimm of `size` bytes. QEMU's refusals raise QMPCommandError verbatim;
    on a device_add refusal the backend object is deleted again so nothing is left behind."""
    n = next(_ids)
    dimm_id = dimm_id or f"dimm{n}"
    memdev = memdev or f"mem-{dimm_id}"
    if not reuse_memdev:
        qmp.execute("object-add", {"qom-type": "memory-backend-ram", "id": memdev, "size": size})
    args: Dict[str, Any] = {"driver": "pc-dimm", "id": dimm_id, "memdev": memdev}
    if node is not None:
        args["node"] = node
    if slot is not None:
        args["slot"] = slot
    if addr is not None:
        args["addr"] = addr
    try:
        qmp.execute("device_add", args)
    except QMPCommandError:
        if not reuse_memdev:
            try:
                qmp.execute("object-del", {"id": memdev})
            except QMPCommandError:
                pass
        raise
    for d in memory_devices(qmp):
        if d.get("id") == dimm_id:
            return DimmHandle(id=dimm_id, memdev=memdev, addr=int(d["addr"]), size=int(d["size"]),
                              slot=d.get("slot"), node=d.get("node"),
                              block_ids=block_ids_for(int(d["addr"]), int(d["size"]), block_size))
    raise QMPCommandError("query-memory-devices", "memhp", f"{dimm_id} missing after device_add")


def remove_dimm(qmp: QMP, dimm: DimmHandle, timeout: float = 60.0) -> RemoveResult:
    """device_del; wait for DEVICE_DELETED, or an OST status that is neither success nor in-progress."""
    mark = qmp.mark()
    qmp.execute("device_del", {"id": dimm.id})
    deleted, refused = False, None
    cursor = mark
    while True:
        idx, ev = qmp.wait_event_indexed(("DEVICE_DELETED", "ACPI_DEVICE_OST"), timeout=timeout, after=cursor)
        cursor = idx + 1
        if ev["event"] == "DEVICE_DELETED" and ev.get("data", {}).get("device") == dimm.id:
            deleted = True
            break
        if ev["event"] == "ACPI_DEVICE_OST":
            info = ev.get("data", {}).get("info", {})
            if info.get("device") == dimm.id and info.get("status") not in (OST_SUCCESS, OST_IN_PROGRESS):
                refused = info.get("status")
                break
    slot = str(dimm.slot) if dimm.slot is not None else None

    def mine(info: Dict[str, Any]) -> bool:
        # After DEVICE_DELETED the device is gone, so QEMU's final OST names only the slot.
        return info.get("device") == dimm.id or (
            "device" not in info and info.get("slot-type") == "DIMM" and info.get("slot") == slot)

    if deleted:
        # The final OST 0 follows DEVICE_DELETED; wait for it so the order is on record.
        try:
            qmp.wait_event("ACPI_DEVICE_OST", {"data": {"info": {"slot-type": "DIMM", "slot": slot,
                                                                 "status": OST_SUCCESS, "source": OST_SOURCE_EJECT}}},
                           timeout=10, after=cursor)
        except Hang:
            pass
    names, statuses = [], []
    for e in qmp.events(mark):
        if e.get("event") == "DEVICE_DELETED" and e.get("data", {}).get("device") == dimm.id:
            names.append("DEVICE_DELETED")
        elif e.get("event") == "ACPI_DEVICE_OST" and mine(e.get("data", {}).get("info", {})):
            names.append(f"ACPI_DEVICE_OST:{e['data']['info'].get('status')}")
            statuses.append(e["data"]["info"].get("status"))
    obj_deleted = False
    if deleted:
        qmp.execute("object-del", {"id": dimm.memdev})
        obj_deleted = True
    return RemoveResult(deleted=deleted, ost_statuses=tuple(statuses), event_names=tuple(names),
                        object_deleted=obj_deleted, refused_status=refused)


# ---------------------------------------------------------------- guest side (sysfs)
MEMORY_SYSFS = "/sys/devices/system/memory"


def block_path(block_id: int, attr: str = "") -> str:
    return f"{MEMORY_SYSFS}/memory{block_id}" + (f"/{attr}" if attr else "")


def set_block_state(guest, block_id: int, state: str, timeout: float = 120.0):
    """echo state > memoryN/state. Returns the CommandResult; EINVAL shows as status != 0 and
    'Invalid argument' in stderr/stdout."""
    return guest.write(block_path(block_id, "state"), state, timeout=timeout)


def wait_until(probe, what: str, timeout: float = 30.0, interval: float = 0.1):
    """Poll probe() until it returns a truthy value or the deadline runs out (then Hang,
    naming what was awaited and the last value seen)."""
    import time as _t

    deadline = _t.monotonic() + timeout
    last = None
    while True:
        last = probe()
        if last:
            return last
        if _t.monotonic() > deadline:
            raise Hang(what, last_seen=repr(last)[:300], timeout=timeout)
        _t.sleep(interval)
        interval = min(interval * 1.5, 1.0)


def wait_blocks(guest, block_ids, present: bool = True, timeout: float = 30.0) -> None:
    """Wait until every memoryN folder exists (present=True) or is gone (present=False)."""
    paths = " ".join(block_path(b) for b in block_ids)
    test = "-e" if present else "! -e"
    cmd = f"for p in {paths}; do [ {test} $p ] || exit 1; done"
    wait_until(lambda: guest.run(cmd, timeout=15).ok,
               f"memory blocks {list(block_ids)} to {'appear' if present else 'leave'} in sysfs", timeout)


# ---------------------------------------------------------------- add confirmation
# The guest can refuse a DIMM that QEMU accepted, and the insert OST still reports status 0
# (ORACLE: "Hot-add"). These are the kernel's own words for it, x86_64, 6.1 and 6.12:
#   mm/memory_hotplug.c check_hotplug_memory_range():
#       "Block size [%#lx] unaligned hotplug range: start %#llx, size %#llx"
#   drivers/acpi/acpi_memhotplug.c acpi_memory_enable_device(): "add_memory failed"
#   drivers/acpi/acpi_memhotplug.c acpi_memory_device_add(): "acpi_memory_enable_device() error"
ADD_REFUSAL_GENERIC = ("add_memory failed", "acpi_memory_enable_device() error")


def add_refusal_line(dmesg: str, addr: int, size: int, after_line: int = 0) -> Optional[str]:
    """The guest's refusal of the range [addr, addr+size), quoted from dmesg, or None. Pure.

    A line that names this range (start and size as the kernel prints them) wins wherever it
    is; a generic "add_memory failed" line counts only after line `after_line` (it names the
    ACPI device, not the range, so an older one may belong to another DIMM)."""
    lines = (dmesg or "").replace("\r", "").split("\n")
    ranged = f"unaligned hotplug range: start {addr:#x}, size {size:#x}"
    for line in lines:
        if ranged in line:
            return line.strip()
    for line in lines[after_line:]:
        if any(s in line for s in ADD_REFUSAL_GENERIC):
            return line.strip()
    return None


def dmesg_lines(guest) -> int:
    """How many lines dmesg holds now; pass it to confirm_add as since_line."""
    return len(guest.dmesg().split("\n")) - 1


def confirm_add(guest, dimm: DimmHandle, timeout: float = 30.0, since_line: int = 0) -> None:
    """Wait until every block of `dimm` is in sysfs. If the guest's dmesg shows it refused the
    range first, raise GuestRefused quoting the kernel's line; if neither shows within
    `timeout`, Hang."""
    from harness.errors import GuestRefused

    paths = " ".join(block_path(b) for b in dimm.block_ids)
    cmd = f"for p in {paths}; do [ -e $p ] || exit 1; done"

    def probe():
        if guest.run(cmd, timeout=15).ok:
            return ("present", "")
        line = add_refusal_line(guest.dmesg(), dimm.addr, dimm.size, since_line)
        return ("refused", line) if line else None

    kind, line = wait_until(probe, f"memory blocks {list(dimm.block_ids)} of {dimm.id} to appear in sysfs, "
                                   f"or the guest to refuse them in dmesg", timeout)
    if kind == "refused":
        err = GuestRefused(f"the guest refused {dimm.id} ({dimm.size:#x} bytes at {dimm.addr:#x}): {line}")
        err.kernel_line = line  # type: ignore[attr-defined]
        err.dimm = dimm         # type: ignore[attr-defined]
        raise err
