"""Old entry point, kept only for callers not yet moved over (cli.py `boot --dimm`, the
integration tests): QMP operations now live in harness.dimm, guest-side block operations in
harness.blocks, and the dmesg refusal parser in harness.parsers. New code imports those.

add_dimm here still takes the block size and returns a DimmHandle with the block ids, as
before; harness.dimm.add_dimm returns QEMU's facts only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from harness import blocks, dimm as _dimm
from harness.blocks import block_path, dmesg_lines, set_block_state, wait_blocks, wait_until  # noqa: F401
from harness.dimm import (OST_BUSY, OST_FAILURE, OST_IN_PROGRESS, OST_SOURCE_EJECT, OST_SUCCESS,  # noqa: F401
                          RemoveResult, memory_devices, remove_dimm)
from harness.parsers import ADD_REFUSAL_GENERIC, add_refusal_line  # noqa: F401


@dataclass(frozen=True)
class DimmHandle(_dimm.Dimm):
    block_ids: Tuple[int, ...] = ()


def add_dimm(qmp, size: int, block_size: int, node: Optional[int] = None, slot: Optional[int] = None,
             addr: Optional[int] = None, dimm_id: Optional[str] = None, memdev: Optional[str] = None,
             reuse_memdev: bool = False) -> DimmHandle:
    d = _dimm.add_dimm(qmp, size, node=node, slot=slot, addr=addr, dimm_id=dimm_id, memdev=memdev,
                       reuse_memdev=reuse_memdev)
    return DimmHandle(d.id, d.memdev, d.addr, d.size, d.slot, d.node, blocks.dimm_blocks(d, block_size))

