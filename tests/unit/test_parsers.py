"""Parsers on synthetic fixtures, real guest captures (when present) and this host's live /proc."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from harness.memory import parsers as P

DATA = Path(__file__).resolve().parent.parent / "data"
SYN = DATA / "synthetic"
# Real captures from guests land in tests/data/debian-6.1/, tests/data/debian-6.12/, ...
REAL_DIRS = sorted(d for d in DATA.glob("debian-*") if d.is_dir())


def syn(name: str) -> str:
    return (SYN / name).read_text()


def real(name: str):
    """One param per real capture dir that has `name`; a skipped placeholder when none do."""
    found = [pytest.param(d / name, id=d.name) for d in REAL_DIRS if (d / name).exists()]
    return found or [pytest.param(None, marks=pytest.mark.skip(reason=f"no real capture of {name} yet"))]


# --- block size and memory blocks -------------------------------------------

@pytest.mark.parametrize("text,want", [("8000000\n", 128 << 20), ("80000000", 2 << 30),
                                       ("", None), ("zz\n", None)])
def test_parse_block_size(text, want):
    assert P.parse_block_size(text) == want


def test_parse_memory_blocks_from_files():
    blocks = P.parse_memory_blocks({
        "memory32": {"state": "offline\n", "online": "0\n", "valid_zones": "Normal Movable\n",
                     "phys_index": "00000020\n", "removable": "1\n", "nodes": "node0"},
        "memory33": {"state": "online\n"},
        "block_size_bytes": {"x": "y"},     # not a block: ignored
    })
    assert set(blocks) == {32, 33}
    b = blocks[32]
    assert b == P.MemoryBlock(id=32, state="offline", online=False, valid_zones=("Normal", "Movable"),
                              phys_index=32, removable=True, node=0)
    assert blocks[33].online is None and blocks[33].valid_zones == () and blocks[33].node is None


def test_parse_sysfs_dump_synthetic():
    d = P.parse_sysfs_dump(syn("sysfs-dump"))
    assert d.block_size == 128 << 20
    assert d.auto_online_blocks == "offline"
    assert sorted(d.blocks) == list(range(8)) + [32, 33]
    assert d.blocks[32] == P.MemoryBlock(32, "offline", False, ("Normal", "Movable"), 32, True, 0)
    assert d.blocks[33].valid_zones == ("Movable",) and d.blocks[33].node == 1 and d.blocks[33].online
    assert d.blocks[5].phys_index == 5


def test_parse_sysfs_dump_absolute_paths_and_crlf():
    text = syn("sysfs-dump").replace("memory", "/sys/devices/system/memory/memory").replace("\n", "\r\n")
    text = text.replace("block_size_bytes", "/sys/devices/system/memory/block_size_bytes")
    d = P.parse_sysfs_dump(text)
    assert d.block_size == 128 << 20 and d.blocks[32].state == "offline" and d.blocks[33].node == 1


def test_parse_sysfs_dump_odd_input():
    d = P.parse_sysfs_dump("garbage\nmemoryX/state:online\nmemory7/state\n:\n\nmemory9/online:maybe\n")
    assert d.block_size is None and d.auto_online_blocks is None
    assert list(d.blocks) == [9] and d.blocks[9].online is None
    assert P.parse_sysfs_dump("") == P.SysfsDump()


def test_sysfs_dump_cmd_is_plain_sh():
    c = P.SYSFS_DUMP_CMD
    assert "{" not in c and "grep -H" in c and "ls -d" in c


@pytest.mark.skipif(not (shutil.which("busybox") and os.path.isdir("/sys/devices/system/memory")),
                    reason="needs busybox and /sys/devices/system/memory on the host")
def test_sysfs_dump_cmd_on_this_host_with_busybox():
    out = subprocess.run(["busybox", "sh", "-c", P.SYSFS_DUMP_CMD], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0
    d = P.parse_sysfs_dump(out.stdout)
    want_bs = int(Path("/sys/devices/system/memory/block_size_bytes").read_text(), 16)
    assert d.block_size == want_bs
    names = [n for n in os.listdir("/sys/devices/system/memory") if n.startswith("memory")]
    assert len(d.blocks) == len(names) > 0
    for b in d.blocks.values():
        assert b.state in ("online", "offline", "going-offline")
        assert b.phys_index == b.id
        assert b.node is not None


@pytest.mark.parametrize("path", real("sysfs-dump"))
def test_real_sysfs_dump(path):
    d = P.parse_sysfs_dump(path.read_text(errors="replace"))
    assert d.block_size and d.block_size % (128 << 20) == 0
    assert d.blocks
    for b in d.blocks.values():
        assert b.state in ("online", "offline")
        assert b.online == (b.state == "online")
        assert b.phys_index == b.id


# --- zoneinfo ----------------------------------------------------------------

def test_parse_zoneinfo_6_1_layout():
    z = P.parse_zoneinfo(syn("zoneinfo"))
    assert list(z) == [(0, "DMA"), (0, "DMA32"), (0, "Normal"), (0, "Movable")]
    assert z[(0, "DMA")] == P.Zone(spanned=4095, present=3998, managed=3840, free=3584)
    assert z[(0, "DMA32")] == P.Zone(258016, 258016, 241520, 201234)
    assert z[(0, "Movable")] == P.Zone(0, 0, 0, 0)


def test_parse_zoneinfo_6_12_layout_two_nodes():
    z = P.parse_zoneinfo(syn("zoneinfo-6.12"))
    assert z[(0, "Movable")] == P.Zone(262144, 262144, 258048, 257000)
    assert z[(1, "Movable")] == P.Zone(32768, 32768, 32256, 32200)
    assert z[(1, "DMA")] == P.Zone(0, 0, 0, 0)
    assert (0, "Device") in z


def test_parse_zoneinfo_crlf_and_junk():
    z = P.parse_zoneinfo(syn("zoneinfo").replace("\n", "\r\n"))
    assert z[(0, "DMA32")].managed == 241520
    assert P.parse_zoneinfo("") == {}
    assert P.parse_zoneinfo("nothing here\n  spanned 5\n") == {}
    z = P.parse_zoneinfo("Node 0, zone   Normal\n  pages free     7\n")
    assert z[(0, "Normal")] == P.Zone(None, None, None, 7)


def _check_zones(z):
    assert z
    for key, zone in z.items():
        assert None not in (zone.spanned, zone.present, zone.managed, zone.free), key
        assert zone.spanned >= zone.present >= zone.managed >= 0, key
        assert zone.free <= zone.managed or zone.managed == 0, key


@pytest.mark.parametrize("path", real("zoneinfo"))
def test_real_zoneinfo(path):
    _check_zones(P.parse_zoneinfo(path.read_text()))


@pytest.mark.skipif(not os.path.exists("/proc/zoneinfo"), reason="no /proc/zoneinfo")
def test_host_zoneinfo():
    text = Path("/proc/zoneinfo").read_text()
    z = P.parse_zoneinfo(text)
    assert len(z) == text.count("\nNode ") + text.startswith("Node ")
    _check_zones(z)


# --- meminfo, vmstat, pagetypeinfo, param -----------------------------------

def test_parse_meminfo():
    m = P.parse_meminfo(syn("meminfo"))
    assert m["MemTotal"] == 980676 and m["MemFree"] == 812344
    assert m["Active(anon)"] == 224
    assert m["HugePages_Total"] == 0 and m["Hugepagesize"] == 2048
    assert m["VmallocTotal"] == 34359738367
    assert len(m) == len(syn("meminfo").strip().splitlines())


def test_parse_node_meminfo():
    m = P.parse_meminfo(syn("node1-meminfo"))
    assert m["MemTotal"] == 129024 and m["HugePages_Total"] == 0 and m["MemUsed"] == 224


def test_parse_meminfo_odd():
    assert P.parse_meminfo("") == {}
    assert P.parse_meminfo("MemTotal: lots kB\nMemFree:  5 kB\r\n") == {"MemFree": 5}


@pytest.mark.parametrize("path", real("meminfo"))
def test_real_meminfo(path):
    m = P.parse_meminfo(path.read_text())
    assert 0 < m["MemFree"] <= m["MemTotal"]


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="no /proc/meminfo")
def test_host_meminfo():
    text = Path("/proc/meminfo").read_text()
    m = P.parse_meminfo(text)
    assert len(m) == len(text.strip().splitlines())
    assert 0 < m["MemFree"] <= m["MemTotal"]


def test_parse_vmstat():
    v = P.parse_vmstat(syn("vmstat"))
    assert v["nr_free_pages"] == 203085 and v["nr_memmap_pages"] == 512
    assert len(v) == len(syn("vmstat").strip().splitlines())
    assert P.parse_vmstat("a b\nc 1 2\nd -3\n") == {"d": -3}


@pytest.mark.parametrize("path", real("vmstat"))
def test_real_vmstat(path):
    v = P.parse_vmstat(path.read_text())
    assert v["nr_free_pages"] > 0


@pytest.mark.skipif(not os.path.exists("/proc/vmstat"), reason="no /proc/vmstat")
def test_host_vmstat():
    text = Path("/proc/vmstat").read_text()
    assert len(P.parse_vmstat(text)) == len(text.strip().splitlines())


def test_parse_pageblock_order():
    assert P.parse_pageblock_order(syn("pagetypeinfo")) == 9
    assert P.parse_pageblock_order(syn("pagetypeinfo-order10")) == 10
    assert P.parse_pageblock_order("") is None
    assert P.parse_pageblock_order("Pages per block:  512\n") is None


@pytest.mark.parametrize("path", real("pagetypeinfo"))
def test_real_pageblock_order(path):
    assert P.parse_pageblock_order(path.read_text()) in (9, 10)


@pytest.mark.skipif(not os.access("/proc/pagetypeinfo", os.R_OK), reason="no readable /proc/pagetypeinfo")
def test_host_pageblock_order():
    text = Path("/proc/pagetypeinfo").read_text()
    order = P.parse_pageblock_order(text)
    per_block = int(text.split("Pages per block:")[1].split()[0])
    assert order is not None and 1 << order == per_block


@pytest.mark.parametrize("text,want", [("Y\n", "Y"), ("N", "N"), ("force\n", "force"), ("", ""), (None, "")])
def test_parse_param(text, want):
    assert P.parse_param(text) == want


def test_parse_kpageflags():
    data = struct.pack("<3Q", 0x2100000000, 0x2000000000, 0) + b"\x01\x02"
    assert P.parse_kpageflags(data) == [0x2100000000, 0x2000000000, 0]
    assert P.parse_kpageflags(b"") == []
    assert P.parse_kpageflags(b"\x00" * 7) == []
    assert P.parse_kpageflags(bytes([1, 0, 0, 0, 0, 0, 0, 0x80])) == [(1 << 63) | 1]


# --- splats and boot time ----------------------------------------------------

def test_find_splats_clean_console_has_none():
    assert P.find_splats(syn("console-clean.log")) == []


def test_find_splats_kinds_and_order():
    splats = P.find_splats(syn("console-splats.log"))
    kinds = [s.kind for s in splats]
    assert kinds == ["altmap", "warning", "bad_page", "bug", "oops", "panic", "bug"]
    warn = splats[1]
    assert warn.text.startswith("[   42.100010] WARNING: CPU: 1 PID: 88 at mm/memory_hotplug.c:1402")
    assert "\r" not in warn.text
    assert "end trace" in warn.text          # context lines follow the trigger
    assert splats[-1].text.endswith("kernel BUG at mm/memory_hotplug.c:2090!")


def test_find_splats_context_is_bounded():
    text = "WARNING: CPU: 0 PID: 1 at x.c:1 f+0x0/0x1\n" + "".join(f"line {i}\n" for i in range(100))
    (s,) = P.find_splats(text)
    assert len(s.text.splitlines()) == 1 + P.SPLAT_CONTEXT and s.line == 0


@pytest.mark.parametrize("line,kind", [
    ("<4>[    1.000000] WARNING: CPU: 0 PID: 1 at mm/x.c:1 f+0x1/0x2", "warning"),
    ("[    1.000000][    T1] BUG: unable to handle page fault for address: ffff", "bug"),
    ("Oops: general protection fault, probably for non-canonical address", "oops"),
    ("[ 1.5] Kernel panic - not syncing: VFS: Unable to mount root fs", "panic"),
    ("[    3.000000] Bad page state in process swapper", "bad_page"),
])
def test_find_splats_prefix_variants(line, kind):
    assert [s.kind for s in P.find_splats(line + "\r\n")] == [kind]


@pytest.mark.parametrize("line", ["ACPI: WARNING: foo", "x WARNING: CPU: 0", "[ 1.0] note: BUG: nope",
                                  "Kernel panic not syncing", "WARNING:no-space"])
def test_find_splats_ignores_midline(line):
    assert P.find_splats(line) == []


@pytest.mark.parametrize("path", real("console.log"))
def test_real_console_parses(path):
    for s in P.find_splats(path.read_text(errors="replace")):
        assert s.kind in ("panic", "oops", "bug", "warning", "bad_page", "altmap") and s.text


def test_parse_dmesg_boot_time():
    assert P.parse_dmesg_boot_time(syn("dmesg")) == pytest.approx(1.812345)
    assert P.parse_dmesg_boot_time(syn("console-clean.log")) == pytest.approx(1.9)
    assert P.parse_dmesg_boot_time(syn("dmesg"), marker="Built 1 zonelists") == pytest.approx(12.345678)
    assert P.parse_dmesg_boot_time("no marker here") is None
    assert P.parse_dmesg_boot_time("Run /init as init process\n") is None


@pytest.mark.parametrize("path", real("dmesg"))
def test_real_dmesg_boot_time(path):
    t = P.parse_dmesg_boot_time(path.read_text(errors="replace"))
    assert t is not None and 0 < t < 600
