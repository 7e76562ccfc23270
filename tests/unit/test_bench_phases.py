"""Pure parts of the speed work: bench's phase split, the PVH extraction, the merge of xdist
workers' result files. Inputs are built here (small synthetic files), never copied figures."""
from __future__ import annotations

import gzip
import json
import lzma
import struct

import pytest

from harness.errors import KernelError
from harness.kernels import pvh
from harness.plugin import merge_worker_results
from harness.workflows import bench

DMESG = """[    0.000000] Linux version 6.12.0
[    2.500000] Run /init as init process
[    2.600000] memhp-init: init started
[    2.900000] memhp-init: modules loaded
[    3.000000] memhp-init: network up
[    3.200000] memhp-init: dropbear listening
"""


def test_split_boot_phases_add_up_to_ssh_ready():
    console = "SeaBIOS\nLinux version 6.12.0\nRun /init as init process\nmore\n"
    at = console.find("Run /init")
    times = {"launch": 100.0, "cont": 100.2, "ready": 104.9, "ssh": 105.1}
    # The console chunk holding "Run /init" arrived at 103.8: the kernel's clock zero was 103.8 - 2.5.
    arrived = lambda off: 103.8 if off >= at else 101.0
    b = bench.split_boot(times, console, arrived, DMESG, first_fw=100.3)
    assert b.phases["qemu"] == pytest.approx(0.3)
    assert b.phases["firmware"] == pytest.approx(103.8 - 2.5 - 100.3)
    assert b.phases["kernel"] == 2.5
    assert b.phases["init"] == pytest.approx(3.2 - 2.5)
    assert sum(b.phases.values()) == pytest.approx(b.ssh_ready)
    assert b.ssh_ready == pytest.approx(5.1) and b.serial_ready == pytest.approx(4.9)
    assert list(b.marks) == ["init started", "modules loaded", "network up", "dropbear listening"]


def test_split_boot_without_firmware_output_starts_at_cont():
    console = "Run /init as init process\n"
    b = bench.split_boot({"launch": 0.0, "cont": 0.5, "ready": 5.0, "ssh": 5.5}, console, lambda o: 4.0,
                         DMESG, first_fw=None)
    assert b.phases["qemu"] == 0.5 and not b.firmware_output


@pytest.mark.parametrize("dmesg,console,what", [
    ("[    1.0] memhp-init: dropbear listening\n", "Run /init as init process", "dmesg"),
    (DMESG, "no init line here", "console never showed"),
    (DMESG.replace("dropbear listening", "dropbear started"), "Run /init as init process", "dropbear listening"),
])
def test_split_boot_refuses_missing_markers(dmesg, console, what):
    with pytest.raises(bench.BenchError, match=what):
        bench.split_boot({"launch": 0, "cont": 0, "ready": 1, "ssh": 2}, console, lambda o: 1.0, dmesg, None)


def _elf_with_note(ntype: int) -> bytes:
    name, desc = b"Xen\0", struct.pack("<I", 0x1000000)
    note = struct.pack("<III", len(name), len(desc), ntype) + name + desc
    phoff = 64
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, phoff, 0, 0,
                                                                   64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, phoff + 56, 0, 0, len(note), len(note), 4)
    return ehdr + phdr + note


def _bzimage(payload: bytes, setup_sects: int = 4) -> bytes:
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", head, 0x248, 16, len(payload))
    return bytes(head) + bytes(16) + payload + b"tail"


@pytest.mark.parametrize("compress", [lambda b: gzip.compress(b), lambda b: lzma.compress(b)], ids=["gzip", "xz"])
def test_pvh_extracts_the_payload_and_finds_the_note(compress):
    elf = _elf_with_note(pvh.XEN_ELFNOTE_PHYS32_ENTRY)
    data = compress(elf) + struct.pack("<I", len(elf))
    assert pvh.payload(_bzimage(data)) == data
    assert pvh.decompress(data) == elf
    assert pvh.has_pvh_note(elf)
    assert not pvh.has_pvh_note(_elf_with_note(pvh.XEN_ELFNOTE_PHYS32_ENTRY + 1))


def test_pvh_refuses_a_wrong_size_and_a_non_bzimage():
    elf = _elf_with_note(pvh.XEN_ELFNOTE_PHYS32_ENTRY)
    with pytest.raises(KernelError, match="bzImage says"):
        pvh.decompress(gzip.compress(elf) + struct.pack("<I", len(elf) + 1))
    with pytest.raises(KernelError, match="not a bzImage"):
        pvh.payload(bytes(4096))


def test_pvh_vmlinux_cached_or_none(tmp_path):
    elf = _elf_with_note(pvh.XEN_ELFNOTE_PHYS32_ENTRY)
    bz = tmp_path / "bzImage"
    bz.write_bytes(_bzimage(gzip.compress(elf) + struct.pack("<I", len(elf))))
    out = pvh.pvh_vmlinux(bz, cache=tmp_path / "cache")
    assert out is not None and out.read_bytes() == elf
    assert pvh.pvh_vmlinux(bz, cache=tmp_path / "cache") == out
    plain = _elf_with_note(1)
    bz.write_bytes(_bzimage(gzip.compress(plain) + struct.pack("<I", len(plain))))
    assert pvh.pvh_vmlinux(bz, cache=tmp_path / "cache") is None


def test_worker_results_merge_in_collection_order(tmp_path):
    path = tmp_path / "results.json"
    order = ["m1.py::a", "m1.py::b", "m2.py::c", "m3.py::d"]
    (tmp_path / "results.json.gw0").write_text(json.dumps(
        {"order": order, "results": {"m2.py::c": {"name": "c"}, "m3.py::d": {"name": "d"}}}))
    (tmp_path / "results.json.gw1").write_text(json.dumps(
        {"order": order, "results": {"m1.py::b": {"name": "b"}, "m1.py::a": {"name": "a"}}}))
    assert [r["name"] for r in merge_worker_results(path, {})] == ["a", "b", "c", "d"]
    assert not list(tmp_path.glob("results.json.gw*"))
    assert merge_worker_results(path, {"x": {"name": "x"}}) == [{"name": "x"}]
