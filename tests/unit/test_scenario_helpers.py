"""Pure logic of scenario suite part B: add-refusal detection, leak-check arithmetic, selftest judging."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.memory import expect as E
from harness.memory import leakcheck
from harness.kernels import selftest
from harness.errors import CheckFailed, KernelError
from harness.memory.checks import MissingData
from harness.memory.parsers import add_refusal_line

DATA = Path(__file__).resolve().parent.parent / "data"
MiB = 1024 * 1024


# --- hotplug.add_refusal_line (captured 6.12 dmesg) ----------------------------------------

def test_refusal_line_names_the_range():
    dmesg = (DATA / "hotplug" / "dmesg-unaligned-6.12.txt").read_text()
    line = add_refusal_line(dmesg, 0x100000000, 64 * MiB)
    assert line is not None and line.endswith(
        "Block size [0x8000000] unaligned hotplug range: start 0x100000000, size 0x4000000")


def test_refusal_line_other_range_falls_back_to_generic_only_after_mark():
    dmesg = (DATA / "hotplug" / "dmesg-unaligned-6.12.txt").read_text()
    n = len(dmesg.split("\n")) - 1
    # another DIMM (other address): the ranged line does not match; the generic one counts
    # only when it is newer than the mark
    assert add_refusal_line(dmesg, 0x108000000, 64 * MiB, after_line=n) is None
    line = add_refusal_line(dmesg, 0x108000000, 64 * MiB, after_line=0)
    assert line is not None and "add_memory failed" in line


def test_refusal_line_none_on_clean_or_empty():
    assert add_refusal_line("", 0x100000000, 128 * MiB) is None
    assert add_refusal_line(None, 0x100000000, 128 * MiB) is None
    assert add_refusal_line("[ 1.0] acpi PNP0C80:00: enabled\n", 0x100000000, 128 * MiB) is None


# --- leakcheck ---------------------------------------------------------------------------

ZONEINFO = """Node 0, zone      DMA
  pages free     3840
        min      12
  pagesets
    cpu: 0
              count: 5
              high:  0
              batch: 1
  vm stats threshold: 4
    cpu: 1
              count: 7
              high:  0
              batch: 1
  vm stats threshold: 4
  node_unreclaimable:  0
  start_pfn:           1
Node 0, zone    DMA32
  pages free     200000
  pagesets
    cpu: 0
              count: 1000
              high:  1500
              batch: 63
  vm stats threshold: 24
    cpu: 1
              count: 234
              high:  1500
              batch: 63
  vm stats threshold: 24
  node_unreclaimable:  0
  start_pfn:           4096
