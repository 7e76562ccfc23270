"""virtio-mem over QMP: QEMU's side of a resize, and the guest's own words when it plugs less.

A virtio-mem device is never unplugged with device_del: it is resized. resize() sets
`requested-size` with qom-set, then polls query-memory-devices until the device's `size` (what
the guest has plugged) equals the request, at least every POLL_S. MEMORY_DEVICE_SIZE_CHANGE reports
the same number but is rate-limited by QEMU, so the poll, not the event, decides; the event only
wakes the poll early. The wait is bounded twice: an
overall deadline, and a stall limit (the size has not moved for `stall` seconds), since a guest
that cannot unplug more retries with backoff for minutes and never says "done". The guest's
reason, when it plugs less, is whatever its dmesg says since the request (virtio_mem lines,
alloc_contig_range's "PFNs busy", offline failures): most of the driver's own failures are
dev_dbg, so the reason may be empty, and the result says so.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from harness.errors import Hang, QMPCommandError, UsageError
from harness.memory import expect
from harness.memory.blocks import MEMORY_SYSFS, block_states, describe_blocks, wait_until
from harness.vm.qemu_argv import VIRTIO_MEM_ID
from harness.vm.qmp import QMP

MiB = 1024 * 1024
QOM_PATH = f"/machine/peripheral/{VIRTIO_MEM_ID}"
POLL_S = 0.25      # longest gap between two reads of the plugged size while waiting
# Lines of the guest's dmesg that say why it plugged or unplugged less than requested.
REASON_RE = re.compile(r"virtio_mem|virtio-mem|PFNs busy|alloc_contig_range|[Oo]ffline failed|offlining failed"
                       r"|memory block onlining denied|adding memory failed")


@dataclass(frozen=True)
class VirtioMemState:
    """query-memory-devices' view of the device (bytes)."""
    id: str
    addr: int
    size: int             # plugged by the guest
    requested: int
    max_size: int
    block_size: int
    node: int


@dataclass(frozen=True)
class ResizeResult:
    requested: int                 # bytes asked for
    before: int                    # plugged size before the request
    plugged: int                   # plugged size when the wait ended
    reached: bool                  # plugged == requested
    seconds: float
    events: Tuple[int, ...]        # sizes MEMORY_DEVICE_SIZE_CHANGE reported for this device, in order
    reason: str = ""               # the guest's dmesg lines about it, when not reached ("" = none printed)

    def describe(self) -> str:
        s = (f"virtio-mem requested {self.requested // MiB} MiB, guest plugged {self.plugged // MiB} MiB "
             f"(was {self.before // MiB} MiB) after {self.seconds:.1f} s")
        if not self.reached:
            s += f"; guest says: {self.reason}" if self.reason else "; the guest printed no reason in dmesg"
        return s


def state(qmp: QMP, dev_id: str = VIRTIO_MEM_ID) -> VirtioMemState:
    for d in qmp.execute("query-memory-devices"):
        data: Dict[str, Any] = d.get("data", {})
        if d.get("type") == "virtio-mem" and data.get("id") == dev_id:
            return VirtioMemState(dev_id, int(data["memaddr"]), int(data["size"]), int(data["requested-size"]),
                                  int(data["max-size"]), int(data["block-size"]), int(data.get("node", 0)))
    raise QMPCommandError("query-memory-devices", "memhp", f"no virtio-mem device {dev_id!r}")


def reason_lines(dmesg_text: str, since_line: int = 0, limit: int = 6) -> str:
    """The dmesg lines after `since_line` that speak of virtio-mem or a failed unplug, joined with ' | '. Pure."""
    lines = [ln.strip() for ln in dmesg_text.split("\n")[since_line:] if REASON_RE.search(ln)]
    return " | ".join(lines[-limit:])


def resize(qmp: QMP, requested: int, timeout: float = 180.0, stall: float = 30.0,
           dmesg: Optional[Callable[[], str]] = None, dev_id: str = VIRTIO_MEM_ID) -> ResizeResult:
    """qom-set requested-size, then wait until the plugged size equals it, the size stalls, or the deadline.

    Never raises for a guest that plugs less: the caller judges ResizeResult (reached, plugged,
    reason). QEMU's refusals (not a block-size multiple, above max-size) raise QMPCommandError."""
    st = state(qmp, dev_id)
    if requested < 0 or requested > st.max_size or requested % st.block_size:
        raise UsageError(f"virtio-mem requested-size {requested} bytes must be a multiple of the block size "
                         f"{st.block_size} and at most {st.max_size}")
    since = len(dmesg().split("\n")) - 1 if dmesg is not None else 0
    mark = qmp.mark()
    t0 = time.monotonic()
    qmp.execute("qom-set", {"path": QOM_PATH, "property": "requested-size", "value": requested})
    size, last_change = st.size, t0
    seen = mark
    while True:
        cur = state(qmp, dev_id).size
        now = time.monotonic()
        if cur != size:
            size, last_change = cur, now
        if size == requested or now - t0 > timeout or now - last_change > stall:
            break
        # Wake on the device's next size event, else re-poll after POLL_S: the event is rate-limited
        # (it can trail the size by up to QEMU's 1 s), the poll is not. A growing sleep (0.2 s up to
        # 2 s, as before) made each resize end up to 2 s after the guest had finished.
        try:
            seen = qmp.wait_event_indexed("MEMORY_DEVICE_SIZE_CHANGE", {"data": {"id": dev_id}},
                                          timeout=POLL_S, after=seen)[0] + 1
        except Hang:
            pass
    seconds = time.monotonic() - t0
    events = tuple(int(e["data"]["size"]) for e in qmp.events(mark)
                   if e.get("event") == "MEMORY_DEVICE_SIZE_CHANGE" and e.get("data", {}).get("id") == dev_id)
    reason = ""
    if size != requested and dmesg is not None:
        reason = reason_lines(dmesg(), since)
    return ResizeResult(requested, st.size, size, size == requested, seconds, events, reason)


