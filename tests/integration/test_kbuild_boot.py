"""Kernels built from Debian's linux-source-6.1 boot, carry our patch, and pass the suite.

Marked kbuild: the first build takes minutes (cached by input hash afterwards).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.vm.guest import VM
from harness.memory.blocks import dimm_blocks, set_block_state, wait_blocks
from harness.memory.dimm import add_dimm, remove_dimm
from harness.vm.image import build

from kbuild_helpers import DMESG_MARKER, patched_61, pristine_61
from memhp_helpers import not_passing

pytestmark = [pytest.mark.kbuild, pytest.mark.guest]
MEMHP = str(Path(sys.executable).parent / "memhp")


def _hot_add_and_read_dmesg(kernel, log_dir: Path):
    image = build(kernel)
    with VM(kernel, image, log_dir) as vm:
        bs = int(vm.run("cat /sys/devices/system/memory/block_size_bytes", check=True).stdout, 16)
        dimm = add_dimm(vm.qmp, bs)
        ids = dimm_blocks(dimm, bs)
        wait_blocks(vm.guest, ids)
        dmesg = vm.guest.dmesg()
        for b in ids:
            set_block_state(vm.guest, b, "offline")
        remove_dimm(vm.qmp, dimm)
        return dimm, dmesg


def test_patched_kernel_logs_our_line_on_hot_add(tmp_path):
    dimm, dmesg = _hot_add_and_read_dmesg(patched_61(), tmp_path)
    m = re.search(re.escape(DMESG_MARKER) + r"(0x[0-9a-f]+) size=(0x[0-9a-f]+)", dmesg)
    assert m, f"the patch's pr_info line is not in the guest's dmesg; dmesg tail:\n{dmesg[-1500:]}"
    assert (int(m.group(1), 16), int(m.group(2), 16)) == (dimm.addr, dimm.size), \
        f"pr_info reported {m.group(0)!r} but QEMU placed the DIMM at {dimm.addr:#x} size {dimm.size:#x}"


def test_pristine_kernel_has_no_such_line(tmp_path):
    """The negative control: without the patch the line must not appear."""
    _, dmesg = _hot_add_and_read_dmesg(pristine_61(), tmp_path)
    assert DMESG_MARKER not in dmesg


def test_full_suite_passes_on_debian_src_61(tmp_path):
    j = tmp_path / "r.json"
    p = subprocess.run([MEMHP, "run", "--kernel", "debian-src:6.1", "--json", str(j),
                        "--artifacts", str(tmp_path / "art")],
                       capture_output=True, text=True, timeout=2400)
    assert j.exists(), f"memhp run wrote no JSON (exit {p.returncode}):\n{p.stderr[-3000:]}"
    doc = json.loads(j.read_text())
    bad = not_passing(doc["results"])
    assert doc["results"], "no scenario ran"
    assert sum(r["outcome"] == "skip" for r in doc["results"]) < len(doc["results"]) / 2, "most of the suite skipped"
    assert p.returncode == 0 and not bad, \
        f"memhp run exit {p.returncode}:\n{p.stdout[-6000:]}\n{p.stderr[-2000:]}"
    assert doc["kernel"]["release"].startswith("6.1")
