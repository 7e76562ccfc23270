"""Pure helpers of harness/scenarios/_common.py: per-cpu free pages, node lists, pfn spans."""
from __future__ import annotations

from pathlib import Path

from harness.observe import parse_snapshot
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
    assert C.free_kb(parse_snapshot("")) == 0


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
