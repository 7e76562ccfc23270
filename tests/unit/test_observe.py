"""harness.memory.observe's pure half on real captures: split_sections, parse_snapshot, parse_facts_output.

tests/data/debian-6.1/ and debian-6.12/ were made by scripts/capture-fixtures.py: a guest with
memmap_on_memory=1 and memhp_default_state=offline, read before (before/) and after (top
level) hot-adding one block-sized DIMM and onlining it movable. The expected relations come
from harness.memory.expect applied to the facts gather_facts() read from that same guest
(facts.json), never from numbers copied out of the capture.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.memory import expect, observe, parsers

DATA = Path(__file__).resolve().parent.parent / "data"
KERNELS = ["debian-6.1", "debian-6.12"]


class Capture:
    def __init__(self, name: str):
        self.dir = DATA / name
        if not (self.dir / "CAPTURE").exists():
            pytest.fail(f"{self.dir} has no capture: run scripts/capture-fixtures.py")
        self.meta = (self.dir / "CAPTURE").read_text()
        f = json.loads((self.dir / "facts.json").read_text())
        f["version"] = tuple(f["version"])
        self.facts = expect.KernelFacts(**f)
        m = re.search(r"size=(0x[0-9a-f]+) addr=(0x[0-9a-f]+)", self.meta)
        self.dimm_size, self.dimm_addr = int(m.group(1), 16), int(m.group(2), 16)

    def text(self, name: str, before: bool = False) -> str:
        return ((self.dir / "before" if before else self.dir) / name).read_text()

    @property
    def dimm_blocks(self):
        return expect.block_ids(self.dimm_addr, self.dimm_size, self.facts.block_size)


@pytest.fixture(params=KERNELS)
def cap(request) -> Capture:
    return Capture(request.param)


# ---------------------------------------------------------------- split_sections
def test_snapshot_cmd_reads_every_source():
    cmd = observe.snapshot_cmd()
    for f in observe.PROC_FILES:
        assert f in cmd
    assert parsers.SYSFS_DUMP_CMD in cmd and observe.SECTION in cmd


@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
def test_split_sections_real(cap, before):
    sec = observe.split_sections(cap.text("snapshot", before))
    assert list(sec) == [*observe.PROC_FILES, "sysfs"]
    # Each section parses like the file read on its own a moment apart: same keys, same blocks.
    assert set(parsers.parse_meminfo(sec["/proc/meminfo"])) == set(parsers.parse_meminfo(cap.text("meminfo", before)))
    assert set(parsers.parse_vmstat(sec["/proc/vmstat"])) == set(parsers.parse_vmstat(cap.text("vmstat", before)))
    assert set(parsers.parse_zoneinfo(sec["/proc/zoneinfo"])) == set(parsers.parse_zoneinfo(cap.text("zoneinfo", before)))
    assert parsers.parse_sysfs_dump(sec["sysfs"]) == parsers.parse_sysfs_dump(cap.text("sysfs-dump", before))
    assert not any(observe.SECTION in t for t in sec.values())


def test_split_sections_synthetic_edges():
    S = observe.SECTION
    text = f"motd junk\n{S}/proc/a\r\nx 1\r\n{S} b \n{S}c\ny\n\nz\n"
    assert observe.split_sections(text) == {"/proc/a": "x 1\n", "b": "\n", "c": "y\n\nz\n"}
    assert observe.split_sections("") == {}
    assert observe.split_sections("no markers at all\n") == {}
    # A repeated name keeps the last occurrence.
    assert observe.split_sections(f"{S}a\n1\n{S}a\n2\n") == {"a": "2\n"}


# ---------------------------------------------------------------- parse_snapshot
def test_parse_snapshot_before_and_after_agree_with_expect(cap):
    f = cap.facts
    before = observe.parse_snapshot(cap.text("snapshot", before=True))
    after = observe.parse_snapshot(cap.text("snapshot"))
    for s in (before, after):
        assert s.block_size == f.block_size
        assert s.auto_online_blocks == "offline"          # memhp_default_state=offline on the cmdline
        assert s.meminfo["MemTotal"] > 0 and s.vmstat["nr_free_pages"] > 0
        assert set(s.raw) == {*observe.PROC_FILES, "sysfs"}
    new = sorted(set(after.blocks) - set(before.blocks))
    assert new == cap.dimm_blocks, "the hot-added DIMM's blocks, from its addr and size"
    for b in new:
        blk = after.block(b)
        assert (blk.state, blk.online, blk.valid_zones, blk.phys_index) == ("online", True, ("Movable",), b)
    assert before.block(new[0]) is None

    decision = expect.decide(f, cap.dimm_size)
    assert decision.applies, decision.reason          # 128 MiB on a 64-byte struct page kernel: self-hosted
    want = expect.online_deltas(f, decision, len(new))
    mv0, mv1 = before.zone(0, "Movable"), after.zone(0, "Movable")
    got = {k: getattr(mv1, k) - getattr(mv0, k) for k in ("spanned", "present", "managed")}
    got["MemTotal"] = after.meminfo["MemTotal"] - before.meminfo["MemTotal"]
    assert got == want, decision.reason


def test_nr_memmap_pages_per_version(cap):
    f = cap.facts
    want = expect.nr_memmap_pages_delta(f, len(cap.dimm_blocks))
    b = parsers.parse_vmstat(cap.text("vmstat", before=True))
    a = parsers.parse_vmstat(cap.text("vmstat"))
    if f.version >= (6, 11, 0):
        assert want is not None and a["nr_memmap_pages"] - b["nr_memmap_pages"] == want
    else:   # 6.1 predates the counter: neither the kernel nor expect knows it
        assert want is None and "nr_memmap_pages" not in a


def test_snapshot_missing_things_are_empty_not_errors():
    s = observe.parse_snapshot("")
    assert s.meminfo == {} and s.zones == {} and s.blocks == {} and s.block_size is None
    assert s.zone(3, "Movable") == parsers.Zone(0, 0, 0, 0) and s.block(32) is None
    part = observe.parse_snapshot(f"{observe.SECTION}/proc/meminfo\nMemTotal: 10 kB\n")
    assert part.meminfo == {"MemTotal": 10} and part.vmstat == {}


# ---------------------------------------------------------------- parse_facts_output / facts_from
@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
def test_parse_facts_output_real(cap, before):
    f = cap.facts
    out = observe.parse_facts_output(cap.text("facts", before))
    assert out.release == f.release
    # The version gates read the kernel's version as the facts reader does: uname -r, or Debian's
    # package version from /proc/version when uname -r has no sublevel (6.1.0-NN-cloud-amd64).
    assert out.proc_version.startswith("Linux version " + f.release + " ")
    assert expect.kernel_version(out.release, out.proc_version) == (f.version, f.version_source)
    if expect.parse_release(out.release)[2] == 0:
        assert f.version_source == "/proc/version (Debian package version)"
        assert f" Debian {'.'.join(map(str, f.version))}-" in out.proc_version
    else:
        assert (f.version, f.version_source) == (expect.parse_release(out.release), "uname -r")
    assert parsers.parse_block_size(out.block_size) == f.block_size
    assert parsers.parse_pageblock_order(out.pagetypeinfo) == f.pageblock_order
    assert out.param == f.param == "Y"
    assert out.has_btf is (f.struct_page_source == "btf")
    # Debian's kernels have no /proc/config.gz (IKCONFIG off): the config came from the host file.
    assert out.config is None and f.mhp_memmap_config is True


def test_facts_from_real_capture_match_what_gather_facts_recorded(cap):
    """facts_from() on the captured output gives the facts gather_facts() recorded for that guest."""
    out = observe.parse_facts_output(cap.text("facts"))
    f = observe.facts_from(out, cap.facts.struct_page_size, "CONFIG_MEMCG=y\nCONFIG_MHP_MEMMAP_ON_MEMORY=y\n")
    assert (f.release, f.block_size, f.struct_page_size, f.struct_page_source, f.pageblock_order, f.param,
            f.mhp_memmap_config) == (cap.facts.release, cap.facts.block_size, cap.facts.struct_page_size, "btf",
                                     cap.facts.pageblock_order, cap.facts.param, True)


OUT = ("6.12.1\n@@\n80000000\n@@\nPage block order: 10\n@@\nforce\n@@\n\n@@\n@config\n"
       "CONFIG_MEMCG=y\nCONFIG_MHP_MEMMAP_ON_MEMORY=y\n@@\nLinux version 6.12.1\n@@\nconsole=ttyS0\n@@\n")


def test_parse_facts_output_sections():
    out = observe.parse_facts_output(OUT)
    assert (out.release, parsers.parse_block_size(out.block_size), parsers.parse_pageblock_order(out.pagetypeinfo),
            out.param, out.has_btf) == ("6.12.1", 2 << 30, 10, "force", False)
    assert out.config.splitlines() == ["CONFIG_MEMCG=y", "CONFIG_MHP_MEMMAP_ON_MEMORY=y"]
    assert (out.proc_version, out.cmdline) == ("Linux version 6.12.1", "console=ttyS0")
    assert observe.parse_facts_output(OUT.replace("force\n", observe.ABSENT + "\n")).param is None
    empty = observe.parse_facts_output("")
    assert (empty.release, empty.param, empty.config, empty.has_btf) == ("", "", None, False)


def test_facts_from_config_when_no_btf():
    f = observe.facts_from(observe.parse_facts_output(OUT), None, None)
    assert (f.struct_page_size, f.struct_page_source, f.pageblock_order, f.param) == (64, "config (/proc/config.gz)", 10, "force")
    f = observe.facts_from(observe.parse_facts_output(OUT), None, "# CONFIG_MEMCG is not set\n", "/k/config")
    assert (f.struct_page_size, f.struct_page_source, f.mhp_memmap_config) == (56, "config (/k/config)", False)


@pytest.mark.parametrize("broken,where", [
    (lambda t: t.replace("80000000", ""), "block_size_bytes"),
    (lambda t: t.replace("Page block order: 10", ""), "/proc/pagetypeinfo"),
    (lambda t: t.replace("6.12.1\n@@", "junk\n@@", 1), "uname -r"),
    (lambda t: t.replace("@config\nCONFIG_MEMCG=y\nCONFIG_MHP_MEMMAP_ON_MEMORY=y\n", ""), "/proc/config.gz"),
])
def test_facts_from_never_assumes_a_missing_fact(broken, where):
    """No assumed 64-byte struct page, no pageblock order 0, no block size 0: the error names where memhp looked."""
    with pytest.raises(observe.FactUnavailable, match=re.escape(where)):
        observe.facts_from(observe.parse_facts_output(broken(OUT)), None, None)


def test_facts_from_absent_parameter_and_hvo():
    f = observe.facts_from(observe.parse_facts_output(OUT.replace("force\n", observe.ABSENT + "\n")), 64, None)
    assert f.param == "" and "no memory_hotplug.memmap_on_memory parameter" in expect.feature_unavailable(f)
    old = OUT.replace("6.12.1\n@@", "5.19.0\n@@", 1)
    with pytest.raises(observe.FactUnavailable, match="HugeTLB vmemmap"):
        observe.facts_from(observe.parse_facts_output(old.replace("@config\nCONFIG_MEMCG=y\nCONFIG_MHP_MEMMAP_ON_MEMORY=y\n", "")), 64, None)
    assert observe.hugetlb_vmemmap_enabled((5, 19, 0), "", "1", None) is True
    assert observe.hugetlb_vmemmap_enabled((5, 15, 0), "a hugetlb_free_vmemmap=on b", "", None) is True
    assert observe.hugetlb_vmemmap_enabled((5, 15, 0), "", "", "CONFIG_HUGETLB_PAGE_FREE_VMEMMAP_DEFAULT_ON=y\n") is True
    assert observe.hugetlb_vmemmap_enabled((5, 15, 0), "", "", "") is False
    assert observe.hugetlb_vmemmap_enabled((6, 1, 0), "hugetlb_free_vmemmap=on", "1", None) is None


class _FakeGuest:
    """The two calls gather_facts makes; the BTF bytes are a real-format blob."""

    def __init__(self, text: str, btf: bytes):
        self.text, self.btf, self.reads = text, btf, []

    def run(self, cmd, timeout=0, check=False):
        class R:
            stdout = self.text
        return R()

    def read_file_bytes(self, path):
        self.reads.append(path)
        return self.btf


def test_gather_facts_does_not_swallow_a_failed_btf_read():
    class Broken(_FakeGuest):
        def read_file_bytes(self, path):
            raise observe.InfraError("transport died")
    text = OUT.replace("@@\n\n@@\n@config", "@@\n/sys/kernel/btf/vmlinux\n@@\n@config").replace("6.12.1", "6.12.99")
    with pytest.raises(observe.InfraError, match="transport died"):
        observe.gather_facts(Broken(text, b""))


def test_capture_console_and_dmesg_are_clean(cap):
    """The captures are of a correct kernel: no splat on the console or in dmesg."""
    assert parsers.find_splats(cap.text("console.log")) == []
    assert parsers.find_splats(cap.text("dmesg")) == []
    assert parsers.parse_dmesg_boot_time(cap.text("dmesg")) is not None