"""


def test_pcp_pages_sums_every_cpu_of_every_zone():
    assert leakcheck.pcp_pages(ZONEINFO) == 5 + 7 + 1000 + 234
    assert leakcheck.pcp_pages(ZONEINFO.replace("\n", "\r\n")) == 1246
    assert leakcheck.pcp_pages("") == 0 and leakcheck.pcp_pages(None) == 0


def test_pcp_pages_on_synthetic_zoneinfo_files():
    for name in ("zoneinfo", "zoneinfo-6.12"):
        text = (DATA / "synthetic" / name).read_text()
        counts = [int(ln.split()[1]) for ln in text.splitlines() if ln.strip().startswith("count:")]
        assert counts, name
        assert leakcheck.pcp_pages(text) == sum(counts)


def test_free_kb_adds_pcp_pages_in_kb():
    assert leakcheck.free_kb({"MemFree": 1000}, ZONEINFO) == 1000 + 1246 * 4
    # missing data is never a number inside a band: nothing read is INFRA, a meminfo without MemFree a FAIL
    with pytest.raises(MissingData, match="nothing was read"):
        leakcheck.free_kb({}, ZONEINFO)
    with pytest.raises(CheckFailed, match="MemFree"):
        leakcheck.free_kb({"MemTotal": 1000}, ZONEINFO)


def test_drift_skips_missing_and_none():
    assert leakcheck.drift({"a": 1, "b": None, "c": 5, "l": [1]}, {"a": 4, "b": 2, "d": 1, "l": [2]}) == {"a": 3}
    assert leakcheck.drift({"a": 1}, {"a": 1}, keys=["a", "z"]) == {"a": 0}


# --- selftest ----------------------------------------------------------------------------

@pytest.mark.parametrize("version,line", [((6, 1, 0), "6.1"), ((6, 12, 117), "6.12"), ((5, 10), "5.10")])
def test_kernel_line(version, line):
    assert selftest.kernel_line(version) == line


@pytest.mark.parametrize("bad", [(), (0, 0, 0), (6,), None])
def test_kernel_line_rejects_unknown(bad):
    with pytest.raises(KernelError):
        selftest.kernel_line(bad)


def test_parse_apt_candidate():
    policy = ("linux-source-6.1:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  Version table:\n"
              "     6.1.192-2 500\n")
    assert selftest.parse_apt_candidate(policy) == "6.1.192-2"
    assert selftest.parse_apt_candidate("x:\n  Installed: (none)\n  Candidate: (none)\n") is None
    assert selftest.parse_apt_candidate("") is None


def test_debver_sort_is_numeric():
    names = ["linux-source-6.1_6.1.99-1", "linux-source-6.1_6.1.192-2", "linux-source-6.1_6.1.176-1"]
    assert sorted(names, key=selftest._debver_key)[-1] == "linux-source-6.1_6.1.192-2"


def test_judge_real_pass_output():
    out = (DATA / "selftest" / "mem-on-off-6.1.192-pass.txt").read_text()
    j = selftest.judge(0, out)
    assert j.ok and j.status == "pass" and j.extra_ran
    assert j.skip_reasons == () and j.failures == ()
    assert j.offline_results == ("-> Failure", "-> Success")


def test_judge_skip_all_is_skip():
    j = selftest.judge(4, "skip all tests: no hot-pluggable memory\n")
    assert j.status == "skip" and not j.ok
    assert j.skip_reasons == ("skip all tests: no hot-pluggable memory",)


def test_judge_extra_skipped_exits_zero_but_says_so():
    out = ("Test scope: 2% hotplug memory\n\t Test with memory notifier error injection\n"
           "skip extra tests: memory-notifier-error-inject module is not available\n")
    j = selftest.judge(0, out)
    assert j.status == "pass" and not j.extra_ran
    assert j.skip_reasons == ("skip extra tests: memory-notifier-error-inject module is not available",)


def test_judge_debugfs_missing_expects_exit_zero():
    """A clean kernel without DEBUG_FS: the script skips its second half and exits $retval = 0.
    The scenario used to expect 4 there (a false FAIL); the expectation now follows the script."""
    out = ("Test scope: 2% hotplug memory\n\t online all hot-pluggable memory in offline state:\n"
           "\t Test with memory notifier error injection\nskip extra tests: debugfs is not mounted\n")
    j = selftest.judge(0, out)
    assert (j.status, j.expected_exit, j.extra_ran) == ("pass", selftest.KSFT_PASS, False)
    assert selftest.judge(4, "skip all tests: no hot-pluggable memory\n").expected_exit == selftest.KSFT_SKIP
    assert selftest.judge(0, "online_memory_expect_success 33: unexpected fail\n").expected_exit == selftest.KSFT_FAIL


def test_judge_failures():
    out = ("online_memory_expect_success 33: unexpected fail\n"
           "\t\t FAILED - unable to offline some memory blocks, device busy?\n")
    j = selftest.judge(1, out)
    assert j.status == "fail" and len(j.failures) == 2
    assert selftest.judge(2, "").status == "fail"


# --- test_multiblock's pure rules (issue 9, missing invariants) ------------------------------

def _mb_facts(version=(6, 12, 0)):
    return E.KernelFacts(release=".".join(map(str, version)), version=version, block_size=128 * MiB,
                         struct_page_size=64, struct_page_source="btf", pageblock_order=9, param="Y")


def test_multiblock_zone_counters_span_holes_and_vmemmap():
    from harness.scenarios import test_multiblock as mb
    f = _mb_facts()
    dec = E.decide(f, E.GiB)
    assert dec.applies
    bp, vm = f.block_pages, dec.vmemmap_pages_per_block
    # blocks 32..39 with 33, 34 and 39 offline: span 32..38, five blocks present
    got = mb.zone_counters(f, dec, [32, 35, 36, 37, 38])
    assert got == {"spanned": 7 * bp, "present": 5 * bp, "managed": 5 * (bp - vm)}
    assert mb.zone_counters(f, dec, []) == {"spanned": 0, "present": 0, "managed": 0}
    off = E.decide(_mb_facts((6, 1, 0)), E.GiB)               # 6.1: no split, memmap from boot RAM
    assert not off.applies and mb.zone_counters(f, off, [32])["managed"] == bp


def test_multiblock_default_zone_follows_default_zone_for_pfn():
    from harness.scenarios import test_multiblock as mb
    assert mb.offline_valid_zones(33, [], []) == ("Normal", "Movable")          # no zone spans it
    assert mb.offline_valid_zones(33, [], [32, 34]) == ("Movable", "Normal")    # inside Movable's span
    assert mb.offline_valid_zones(35, [], [32, 34]) == ("Normal", "Movable")    # just past it
    assert mb.default_zone(33, [32, 34], [33]) == "Normal"                      # both span it: kernel zone
    assert mb.default_zone(33, [32, 34], []) == "Normal"


def test_multiblock_reserved_and_bit37_per_version():
    from harness.scenarios import test_multiblock as mb
    assert mb.vmemmap_reserved((6, 1, 0)) and not mb.vmemmap_reserved((6, 12, 0))
    f = _mb_facts()
    dec = E.decide(f, f.block_size)
    pfns = mb.expected_bit37(f, {33: dec, 32: dec})
    assert pfns[0] == 32 * f.block_pages and len(pfns) == 2 * dec.vmemmap_pages_per_block
    assert pfns[dec.vmemmap_pages_per_block] == 33 * f.block_pages
    assert mb.bits({1: 1 << 37, 2: 1 << 32, 3: (1 << 37) | (1 << 32)}, 37) == [1, 3]
