"""Run folders for the report renderers' tests.

tests/data/reports/ holds two real runs (see its README): faults-6.12 (CRASH, HANG, two INFRA,
two PASS, from the fault-injection integration test) and lifecycle-6.12 (one PASS). A FAIL
run is derived here from lifecycle-6.12, in code, so what was changed is visible: the
scenario's outcome becomes FAIL with a message raised by harness.memory.checks itself, and
hot_add scenarios are added whose memory maps are built with harness.reports.memmap from the
real 6.12 snapshots in tests/data/debian-6.12 (before the add, and after onlining a 128 MiB
DIMM as block 32), widened to a 1 GiB DIMM (blocks 32..39).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness.memory.checks import Verdicts
from harness.errors import CheckFailed
from harness.memory.observe import parse_snapshot
from harness.reports.memmap import memory_map_step

DATA = Path(__file__).resolve().parents[1] / "data"
REPORTS = DATA / "reports"
FAULTS = REPORTS / "faults-6.12"
LIFECYCLE = REPORTS / "lifecycle-6.12"
LEAK_FAIL = REPORTS / "leak-fail-6.12"
SUITE = REPORTS / "suite-6.12"


def expected_counts(run_dir: Path) -> Dict[str, int]:
    """kunit_parser's counts for a run, from report.json's own summary: FAIL, CRASH, HANG and
    INFRA are `not ok` (failed), SKIP is skipped, PASS passed."""
    s = json.loads((run_dir / "report.json").read_text())["summary"]
    return {"passed": s["pass"], "failed": s["fail"] + s["crash"] + s["hang"] + s["infra"], "skipped": s["skip"]}
GiB, MiB = 1 << 30, 1 << 20
DIMM_ADDR = 0x100000000          # where QEMU put the first pc-dimm in the captured runs


class _Dimm:
    def __init__(self, size: int):
        self.id, self.addr, self.size, self.node = "dimm0", DIMM_ADDR, size, 0
        self.block_ids = tuple(range(DIMM_ADDR // (128 * MiB), (DIMM_ADDR + size) // (128 * MiB)))


def failure_message() -> str:
    """What the plugin records for a CheckFailed with two verdicts (report.json's message)."""
    v = Verdicts()
    v.eq("Movable managed delta", 32256, 32768,
         "online_movable: managed += block_pages - vmemmap pages; applies: the 128 MiB block hosts "
         "its own 512-page (2 MiB) vmemmap")
    v.eq("MemTotal delta (kB)", 129024, 131072, "MemTotal grows by the managed pages in kB")
    v.eq("Movable present delta", 32768, 32768, "present rises by block_pages per onlined block")
    try:
        v.raise_if_failed()
    except CheckFailed as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError("the verdicts did not fail")


def memory_map(hosted_per_block: int, size: int = GiB) -> List[Dict[str, Any]]:
    """Five steps for one DIMM, from the real 6.12 snapshots (boot blocks 0..7 as captured)."""
    before = parse_snapshot((DATA / "debian-6.12" / "before" / "snapshot").read_text())
    online = parse_snapshot((DATA / "debian-6.12" / "snapshot").read_text())
    dimm = _Dimm(size)
    template = online.blocks[32]            # the captured hot-added block, online in Movable
    steps = [memory_map_step("before add", before, [])]
    for step, state in (("after add", "offline"), ("after online", "online"), ("after offline", "offline")):
        blocks = dict(before.blocks)
        for b in dimm.block_ids:
            blocks[b] = replace(template, id=b, phys_index=b, state=state, online=state == "online",
                                valid_zones=("Movable",) if state == "online" else ("Normal", "Movable"))
        snap = replace(online, blocks=blocks)
        steps.append(memory_map_step(step, snap, [dimm], hosted_per_block))
    steps.append(memory_map_step("after removal", before, []))
    return steps


def derived_failed_run(tmp: Path, bisect: Optional[Dict[str, Any]] = None) -> Path:
    """lifecycle-6.12 turned into a run with a FAIL, two hot-add PASSes with maps, and a SKIP."""
    run = tmp / "run-failed"
    shutil.copytree(LIFECYCLE, run)
    doc = json.loads((run / "report.json").read_text())
    life = doc["results"][0]
    life["outcome"], life["message"] = "fail", failure_message()
    cost = {"dimm_mib": 1024, "memfree_raw_drop_kb": 0, "kernel": "6.12.117+deb12-cloud-amd64"}
    doc["results"] += [
        {"name": "hot_add::hot_add[on-1GiB]", "outcome": "pass", "message": "", "duration": 41.5,
         "measurements": {"decision": "applies: each 128 MiB block hosts its own 512-page (2 MiB) vmemmap",
                          "memmap_cost": [dict(cost, param="on", memfree_drop_kb=40, expected_kb=0,
                                               self_hosted_pages=4096, applies=True,
                                               reason="applies: each block hosts its own vmemmap")],
                          "memory_map": memory_map(512)},
         "artifacts": None},
        {"name": "hot_add::hot_add[off-1GiB]", "outcome": "pass", "message": "", "duration": 38.0,
         "measurements": {"memmap_cost": [dict(cost, param="off", memfree_drop_kb=16420, expected_kb=16384,
                                               self_hosted_pages=0, applies=False,
                                               reason="memory_hotplug.memmap_on_memory is off")],
                          "memory_map": memory_map(0)},
         "artifacts": None},
        {"name": "param::readback[force]", "outcome": "skip", "message": "Skipped: force reads back on 6.6+ only",
         "duration": 0.0, "measurements": {}, "artifacts": None},
    ]
    doc["summary"] = {o: sum(1 for r in doc["results"] if r["outcome"] == o)
                      for o in ("pass", "fail", "crash", "hang", "infra", "skip")}
    doc["exit_status"] = 1
    if bisect:
        doc["bisect"] = bisect
    (run / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    return run


BISECT = {
    "first_bad": {"sha": "3b1c5f0b6a7e4d2f9c8e1a0b2c3d4e5f60718293", "subject": "mm/memory_hotplug: account vmemmap pages twice"},
    "parent": {"sha": "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432", "subject": "mm: tidy"},
    "counts": [{"label": "runs", "good": 10, "bad": 10},
               {"label": "dimm_lifecycle::block_sized_dimm_lifecycle FAIL", "good": 0, "bad": 10}],
    "to": ["David Hildenbrand <david@redhat.com>", "Oscar Salvador <osalvador@suse.de>"],
    "cc": ["linux-mm@kvack.org", "linux-kernel@vger.kernel.org"],
}
