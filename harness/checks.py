"""Judging observations against expectations.

A Verdict carries the expected and observed values and the rule that links
them (the one-line rule from expect.py), so a failure message reads on its
own: "Movable managed delta: expected 32256, observed 32768 — managed rises
by block_pages - vmemmap pages".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from harness.errors import CheckFailed
from harness.parsers import Zone

_ZONE_FIELDS = ("spanned", "present", "managed", "free")


@dataclass(frozen=True)
class Verdict:
    name: str
    ok: bool
    expected: Any
    observed: Any
    rule: str

    def __str__(self) -> str:
        return f"{self.name}: expected {self.expected!r}, observed {self.observed!r} \u2014 {self.rule}"


def check_eq(name: str, expected: Any, observed: Any, rule: str) -> Verdict:
    """ok when observed == expected."""
    return Verdict(name, expected == observed, expected, observed, rule)


def check_within(name: str, expected: float, observed: Optional[float], tol: float, rule: str) -> Verdict:
    """ok when |observed - expected| <= tol; the expected value is shown as "X ± tol"."""
    ok = observed is not None and abs(observed - expected) <= tol
    return Verdict(name, ok, f"{expected} \u00b1 {tol}", observed, rule)


def check_between(name: str, low: float, high: float, observed: Optional[float], rule: str) -> Verdict:
    """ok when low <= observed <= high."""
    ok = observed is not None and low <= observed <= high
    return Verdict(name, ok, f"[{low}, {high}]", observed, rule)


class Verdicts(List[Verdict]):
    """A list of verdicts; add() appends and returns the verdict."""

    def add(self, v: Verdict) -> Verdict:
        self.append(v)
        return v

    def eq(self, name: str, expected: Any, observed: Any, rule: str) -> Verdict:
        return self.add(check_eq(name, expected, observed, rule))

    def within(self, name: str, expected: float, observed: Optional[float], tol: float, rule: str) -> Verdict:
        return self.add(check_within(name, expected, observed, tol, rule))

    @property
    def failed(self) -> List[Verdict]:
        return [v for v in self if not v.ok]

    @property
    def ok(self) -> bool:
        return not self.failed

    def report(self) -> str:
        return "\n".join(("ok   " if v.ok else "FAIL ") + str(v) for v in self)

    def raise_if_failed(self) -> None:
        """Raise CheckFailed naming every failed verdict; the first one's fields are the exception's."""
        bad = self.failed
        if not bad:
            return
        first = bad[0]
        if len(bad) == 1:
            raise CheckFailed(first.name, first.expected, first.observed, first.rule)
        names = ", ".join(v.name for v in bad)
        err = CheckFailed(f"{len(bad)} checks failed ({names})",
                          [v.expected for v in bad], [v.observed for v in bad],
                          "\n".join(str(v) for v in bad))
        err.verdicts = bad  # type: ignore[attr-defined]
        raise err


def zone_delta(before: Mapping[Tuple[int, str], Zone], after: Mapping[Tuple[int, str], Zone],
               node: int, zone: str) -> Dict[str, Optional[int]]:
    """after - before for spanned/present/managed/free of one zone; a zone absent on one side counts as all zero."""
    key = (node, zone)
    empty = Zone(0, 0, 0, 0)
    b = before.get(key, empty)
    a = after.get(key, empty)
    out: Dict[str, Optional[int]] = {}
    for f in _ZONE_FIELDS:
        bv, av = getattr(b, f), getattr(a, f)
        out[f] = None if bv is None or av is None else av - bv
    return out


def meminfo_delta(before: Mapping[str, int], after: Mapping[str, int],
                  keys: Optional[Iterable[str]] = None) -> Dict[str, int]:
    """after - before for each key present in both (or the given keys that are)."""
    ks = list(keys) if keys is not None else [k for k in after if k in before]
    return {k: after[k] - before[k] for k in ks if k in before and k in after}


vmstat_delta = meminfo_delta
