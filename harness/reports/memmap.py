"""The memory-map snapshot a hot-add scenario records for the HTML report's SVG maps.

A scenario records one step per state it passes through, as measurements["memory_map"]
(a list, in order):

    {"step": "after online",              # before add / after add / after online / after offline / after removal
     "block_size": 134217728,             # bytes (memory_block_size_bytes)
     "page_size": 4096,
     "blocks": [{"id": 32, "state": "online", "zone": "Movable", "node": 0, "self_hosted_pages": 512}, ...],
     "dimms": [{"id": "dimm0", "addr": 4294967296, "size": 1073741824, "node": 0}]}

`zone` is the block's zone when online (valid_zones of an online block names it; "none"
means the block spans several zones and is given as "mixed"), null when offline.
`self_hosted_pages` is how many of the block's first pages hold its own memmap (0 when the
memmap came from other memory). Every block in sysfs is listed, boot memory included.

Optional, per block (virtio-mem, issue 15): `"subblocks": {"size": 2097152, "unplugged": [61, 62, 63]}`,
the device's sub-block size in bytes and the indices of the sub-blocks inside this online block
that the device has not plugged (fake-offline pages, kpageflags KPF_OFFLINE). Absent for pc-dimm
and boot blocks; readers that do not know it ignore it.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Union

STEPS = ("before add", "after add", "after online", "after offline", "after removal")

# A measurements["memmap_cost"] row (one per hot-add / plug a scenario measured): dimm_mib (the size
# added, MiB), param, device ("pc-dimm" or "virtio-mem"), memfree_drop_kb, expected_kb,
# self_hosted_pages (always 0 for virtio-mem), applies, reason, kernel. Rows recorded before
# virtio-mem existed carry no device: they are all pc-dimm.
DEFAULT_COST_DEVICE = "pc-dimm"


def cost_device(row: Mapping[str, Any]) -> str:
    """The device a memmap_cost row was measured on; rows without one are pc-dimm's."""
    return str(row.get("device") or DEFAULT_COST_DEVICE)


def block_zone(state: Optional[str], valid_zones: Iterable[str]) -> Optional[str]:
    """The zone of an online block from its valid_zones; None when offline; "mixed" for "none"."""
    if state != "online":
        return None
    zones = [z for z in valid_zones if z]
    if not zones or zones[0] == "none":
        return "mixed"
    return zones[0]


def memory_map_step(step: str, snapshot: Any, dimms: Iterable[Any] = (),
                    self_hosted: Union[int, Mapping[int, int]] = 0, page_size: int = 4096,
                    subblocks: Optional[Mapping[int, Mapping[str, Any]]] = None) -> Dict[str, Any]:
    """One memory_map entry from a harness.memory.observe.Snapshot and the DIMMs present (DimmHandle-like:
    id, addr, size, node, block_ids).

    self_hosted: pages per block for every block of the given DIMMs (an int), or {block id: pages}.
    subblocks: {block id: {"size": bytes, "unplugged": [index, ...]}} for virtio-mem blocks (optional)."""
    dimms = list(dimms)
    dimm_blocks = {b for d in dimms for b in getattr(d, "block_ids", ())}
    blocks = []
    for bid in sorted(snapshot.blocks):
        blk = snapshot.blocks[bid]
        if isinstance(self_hosted, Mapping):
            pages = int(self_hosted.get(bid, 0))
        else:
            pages = int(self_hosted) if bid in dimm_blocks else 0
        entry = {"id": bid, "state": blk.state, "zone": block_zone(blk.state, blk.valid_zones),
                 "node": blk.node, "self_hosted_pages": pages}
        if subblocks and bid in subblocks:
            sb = subblocks[bid]
            entry["subblocks"] = {"size": int(sb["size"]), "unplugged": sorted(int(i) for i in sb["unplugged"])}
        blocks.append(entry)
    return {"step": step, "block_size": snapshot.block_size, "page_size": page_size, "blocks": blocks,
            "dimms": [{"id": d.id, "addr": d.addr, "size": d.size, "node": d.node or 0} for d in dimms]}
