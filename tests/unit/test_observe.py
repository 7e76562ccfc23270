"""harness.observe's pure half on real captures: split_sections, parse_snapshot, parse_facts_output.

tests/data/debian-6.1/ and debian-6.12/ were made by scripts/capture-fixtures.py: a guest with
memmap_on_memory=1 and memhp_default_state=offline, read before (before/) and after (top
level) hot-adding one block-sized DIMM and onlining it movable. The expected relations come
from harness.expect applied to the facts gather_facts() read from that same guest
(facts.json), never from numbers copied out of the capture.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness import expect, observe, parsers

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


# ---------------------------------------------------------------- parse_facts_output
@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
def test_parse_facts_output_real(cap, before):
    f = cap.facts
    release, bs, pbo, param, has_btf, cfg = observe.parse_facts_output(cap.text("facts", before))
    assert release == f.release and expect.parse_release(release) == f.version
    assert parsers.parse_block_size(bs) == f.block_size
    assert parsers.parse_pageblock_order(pbo) == f.pageblock_order
    assert parsers.parse_param(param) == f.param == "Y"
    assert has_btf is (f.struct_page_source == "btf")
    # Debian's kernels have no /proc/config.gz (IKCONFIG off): the config came from the host file.
    assert cfg == "" and f.mhp_memmap_config is True


def test_parse_facts_output_pads_and_tolerates():
    assert observe.parse_facts_output("") == ("", "", "", "", False, "")
    assert observe.parse_facts_output("6.1.0\n@@\n8000000\n") == ("6.1.0", "8000000", "", "", False, "")
    out = ("6.12.1\n@@\n80000000\n@@\nPage block order: 10\n@@\nforce\n@@\n\n@@\n"
           "CONFIG_MEMCG=y\nCONFIG_MHP_MEMMAP_ON_MEMORY=y\n")
    release, bs, pbo, param, has_btf, cfg = observe.parse_facts_output(out)
    assert (release, parsers.parse_block_size(bs), parsers.parse_pageblock_order(pbo), param, has_btf) == \
        ("6.12.1", 2 << 30, 10, "force", False)
    assert cfg.splitlines() == ["CONFIG_MEMCG=y", "CONFIG_MHP_MEMMAP_ON_MEMORY=y"]


def test_capture_console_and_dmesg_are_clean(cap):
    """The captures are of a correct kernel: no splat on the console or in dmesg."""
    assert parsers.find_splats(cap.text("console.log")) == []
    assert parsers.find_splats(cap.text("dmesg")) == []
    assert parsers.parse_dmesg_boot_time(cap.text("dmesg")) is not None
