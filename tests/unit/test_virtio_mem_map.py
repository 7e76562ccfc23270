"""The optional virtio-mem "subblocks" field of a memory-map step (harness.reports.memmap) and how
the HTML map draws it (harness.reports.html): unplugged sub-blocks to scale; old steps unchanged.
The memmap-cost tables (text, per-kernel matrix, HTML) tell pc-dimm and virtio-mem rows apart."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

from harness.reports import html, load_run, render, report
from harness.reports.matrixtable import memmap_cost_columns
from harness.reports.memmap import cost_device, memory_map_step

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


# ---------------------------------------------------------------- memmap-cost tables: the device column
# Rows as recorded on real runs: hot_add[on-1block] of tests/data/reports/suite-6.12 (pc-dimm, no
# device field: rows from before virtio-mem) and virtio_mem::grow on debian:6.12 (10:00 run).
PC_DIMM_ROW = {"dimm_mib": 128, "param": "on", "memfree_drop_kb": 12, "expected_kb": 0, "self_hosted_pages": 512,
               "applies": True, "reason": "applies: the 128 MiB block hosts its own 512-page (2 MiB) vmemmap"}
VIRTIO_ROW = {"dimm_mib": 128, "param": "on", "device": "virtio-mem", "memfree_drop_kb": 2188, "expected_kb": 2048,
              "self_hosted_pages": 0, "applies": False,
              "reason": "virtio-mem adds memory with add_memory_driver_managed(..., MHP_MERGE_RESOURCE | "
                        "MHP_NID_IS_MGID) and no MHP_MEMMAP_ON_MEMORY (linux-source-6.12 "
                        "drivers/virtio/virtio_mem.c:654-655), so its memmap comes from existing memory"}


def _results():
    return [report.Result("hot_add::hot_add[on-1block]", report.PASS, measurements={"memmap_cost": [PC_DIMM_ROW]}),
            report.Result("virtio_mem::grow", report.PASS, measurements={"memmap_cost": [VIRTIO_ROW]})]


def test_cost_device_defaults_to_pc_dimm():
    assert cost_device(PC_DIMM_ROW) == "pc-dimm" and cost_device(VIRTIO_ROW) == "virtio-mem"


def test_text_cost_table_tells_the_devices_apart():
    lines = report.memmap_cost_table(_results()).splitlines()
    assert lines[1].split()[:3] == ["SIZE", "PARAM", "DEVICE"]
    rows = {ln.split()[2]: ln for ln in lines[2:]}
    assert set(rows) == {"pc-dimm", "virtio-mem"} and len(lines) == 4
    assert rows["pc-dimm"].split()[:7] == ["128M", "on", "pc-dimm", "12", "kB", "0", "kB"]
    assert rows["virtio-mem"].split()[:9] == ["128M", "on", "virtio-mem", "2188", "kB", "2048", "kB", "0", "no:"]
    assert "no MHP_MEMMAP_ON_MEMORY" in rows["virtio-mem"]


def test_matrix_cost_table_keeps_both_rows_of_one_size():
    lines = memmap_cost_columns([("debian:6.12", _results()), ("debian:6.1", _results()[1:])]).splitlines()
    assert lines[1].split()[:3] == ["SIZE", "PARAM", "DEVICE"]
    body = {ln.split()[2]: ln for ln in lines[2:]}
    assert set(body) == {"pc-dimm", "virtio-mem"}            # same size and param: two rows, not one
    assert "12/0 kB, 512 p, yes" in body["pc-dimm"] and body["pc-dimm"].rstrip().endswith("-")
    assert body["virtio-mem"].count("2188/2048 kB, 0 p, no") == 2


def test_html_cost_table_has_a_device_cell(tmp_path):
    src = Path(__file__).resolve().parents[1] / "data" / "reports" / "suite-6.12"
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    doc = json.loads((run_dir / "report.json").read_text())
    doc["results"][0]["measurements"].setdefault("memmap_cost", []).append(VIRTIO_ROW)
    (run_dir / "report.json").write_text(json.dumps(doc))
    page = render(load_run(run_dir), "html")
    table = page.split("<h2>memmap cost at hot-add</h2>")[1].split("</table>")[0]
    assert "<th>device</th><th>size</th>" in table
    assert ("<tr><td>virtio-mem</td><td class=num>128 MiB</td><td>on</td><td class=num>2188 kB</td>"
            "<td class=num>2048 kB</td><td class=num>0</td><td>no: virtio-mem adds memory") in table
    assert "<tr><td>pc-dimm</td><td class=num>128 MiB</td><td>on</td><td class=num>12 kB</td>" in table
    assert table.count("<tr><td>pc-dimm</td>") == 4 and table.count("<tr><td>virtio-mem</td>") == 1
