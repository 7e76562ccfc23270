"""Verdicts, collectors and deltas."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness import checks as C
from harness import expect as E
from harness import parsers as P
from harness.errors import CheckFailed

SYN = Path(__file__).resolve().parent.parent / "data" / "synthetic"


def test_check_eq():
    v = C.check_eq("Movable managed delta", 32256, 32256, "managed rises by block_pages - vmemmap")
    assert v.ok
    bad = C.check_eq("Movable managed delta", 32256, 32768, "managed rises by block_pages - vmemmap")
    assert not bad.ok
    assert str(bad) == ("Movable managed delta: expected 32256, observed 32768 "
                        "\u2014 managed rises by block_pages - vmemmap")


def test_check_within():
    assert C.check_within("MemFree drop", 0, 44, 1024, "r").ok
    assert not C.check_within("MemFree drop", 0, 4096, 1024, "r").ok
    assert C.check_within("x", 10, 11, 1, "r").ok and not C.check_within("x", 10, 12, 1, "r").ok
    assert not C.check_within("x", 10, None, 1, "r").ok
    assert "\u00b1" in str(C.check_within("x", 10, 12, 1, "r"))


def test_check_between():
    assert C.check_between("x", 1, 3, 3, "r").ok and not C.check_between("x", 1, 3, 4, "r").ok
    assert not C.check_between("x", 1, 3, None, "r").ok


def test_verdicts_collects_and_raises_single():
    vs = C.Verdicts()
    vs.eq("a", 1, 1, "rule a")
    assert vs.ok and vs.failed == []
    vs.raise_if_failed()
    vs.eq("b", 2, 3, "rule b")
    assert [v.name for v in vs.failed] == ["b"]
    with pytest.raises(CheckFailed) as ei:
        vs.raise_if_failed()
    assert (ei.value.name, ei.value.expected, ei.value.observed, ei.value.rule) == ("b", 2, 3, "rule b")
    assert "ok   a" in vs.report() and "FAIL b" in vs.report()


def test_verdicts_raise_lists_every_failure():
    vs = C.Verdicts()
    vs.eq("a", 1, 2, "rule a")
    vs.eq("ok", 1, 1, "fine")
    vs.within("b", 0, 100, 5, "rule b")
    with pytest.raises(CheckFailed) as ei:
        vs.raise_if_failed()
    msg = str(ei.value)
    assert "2 checks failed (a, b)" in msg
    assert "a: expected 1, observed 2 \u2014 rule a" in msg and "rule b" in msg
    assert "fine" not in msg
    assert [v.name for v in ei.value.verdicts] == ["a", "b"]


def test_zone_delta_between_fixtures():
    before = P.parse_zoneinfo((SYN / "zoneinfo").read_text())
    after = P.parse_zoneinfo((SYN / "zoneinfo-6.12").read_text())
    assert C.zone_delta(before, after, 0, "Movable") == {"spanned": 262144, "present": 262144,
                                                         "managed": 258048, "free": 257000}
    assert C.zone_delta(before, after, 0, "DMA32") == {"spanned": 0, "present": 0, "managed": 0, "free": 0}
    # node 1 does not exist before: counts as zero
    assert C.zone_delta(before, after, 1, "Movable")["managed"] == 32256
    assert C.zone_delta(after, before, 1, "Movable")["present"] == -32768


def test_zone_delta_unknown_fields_are_none():
    a = {(0, "Normal"): P.Zone(None, 5, 5, 5)}
    b = {(0, "Normal"): P.Zone(10, 10, 10, 10)}
    assert C.zone_delta(a, b, 0, "Normal") == {"spanned": None, "present": 5, "managed": 5, "free": 5}


def test_meminfo_delta():
    before = P.parse_meminfo((SYN / "meminfo").read_text())
    after = dict(before, MemTotal=before["MemTotal"] + 129024, New=1)
    d = C.meminfo_delta(before, after)
    assert d["MemTotal"] == 129024 and d["MemFree"] == 0 and "New" not in d
    assert C.meminfo_delta(before, after, ["MemTotal", "Missing"]) == {"MemTotal": 129024}


def test_end_to_end_expectation_vs_fixture_deltas():
    """The 6.12 fixture's 1 GiB Movable zone matches the arithmetic; a 6.1 expectation would not."""
    before = P.parse_zoneinfo((SYN / "zoneinfo").read_text())
    after = P.parse_zoneinfo((SYN / "zoneinfo-6.12").read_text())
    obs = C.zone_delta(before, after, 0, "Movable")
    for version, want_ok in (((6, 12, 117), True), ((6, 1, 176), False)):
        f = E.KernelFacts("r", version, 128 << 20, 64, "assumed", 9, "Y")
        exp = E.online_deltas(f, E.decide(f, 1 << 30), 8)
        vs = C.Verdicts()
        for k in ("spanned", "present", "managed"):
            vs.eq(f"Movable {k}", exp[k], obs[k], E.online_deltas.__doc__.splitlines()[0])
        assert vs.ok is want_ok
