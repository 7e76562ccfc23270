"""Pure helpers of harness/scenarios/_common.py: per-cpu free pages, node lists, pfn spans."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.memory.checks import MissingData
from harness.errors import CheckFailed, Hang
from harness.memory.observe import parse_snapshot
from harness.scenarios import _common as C

DATA = Path(__file__).resolve().parents[1] / "data"

# mm/vmstat.c zoneinfo_show_print(): per cpu "\n    cpu: %i\n              count: %i\n ..."
ZONEINFO = """Node 0, zone      DMA
  pages free     3840
        managed  3840
  pagesets
    cpu: 0
              count: 0
              high:  0
              batch: 1
    cpu: 1
              count: 3
              high:  0
              batch: 1
  node_unreclaimable:  0
Node 0, zone    DMA32
  pages free     200000
  pagesets
    cpu: 0
              count: 2948
              high:  3080
              batch: 63
    cpu: 1
              count: 512
              high:  3080
              batch: 63
  vm stats threshold: 24
"""


def test_pcp_pages_sums_every_cpu_of_every_zone():
    assert C.pcp_pages(ZONEINFO) == 0 + 3 + 2948 + 512


def test_pcp_pages_on_the_synthetic_fixture_and_odd_input():
    assert C.pcp_pages((DATA / "synthetic" / "zoneinfo").read_text()) == 4 * 17
    assert C.pcp_pages("") == 0
    assert C.pcp_pages(None) == 0
    assert C.pcp_pages(ZONEINFO.replace("\n", "\r\n")) == 3463   # serial console line ends
    assert C.pcp_pages("              count: x\n    nr_free_pages 5\n") == 0


def test_free_kb_adds_the_per_cpu_lists_to_memfree():
    text = ("@@memhp-section /proc/meminfo\nMemTotal: 1000000 kB\nMemFree: 500000 kB\n"
            "@@memhp-section /proc/zoneinfo\n" + ZONEINFO)
    snap = parse_snapshot(text)
    assert C.free_kb(snap) == 500000 + 4 * 3463


def test_free_kb_raises_on_missing_memfree():
    """A missing MemFree used to read as 0, inside the "on" band: now it raises. One rule for both
    helpers (checks.need_field): nothing read is MissingData (INFRA); a /proc/meminfo that was read
    but lacks the field is the kernel no longer providing it (CheckFailed, FAIL)."""
    with pytest.raises(MissingData, match="MemFree"):
        C.free_kb(parse_snapshot(""))
    with pytest.raises(MissingData, match="MemTotal"):
        C.memtotal(parse_snapshot(""))
    read = parse_snapshot("@@memhp-section /proc/meminfo\nMemTotal: 1000000 kB\n")
    with pytest.raises(CheckFailed, match="MemFree"):
        C.free_kb(read)
    assert C.memtotal(read) == 1000000
    with pytest.raises(CheckFailed, match="MemTotal"):
        C.memtotal(parse_snapshot("@@memhp-section /proc/meminfo\nMemFree: 5 kB\n"))


def test_node_list():
    assert C.node_list("0") == {0}
    assert C.node_list("0-1\n") == {0, 1}
    assert C.node_list("0,2-3,7") == {0, 2, 3, 7}
    assert C.node_list("") == set()
    assert C.node_list("junk,1") == {1}


def test_pfn_span():
    assert C.pfn_span([]) == "none"
    assert C.pfn_span(range(0x100000, 0x100200)) == "0x100000..0x1001ff (512 pages)"
    assert C.pfn_span([1, 3]) == "2 pages: 0x1, 0x3"
    assert C.pfn_span(list(range(0, 20, 2))).endswith(", ...")


# ---------------------------------------------------------------- blocks: FAIL vs HANG at a deadline
class _Console:
    def tail(self, n):
        return "last console line"


class _Machine:
    console = _Console()


class _Res:
    def __init__(self, stdout="", status=0):
        self.stdout, self.status = stdout, status

    @property
    def ok(self):
        return self.status == 0

    def check(self):
        return self


class _Guest:
    """memory32 stays in sysfs, offline; `answers` decides whether `true` runs."""
    machine = _Machine()

    def __init__(self, answers: bool):
        self.answers = answers

    def run(self, cmd, timeout=0, check=False):
        if cmd == "true":
            if not self.answers:
                raise Hang("true", timeout=timeout)
            return _Res()
        return _Res("32 offline\n")


def test_blocks_that_stay_after_delete_are_a_fail_when_the_guest_answers():
    from harness.memory import blocks
    with pytest.raises(CheckFailed) as ei:
        blocks.wait_blocks(_Guest(True), [32], present=False, timeout=0.2)
    assert ei.value.expected == "memory32 gone"
    assert ei.value.observed == "memory32 present (state offline)"
    assert "DEVICE_DELETED" in ei.value.rule


def test_blocks_that_stay_are_a_hang_when_the_guest_is_silent(monkeypatch):
    from harness.memory import blocks
    with pytest.raises(Hang) as ei:
        blocks.wait_blocks(_Guest(False), [32], present=False, timeout=0.2)
    assert not isinstance(ei.value, CheckFailed)
    assert ei.value.console_tail == "last console line" and "memory32 present" in ei.value.last_seen


# ---------------------------------------------------------------- facts_as_booted, require_feature, self-hosted count
def _facts(version=(6, 12, 117), param="Y", sps=64):
    from harness.memory import expect
    return expect.KernelFacts(release="%d.%d.%d" % version, version=version, block_size=128 << 20,
                              struct_page_size=sps, struct_page_source="btf", pageblock_order=9, param=param)


class _VM:
    def __init__(self, asked, facts):
        from harness.vm.qemu_argv import GuestConfig
        self.config = GuestConfig(memmap_on_memory=asked)
        self.facts = facts


def test_facts_as_booted_reads_the_value_from_vm_config():
    assert C.facts_as_booted(_VM("1", _facts())).param == "Y"
    assert C.facts_as_booted(_VM("Force", _facts(param="N"))).param == "N"     # 6.6+: only force/FORCE
    with pytest.raises(CheckFailed, match="=1"):
        C.facts_as_booted(_VM("1", _facts(param="N")))                          # the kernel ignored it
    with pytest.raises(CheckFailed):
        C.facts_as_booted(_VM("force", _facts((6, 1, 0), param="force")))


def test_require_feature_skips_with_the_reason_and_records_it():
    seen = {}
    C.require_feature(_facts(), lambda k, v: seen.setdefault(k, v))
    assert seen == {}
    with pytest.raises(pytest.skip.Exception, match="struct page is 56 bytes"):
        C.require_feature(_facts(sps=56), lambda k, v: seen.setdefault(k, v))
    assert "not PMD-aligned" in seen["feature_unavailable"]


def test_record_self_hosted_counts_blocks_from_observed_pages():
    seen = {}
    assert C.record_self_hosted(lambda k, v: seen.setdefault(k, v), _facts(), 8 * 512) == 8
    assert seen == {"self_hosted_blocks": 8}
    assert C.record_self_hosted(lambda k, v: None, _facts(), 0) == 0


def test_pool_names_what_a_test_left_behind():
    from harness.plugin import SharedGuests

    class Qmp:
        def __init__(self, devs):
            self.devs = devs

        def execute(self, cmd, args=None):
            assert cmd == "query-memory-devices"
            return [{"type": "dimm", "data": {"id": d}} for d in self.devs]

    class Guest:
        def __init__(self, ls):
            self.ls = ls

        def run(self, cmd, timeout=0, check=False):
            return _Res(self.ls)

    class VM:
        def __init__(self, devs, ls):
            from harness.vm.qemu_argv import GuestConfig
            self.config, self.qmp, self.guest = GuestConfig(), Qmp(devs), Guest(ls)

    pool = SharedGuests(None, None, "tcg", Path("/nonexistent"), "m")
    clean = VM([], "block_size_bytes memory0 memory1 power\n")
    pool.baseline[clean.config] = (0, 1)
    assert pool.leftovers(clean) == ""
    left = VM(["dimm7"], "memory0 memory1 memory32\n")
    assert pool.leftovers(left) == "memory devices ['dimm7']; memory blocks [32] not there at boot"
