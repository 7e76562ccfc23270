"""Pure logic of scenario suite part B: add-refusal detection, leak-check arithmetic, selftest judging."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness import expect as E
from harness import leakcheck, selftest
from harness.errors import CheckFailed, KernelError
from harness.parsers import add_refusal_line

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
    with pytest.raises(CheckFailed):       # missing data is never a number inside a band
        leakcheck.free_kb({}, ZONEINFO)


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