# Takes the device hotplug lock once and changes nothing: `online` of a memory block that is online
# (6.1 drivers/base/core.c:2712-2722 online_store: lock_device_hotplug_sysfs(); device_online() returns 1
# for an online device, :4294-4302). The write waits while another add or remove holds the lock.
HOTPLUG_BARRIER = (f"for f in {MEMORY_SYSFS}/memory*/online; do [ \"$(cat $f)\" = 1 ] && "
                   "{ echo 1 > $f; exit $?; }; done; exit 1")


def settle(guest, st: VirtioMemState, block_size: int, timeout: float = 60.0) -> None:
    """After a resize reached its target: wait until the guest has finished what the size change started.

    QEMU's size moves when the device answers the driver's plug/unplug request, which comes BEFORE
    the driver adds a new memory block and AFTER it emptied one, but before it offlines and removes
    it (6.1 drivers/virtio/virtio_mem.c virtio_mem_sbm_unplug_sb_online(): 1920 fake offline,
    1925 unplug request; virtio_mem_sbm_unplug_any_sb_online(): 1999 offline and remove). Reading
    sysfs as soon as the size is right can see a block not added yet or not removed yet (seen on 6.1
    under load: memory32 still there, Movable present 32768, after size 0). So: wait for the device's
    memory blocks to be exactly those holding plugged memory, then take the device hotplug lock once
    (HOTPLUG_BARRIER): add_memory_driver_managed() and offline_and_remove_memory() hold it over the
    whole add + auto-online and offline + remove (6.1 mm/memory_hotplug.c:1492-1505, 2257-2281;
    6.12 :1665-1678, 2430-2454), so when it is ours the counters are final. Sub-blocks plugged into
    an already online block are freed to the buddy after the request without that lock
    (virtio_mem_fake_online()); callers that read managed then wait on it."""
    want = sorted(expect.virtio_mem_blocks(st.addr, st.size, block_size))
    every = expect.virtio_mem_blocks(st.addr, st.max_size, block_size)
    rule = (f"virtio-mem with {st.size >> 20} MiB plugged has a memory block for each {block_size >> 20} MiB range "
            "holding plugged memory")
    last: Dict[int, str] = {}

    def probe() -> bool:       # one read of every block the device can have
        last.clear()
        last.update(block_states(guest, every))
        return sorted(last) == want

    wait_until(probe, f"the virtio-mem device's memory blocks with {st.size >> 20} MiB plugged", timeout,
               guest=guest, expected=", ".join(f"memory{b}" for b in want) or "none", rule=rule,
               describe=lambda _: describe_blocks(every, last))
    guest.run(HOTPLUG_BARRIER, timeout=timeout, check=True)


def parse_spec(text: str, parse_size: Callable[[str], int]) -> Dict[str, int]:
    """`SIZE[,node=N][,block-size=B][,requested=R]` -> GuestConfig keywords. requested defaults to SIZE
    (plugged at boot); sizes follow memhp's one unit rule (parse_size). Raises UsageError."""
    parts = [p.strip() for p in text.split(",")]
    size = parse_size(parts[0])
    kw = {"virtio_mem_mb": -1, "virtio_mem_node": 0, "virtio_mem_block_kb": 2048, "virtio_mem_requested_mb": -1}
    for p in parts[1:]:
        key, sep, val = p.partition("=")
        if not sep:
            raise UsageError(f"--virtio-mem {text}: {p!r} is not key=value (node=, block-size=, requested=)")
        if key == "node":
            if not val.isdigit():
                raise UsageError(f"--virtio-mem {text}: node must be a number, not {val!r}")
            kw["virtio_mem_node"] = int(val)
        elif key == "block-size":
            b = parse_size(val)
            if b % 1024:
                raise UsageError(f"--virtio-mem {text}: block-size {val} is not a whole number of KiB")
            kw["virtio_mem_block_kb"] = b // 1024
        elif key == "requested":
            r = parse_size(val)
            if r % MiB:
                raise UsageError(f"--virtio-mem {text}: requested {val} is not a whole number of MiB")
            kw["virtio_mem_requested_mb"] = r // MiB
        else:
            raise UsageError(f"--virtio-mem {text}: unknown key {key!r} (node=, block-size=, requested=)")
    if size % MiB:
        raise UsageError(f"--virtio-mem {text}: size is not a whole number of MiB")
    kw["virtio_mem_mb"] = size // MiB
    if kw["virtio_mem_requested_mb"] < 0:
        kw["virtio_mem_requested_mb"] = kw["virtio_mem_mb"] if kw["virtio_mem_mb"] * 1024 % kw["virtio_mem_block_kb"] == 0 else 0
    return kw
