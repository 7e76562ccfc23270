"""The virtio-mem expectation rules (harness/memory/expect.py, virtio-mem block): pure arithmetic."""
from __future__ import annotations

import pytest

from harness.memory import expect

MiB = 1 << 20


def facts(version=(6, 12, 117), param="Y") -> expect.KernelFacts:
    return expect.KernelFacts(release=".".join(map(str, version)), version=version, block_size=128 * MiB,
                              struct_page_size=64, struct_page_source="btf", pageblock_order=9, param=param)


@pytest.mark.parametrize("version", [(6, 1, 192), (6, 12, 117), (6, 6, 0)])
@pytest.mark.parametrize("param", ["Y", "force", "N", ""])
def test_never_self_hosted_whatever_the_parameter(version, param):
    f = facts(version, param)
    d = expect.virtio_mem_decision(f, 384 * MiB)
    assert not d.applies and d.vmemmap_pages_per_block == 0 and d.blocks == 3
    assert expect.expect_owner_private(f, d) is False       # no kpageflags bit 37 on 6.0+
    # while a one-block pc-dimm does self-host with the parameter on
    assert expect.decide(f, 128 * MiB).applies is (param in ("Y", "force") and (param == "Y" or version >= (6, 6)))


def test_rule_cites_the_source_of_both_versions():
    assert "virtio_mem.c:647-648" in expect.virtio_mem_rule(facts((6, 1, 192)))
    assert "virtio_mem.c:654-655" in expect.virtio_mem_rule(facts((6, 12, 117)))
    other = expect.virtio_mem_rule(facts((6, 6, 0)))
    assert "647-648" in other and "654-655" in other and "no MHP_MEMMAP_ON_MEMORY" in other


def test_online_deltas_managed_equals_present_when_fully_plugged():
    f = facts()
    d = expect.virtio_mem_online_deltas(f, 2, 256 * MiB)
    assert d == {"spanned": 65536, "present": 65536, "managed": 65536, "MemTotal": 262144}
    # the same blocks as a self-hosting pc-dimm keep 512 pages per block out of managed
    assert expect.online_deltas(f, expect.decide(f, 128 * MiB), 1)["managed"] == 32768 - 512


def test_partly_plugged_block_and_sub_block_unplug():
    f = facts()
    assert expect.virtio_mem_online_deltas(f, 1, 122 * MiB)["managed"] == 122 * 256
    assert expect.virtio_mem_unplug_managed_delta(f, 6 * MiB) == -1536


def test_blocks_and_memmap_cost():
    assert expect.virtio_mem_blocks(4 << 30, 0, 128 * MiB) == []
    assert expect.virtio_mem_blocks(4 << 30, 2 * MiB, 128 * MiB) == [32]
    assert expect.virtio_mem_blocks(4 << 30, 384 * MiB, 128 * MiB) == [32, 33, 34]
    assert expect.virtio_mem_blocks(4 << 30, 130 * MiB, 128 * MiB) == [32, 33]
    assert expect.virtio_mem_memmap_cost_kb(facts(), 3) == 3 * 2048
    assert expect.nr_memmap_pages_delta(facts(), 1) == 512
    assert expect.nr_memmap_pages_delta(facts((6, 1, 192)), 1) is None


def test_unplugged_subblocks_from_kpageflags():
    off, on = 1 << expect.KPF_OFFLINE, 1 << 10
    words = [on] * 4 + [off] * 4 + [off, on, off, off] + [off] * 4
    assert expect.virtio_mem_unplugged_subblocks(words, 4) == [1, 3]   # sub-block 2 is mixed: not unplugged
    assert expect.virtio_mem_unplugged_subblocks([on] * 8, 4) == []
    assert expect.KPF_OFFLINE == 23
