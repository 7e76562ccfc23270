"""pc-dimm hot-add and hot-remove over QMP: QEMU's side only.

add_dimm: object-add memory-backend-ram + device_add pc-dimm, then query-memory-devices for
what QEMU chose (addr, size, slot, node). remove_dimm: device_del, then wait for
DEVICE_DELETED or a failing ACPI_DEVICE_OST, and object-del on success. Which memory blocks a
DIMM covers is the guest's business (harness.memory.blocks). QEMU's ACPI OST status codes (ACPI
spec, _OST): 0 success, 0x80 (128) eject not supported/failure, 0x82 (130) device busy, 0x84
(132) eject in progress.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from harness.errors import Hang, QMPCommandError
from harness.vm.qmp import QMP

OST_SUCCESS = 0
OST_FAILURE = 128          # 0x80: e.g. eject disabled in the guest
OST_BUSY = 130             # 0x82: the guest could not offline the memory
OST_IN_PROGRESS = 132      # 0x84: eject request accepted, in progress
OST_SOURCE_EJECT = 3

_ids = itertools.count(1)


@dataclass(frozen=True)
class Dimm:
    """A plugged pc-dimm as QEMU reports it (query-memory-devices)."""
    id: str
    memdev: str
    addr: int
    size: int
    slot: Optional[int]
    node: Optional[int]


@dataclass(frozen=True)
class RemoveResult:
    deleted: bool                       # DEVICE_DELETED arrived
    ost_statuses: Tuple[int, ...]       # ACPI_DEVICE_OST statuses for this device, in order
    event_names: Tuple[str, ...]        # every relevant event for this device, in order
    object_deleted: bool = False        # object-del of the backend went through
    refused_status: Optional[int] = None  # the failing OST status when the guest refused

    @property
    def refused(self) -> bool:
        return self.refused_status is not None


def memory_devices(qmp: QMP) -> List[Dict[str, Any]]:
    return [d.get("data", {}) | {"type": d.get("type")} for d in qmp.execute("query-memory-devices")]


def add_dimm(qmp: QMP, size: int, node: Optional[int] = None, slot: Optional[int] = None,
             addr: Optional[int] = None, dimm_id: Optional[str] = None, memdev: Optional[str] = None,
             reuse_memdev: bool = False) -> Dimm:
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
            return Dimm(id=dimm_id, memdev=memdev, addr=int(d["addr"]), size=int(d["size"]),
                        slot=d.get("slot"), node=d.get("node"))
    raise QMPCommandError("query-memory-devices", "memhp", f"{dimm_id} missing after device_add")


def remove_dimm(qmp: QMP, dimm: Dimm, timeout: float = 60.0) -> RemoveResult:
    """device_del; wait for DEVICE_DELETED, or an OST status that is neither success nor in-progress."""
    mark = qmp.mark()
    qmp.execute("device_del", {"id": dimm.id})
    deleted, refused = False, None
    cursor = mark
    # One deadline for the whole wait: events for other devices must not restart it.
    deadline = time.monotonic() + timeout
    last: Optional[Dict[str, Any]] = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Hang(f"DEVICE_DELETED or a refusing ACPI_DEVICE_OST for {dimm.id}",
                       last_seen=json.dumps(last) if last else "no event for any device", timeout=timeout)
        idx, ev = qmp.wait_event_indexed(("DEVICE_DELETED", "ACPI_DEVICE_OST"), timeout=left, after=cursor)
        cursor = idx + 1
        last = ev
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
        # The final OST 0 follows DEVICE_DELETED; wait for it so the order is on record (its
        # absence shows in event_names, which callers judge).
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
