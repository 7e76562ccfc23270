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


def _gz(elf: bytes) -> bytes:
    """A gzip payload as the kernel's build makes it (cmd_gzip): the stream alone; its ISIZE
    trailer is the length, the build appends none (the other compressors get size_append)."""
    return gzip.compress(elf, 9)


def _xz(elf: bytes, size: int = -1) -> bytes:
    return lzma.compress(elf) + struct.pack("<I", len(elf) if size < 0 else size)


def _bzimage(payload: bytes, setup_sects: int = 4) -> bytes:
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", head, 0x248, 16, len(payload))
    return bytes(head) + bytes(16) + payload + b"tail"


@pytest.mark.parametrize("compress", [_gz, _xz], ids=["gzip", "xz"])
def test_pvh_extracts_the_payload_and_finds_the_note(compress):
    elf = _elf_with_note(pvh.XEN_ELFNOTE_PHYS32_ENTRY)
    data = compress(elf)
    assert pvh.payload(_bzimage(data)) == data
    assert pvh.decompress(data) == elf
    assert pvh.has_pvh_note(elf)
    assert not pvh.has_pvh_note(_elf_with_note(pvh.XEN_ELFNOTE_PHYS32_ENTRY + 1))


def test_pvh_refuses_a_wrong_size_and_a_non_bzimage():
    elf = _elf_with_note(pvh.XEN_ELFNOTE_PHYS32_ENTRY)
    with pytest.raises(KernelError, match="bzImage says"):
        pvh.decompress(_xz(elf, size=len(elf) + 1))
    with pytest.raises(KernelError, match="not a bzImage"):
        pvh.payload(bytes(4096))
    with pytest.raises(KernelError, match="does not unpack"):
        pvh.decompress(b"\x1f\x8b" + bytes(20) + struct.pack("<I", 99))


def test_pvh_vmlinux_cached_or_none(tmp_path):
    elf = _elf_with_note(pvh.XEN_ELFNOTE_PHYS32_ENTRY)
    bz = tmp_path / "bzImage"
    bz.write_bytes(_bzimage(_gz(elf)))
    out = pvh.pvh_vmlinux(bz, cache=tmp_path / "cache")
    assert out is not None and out.read_bytes() == elf
    assert pvh.pvh_vmlinux(bz, cache=tmp_path / "cache") == out
    plain = _elf_with_note(1)
    bz.write_bytes(_bzimage(_gz(plain)))
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


# ---------------------------------------------------------------- build phases (kbuild records them)

from pathlib import Path

from harness.kernels import buildphases

MAKE_6_1 = Path(__file__).resolve().parents[1] / "data" / "kbuild" / "make-bzImage-6.1.txt"


def _timed(text: str, step: float = 1.0):
    """Captured make output with synthetic arrival times: line i arrives at 100 + i*step."""
    return [(100.0 + i * step, line) for i, line in enumerate(text.splitlines())]


def test_split_make_at_the_first_vmlinux_line_of_a_real_6_1_build():
    text = MAKE_6_1.read_text()
    lines = _timed(text)
    end = lines[-1][0] + 0.5
    compile_s, link_s = buildphases.split_make(lines, 99.0, end)
    at = next(i for i, (_, line) in enumerate(lines)
              if line.split()[:1] in (["AR"], ["LD"]) and line.split()[-1:] in (["vmlinux.a"], ["vmlinux.o"]))
    assert compile_s == pytest.approx(lines[at][0] - 99.0) and link_s == pytest.approx(end - lines[at][0])
    assert compile_s + link_s == pytest.approx(end - 99.0)
    before, after = [line for _, line in lines[:at]], [line for _, line in lines[at:]]
    # Before the split: the tree's objects, never a vmlinux; after it: only the vmlinux links and the
    # bzImage's own setup/decompressor objects are compiled.
    assert any(line.split()[:1] == ["CC"] for line in before)
    assert not any(line.split()[-1:] in (["vmlinux"], ["vmlinux.o"], ["vmlinux.a"]) for line in before)
    late_cc = [line.split()[1] for line in after if line.split()[:1] == ["CC"]]
    # init/version-timestamp.o is compiled by the vmlinux link itself (scripts/Makefile.vmlinux).
    assert late_cc and all(obj.startswith("arch/x86/boot/") or obj == "init/version-timestamp.o"
                           for obj in late_cc), late_cc
    assert any(line.split()[-1:] == ["vmlinux"] for line in after)
    assert any("bzImage is ready" in line for line in after)


def test_split_make_without_a_link_line_is_all_compile():
    lines = _timed("  CALL    scripts/checksyscalls.sh\n  DESCEND objtool\n")
    assert buildphases.split_make(lines, 100.0, 130.0) == (30.0, 0.0)
    # An older tree links vmlinux.o directly (no vmlinux.a): that line starts the link.
    lines = _timed("  CC      mm/a.o\n  LD      vmlinux.o\n  LD      vmlinux\n")
    assert buildphases.split_make(lines, 100.0, 110.0) == (1.0, 9.0)


