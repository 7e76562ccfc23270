"""The optional virtio-mem "subblocks" field of a memory-map step (harness.reports.memmap) and how
the HTML map draws it (harness.reports.html): unplugged sub-blocks to scale; old steps unchanged."""
from __future__ import annotations

import re
from types import SimpleNamespace

from harness.reports import html
from harness.reports.memmap import memory_map_step

MiB = 1 << 20


def snap():
    blk = SimpleNamespace(state="online", valid_zones=["Movable"], node=0)
    boot = SimpleNamespace(state="online", valid_zones=["DMA32"], node=0)
    return SimpleNamespace(block_size=128 * MiB, blocks={7: boot, 32: blk})


def test_step_carries_subblocks_only_where_given():
    step = memory_map_step("after partial unplug", snap(), subblocks={32: {"size": 2 * MiB, "unplugged": [63, 61, 62]}})
    by_id = {b["id"]: b for b in step["blocks"]}
    assert by_id[32]["subblocks"] == {"size": 2 * MiB, "unplugged": [61, 62, 63]}
    assert "subblocks" not in by_id[7]
    assert "subblocks" not in {k for b in memory_map_step("x", snap())["blocks"] for k in b}   # backward compatible


def test_svg_draws_each_unplugged_subblock_to_scale():
    step = memory_map_step("after partial unplug", snap(), subblocks={32: {"size": 2 * MiB, "unplugged": [61, 62, 63]}})
    svg = html.svg_map(step, [step], 0)
    rects = re.findall(r'<rect class="subblock-unplugged" data-block="32" data-subblock="(\d+)" x="([\d.]+)" '
                       r'y="[\d.]+" width="([\d.]+)"', svg)
    assert [int(i) for i, _, _ in rects] == [61, 62, 63]
    xs = [float(x) for _, x, _ in rects]
    assert all(abs(float(w) - html.BLOCK_W / 64) < 1e-3 for _, _, w in rects)      # 2 MiB of 128 MiB
    assert abs(xs[1] - xs[0] - html.BLOCK_W / 64) < 1e-3
    assert "subblock-unplugged" not in html.svg_map(memory_map_step("x", snap()), [], 0)


def test_malformed_subblocks_are_ignored():
    for bad in ({"size": 0, "unplugged": [1]}, {"size": "x", "unplugged": [1]}, "junk", {"size": 2 * MiB, "unplugged": [99]}):
        step = memory_map_step("x", snap())
        step["blocks"][1]["subblocks"] = bad
        assert "subblock-unplugged" not in html.svg_map(step, [step], 0)
