"""Decoding the splat (harness.reports.decode, harness.kernels.debuginfo) without a guest: the ELF
section check, where a vmlinux is looked for, and what the email says with and without one.
The real decode (Debian's -dbg vmlinux, decode_stacktrace.sh) is tests/integration/test_replay.py."""
from __future__ import annotations

import email
import email.policy
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.kernels import debuginfo
from harness.reports import load_run, render
from harness.reports.decode import decode_all, decode_run, how_to

from reports_helpers import FAULTS


def _elf(path: Path, sections) -> Path:
    """A 64-bit little-endian ELF file holding only a section table: [(name, size)], plus .shstrtab."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n, _ in sections) + b".shstrtab\0"
    offs, pos = [], 1
    for n, _ in sections:
        offs.append(pos)
        pos += len(n) + 1
    shstr_name = pos
    data_off = 64
    shoff = data_off + len(names)
    shnum = len(sections) + 2
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x28, shoff)
    struct.pack_into("<HHH", ehdr, 0x3A, 64, shnum, shnum - 1)
    table = bytes(64)                                               # the null section
    for off, (_, size) in zip(offs, sections):
        table += struct.pack("<IIQQQQ", off, 1, 0, 0, 0, size) + bytes(24)
    table += struct.pack("<IIQQQQ", shstr_name, 3, 0, 0, data_off, len(names)) + bytes(24)
    path.write_bytes(bytes(ehdr) + names + table)
    return path


def test_debug_info_is_read_from_the_section_table(tmp_path):
    assert debuginfo.has_debug_info(_elf(tmp_path / "a", [(".text", 10), (".debug_info", 4096)]))
    assert not debuginfo.has_debug_info(_elf(tmp_path / "b", [(".text", 10), (".debug_line", 4096)]))
    assert not debuginfo.has_debug_info(_elf(tmp_path / "c", [(".debug_info", 0)]))
    (tmp_path / "d").write_bytes(b"not an elf file at all" * 10)
    assert not debuginfo.has_debug_info(tmp_path / "d")
    assert not debuginfo.has_debug_info(tmp_path / "missing")


def test_vmlinux_is_found_beside_the_image_or_in_the_tree_above(tmp_path):
    boot = tmp_path / "linux" / "arch" / "x86" / "boot"
    boot.mkdir(parents=True)
    image = boot / "bzImage"
    image.write_bytes(b"")
    cache = tmp_path / "cache"
    assert debuginfo.find_vmlinux(image, "6.1.0-x", cache) is None
    _elf(tmp_path / "linux" / "vmlinux", [(".text", 1)])            # stripped: not taken
    assert debuginfo.find_vmlinux(image, "6.1.0-x", cache) is None
    want = _elf(tmp_path / "linux" / "vmlinux", [(".debug_info", 8)])
    assert debuginfo.find_vmlinux(image, "6.1.0-x", cache) == want
    cached = debuginfo.debug_dir("6.2.0-y", cache)
    cached.mkdir(parents=True)
    hit = _elf(cached / "vmlinux-6.2.0-y", [(".debug_info", 8)])
    assert debuginfo.find_vmlinux(None, "6.2.0-y", cache) == hit


def test_debian_debug_package_name():
    assert debuginfo.debian_dbg_package("6.1.0-56-cloud-amd64") == "linux-image-6.1.0-56-cloud-amd64-dbg"
    with pytest.raises(Exception):
        debuginfo.debian_dbg_package("6.1 ; rm -rf /")


def _body(text: str) -> str:
    msg = email.message_from_string(text.split("\n", 1)[1], policy=email.policy.default)
    return msg.get_body(preferencelist=("plain",)).get_content()


def test_without_a_debug_vmlinux_the_email_says_how_to_decode(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMHP_CACHE", str(tmp_path / "cache"))
    run = load_run(FAULTS)
    out = decode_run(run)
    assert out.decode_note == how_to(run) and not any(s.decoded for s in out.scenarios)
    console = _body(render(out, "email")).split("\nConsole\n")[1].split("\nHow to reproduce\n")[0]
    note = " ".join(console.split("Not decoded")[1].split("\n\n")[0].split())
    assert "scripts/decode_stacktrace.sh" in note and "linux-image-6.12.117+deb12-cloud-amd64-dbg" in note
    assert console.count("Not decoded") == 1
    # rendered without decode_run (memhp run's own renderings), the email still says how
    assert "Not decoded" in _body(render(run, "email"))


def test_a_given_vmlinux_must_have_debug_info(tmp_path):
    run = load_run(FAULTS)
    with pytest.raises(UsageError, match="no such file"):
        decode_all(run, tmp_path / "nope")
    with pytest.raises(UsageError, match="no .debug_info"):
        decode_all(run, _elf(tmp_path / "vmlinux", [(".text", 1)]))


def test_a_decoded_excerpt_replaces_the_raw_one(tmp_path):
    run = load_run(FAULTS)
    crash = next(s for s in run.scenarios if s.outcome == "crash")
    decoded = "\n".join(x + " (drivers/tty/sysrq.c:155)" if "sysrq_handle_crash" in x else x
                        for x in crash.splat_excerpt(10, 40))
    note = "Decoded with the tree's scripts/decode_stacktrace.sh and vmlinux-x (debug info)."
    run = replace(run, decode_note=note,
                  scenarios=tuple(replace(s, decoded=decoded) if s is crash else s for s in run.scenarios))
    body = _body(render(run, "email"))
    console = body.split("\nConsole\n")[1].split("\nHow to reproduce\n")[0]
    assert "(drivers/tty/sysrq.c:155)" in console and "Not decoded" not in console
    assert "decode_stacktrace.sh" in " ".join(console.split())
    assert "(drivers/tty/sysrq.c:155)" in render(run, "html")