def test_phase_note_round_trips_and_the_last_one_wins():
    note = buildphases.format_note({"link": 20.04, "prepare": 1.0, "config": 3.25, "compile": 150.0})
    assert note == "# memhp phases: prepare=1.0s config=3.2s compile=150.0s link=20.0s"
    log = f"$ make\n{buildphases.format_note({'compile': 9.0})}\nmore\n{note}\n"
    assert buildphases.parse_note(log) == {"prepare": 1.0, "config": 3.2, "compile": 150.0, "link": 20.0}
    assert buildphases.parse_note("$ make bzImage\n  CC  a.o\n") is None


def test_line_clock_passes_lines_on_and_times_them(tmp_path):
    from harness import host
    lines: list = []
    with open(tmp_path / "log", "w") as sink:
        with buildphases.LineClock(sink, lines) as pipe:
            r = host.run(["sh", "-c", "echo '  CC      a.o'; echo '  AR      vmlinux.a'"], log=pipe, timeout=30)
    assert r.returncode == 0
    assert (tmp_path / "log").read_text() == "  CC      a.o\n  AR      vmlinux.a\n"
    assert [line for _, line in lines] == ["  CC      a.o", "  AR      vmlinux.a"]
    assert lines[0][0] <= lines[1][0]


def test_one_file_patch_applies_with_patch_p1(tmp_path):
    import subprocess
    tree = tmp_path / "tree"
    (tree / "mm").mkdir(parents=True)
    (tree / "mm" / "memory_hotplug.c").write_text("int a;\nint b;\n")
    patch = tmp_path / "p.patch"
    patch.write_text(bench.one_file_patch(tree))
    r = subprocess.run(["patch", "-p1", "-i", str(patch)], cwd=tree, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tree / "mm" / "memory_hotplug.c").read_text() == "int a;\nint b;\n" + bench.REBUILD_LINE


def test_last_line_keeps_its_fields_and_appends_the_build_figures():
    figs = {"ssh_ready_ratio": 1.234, "serial_ready_ratio": 1.2, "suite_ratio": 50.04}
    assert bench.last_line(figs, 3, "6.12.1") == \
        "ssh_ready_ratio=1.23 suite_ratio=50.0 serial_ready_ratio=1.20 runs=3 kernel=6.12.1"
    only_build = {"cold_build_s": 200.04, "rebuild_s": 8.06, "build_load": 2.5}
    assert bench.last_line(only_build, 0, "n/a") == ("ssh_ready_ratio=n/a suite_ratio=n/a serial_ready_ratio=n/a "
                                                     "runs=0 kernel=n/a cold_build_s=200.0 rebuild_s=8.1 "
                                                     "build_load5=2.50")


@pytest.mark.parametrize("text,models", [(None, [None]), ("max", ["max"]), ("max,qemu64", ["max", "qemu64"]),
                                         ("Skylake-Client-v4", ["Skylake-Client-v4"])])
def test_parse_cpus(text, models):
    assert bench.parse_cpus(text) == models


@pytest.mark.parametrize("text", ["", "max,", "max,max", "a b", "max;reboot", "-cpu"])
def test_parse_cpus_refuses(text):
    from harness.errors import UsageError
    with pytest.raises(UsageError):
        bench.parse_cpus(text)


# ---------------------------------------------------------------- the default -kernel (PVH)

def test_entry_image_pvh_by_default_bzimage_as_fallback_and_opt_out(tmp_path, monkeypatch, capsys):
    from harness.kernels.artifact import KernelArtifact
    from harness.vm.guest import entry_image
    monkeypatch.setenv("MEMHP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEMHP_ENTRY", raising=False)
    elf = _elf_with_note(pvh.XEN_ELFNOTE_PHYS32_ENTRY)
    bz = tmp_path / "bzImage"
    bz.write_bytes(_bzimage(_gz(elf)))
    k = KernelArtifact(spec="x", image=bz, config=None, modules=None, release="6.12.0")
    pvh_file = entry_image(k)
    assert pvh_file != bz and pvh_file.read_bytes() == elf
    monkeypatch.setenv("MEMHP_ENTRY", "bzimage")
    assert entry_image(k) == bz
    monkeypatch.setenv("MEMHP_ENTRY", "pvh")
    assert entry_image(k) == pvh_file
    # No PVH note: the bzImage, silently (the kernel simply has no CONFIG_PVH).
    plain = tmp_path / "plain"
    plain.write_bytes(_bzimage(_gz(_elf_with_note(1))))
    kp = KernelArtifact(spec="x", image=plain, config=None, modules=None, release="6.12.0")
    assert entry_image(kp) == plain
    # A payload that cannot be unpacked: the bzImage, with a warning naming the file.
    broken = tmp_path / "broken"
    broken.write_bytes(_bzimage(b"\x1f\x8b" + bytes(20) + struct.pack("<I", 99)))
    kb = KernelArtifact(spec="x", image=broken, config=None, modules=None, release="6.12.0")
    capsys.readouterr()
    assert entry_image(kb) == broken
    assert "booting the bzImage" in capsys.readouterr().err
