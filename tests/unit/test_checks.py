"""Verdicts, collectors and deltas."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from harness.memory import checks as C
from harness.memory import expect as E
from harness.memory import parsers as P
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


def test_zone_delta_on_real_captures_matches_expect():
    """Movable zone delta of the real 6.1 and 6.12 captures (one block onlined movable) equals
    expect.online_deltas on the facts read from that guest; a kernel without the feature would not."""
    for name in ("debian-6.1", "debian-6.12"):
        d = SYN.parent / name
        f = json.loads((d / "facts.json").read_text())
        f["version"] = tuple(f["version"])
        facts = E.KernelFacts(**f)
        before = P.parse_zoneinfo((d / "before" / "zoneinfo").read_text())
        after = P.parse_zoneinfo((d / "zoneinfo").read_text())
        obs = C.zone_delta(before, after, 0, "Movable")
        exp = E.online_deltas(facts, E.decide(facts, facts.block_size), 1)
        assert {k: obs[k] for k in ("spanned", "present", "managed")} == \
            {k: exp[k] for k in ("spanned", "present", "managed")}, name
        off = dataclasses.replace(facts, param="N")
        assert obs["managed"] != E.online_deltas(off, E.decide(off, facts.block_size), 1)["managed"], name
        assert C.zone_delta(before, after, 0, "DMA32")["present"] == 0


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


def test_need_raises_on_missing_data():
    assert C.need({"MemFree": 5}, "MemFree", "/proc/meminfo") == 5
    with pytest.raises(C.MissingData, match="MemTotal missing from /proc/meminfo"):
        C.need({}, "MemTotal", "/proc/meminfo")


def test_no_vmstat_alias():
    assert not hasattr(C, "vmstat_delta")


class _R:
    def __init__(self, **m):
        self.measurements = m


def test_exercised_summary():
    s = C.exercised_summary([_R(self_hosted_blocks=1), _R(self_hosted_blocks=8), _R(self_hosted_blocks=0), _R()])
    assert s == "memmap_on_memory exercised: 9 hot-added blocks had a self-hosted memmap (in 2 scenarios)"
    why = "struct page is 56 bytes, so the vmemmap of a 128 MiB block (1.75 MiB) is not PMD-aligned"
    s = C.exercised_summary([_R(self_hosted_blocks=0), _R(feature_unavailable=why), _R(feature_unavailable=why)])
    assert s.splitlines() == ["memmap_on_memory NOT exercised: no hot-added block had a self-hosted memmap",
                              f"memmap_on_memory cannot apply on this kernel: {why}"]
