"""Judging observations against expectations.

A Verdict carries the expected and observed values and the rule that links
them (the one-line rule from expect.py), so a failure message reads on its
own: "Movable managed delta: expected 32256, observed 32768 — managed rises
by block_pages - vmemmap pages".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from harness.errors import CheckFailed, InfraError
from harness.memory.parsers import Zone

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


class MissingData(InfraError):
    """A value memhp needs was not in what the guest printed: never judged as a pass."""


# The one rule for missing data (every helper that reads a guest value follows it):
# - missing data is INFRA (MissingData): memhp did not get what it asked for (a read that printed
#   nothing, a file absent on this kernel or config, output cut short) - not the kernel's verdict;
# - it is a FAIL (CheckFailed) only when the kernel stopped providing something it must provide:
#   the file was read and has its other fields, but lacks one that every kernel memhp targets
#   prints (need_field(), e.g. MemFree or MemTotal in /proc/meminfo, fs/proc/meminfo.c).
def need(values: Mapping[str, Any], key: str, where: str) -> Any:
    """values[key], or MissingData (INFRA) naming the key and where it was read."""
    v = values.get(key) if values is not None else None
    if v is None:
        raise MissingData(f"{key} missing from {where}")
    return v


def need_field(values: Mapping[str, Any], key: str, where: str, rule: str) -> Any:
    """values[key] for a field the kernel must print: MissingData (INFRA) when nothing was read from
    `where` at all, CheckFailed (FAIL, citing `rule`) when `where` was read but lacks the field."""
    if not values:
        raise MissingData(f"{key} missing from {where}: nothing was read from it")
    v = values.get(key)
    if v is None:
        raise CheckFailed(f"{key} in {where}", "present", "absent", rule)
    return v


SELF_HOSTED_KEY = "self_hosted_blocks"
FEATURE_UNAVAILABLE_KEY = "feature_unavailable"


def exercised_summary(results: Iterable[Any]) -> str:
    """Whether memmap_on_memory was exercised: the hot-added blocks with a self-hosted memmap,
    summed over the scenarios' SELF_HOSTED_KEY measurements, and on its own line the reason
    the feature can never apply, when a scenario recorded one (FEATURE_UNAVAILABLE_KEY)."""
    n, scen, reasons = 0, 0, []
    for r in results:
        m = getattr(r, "measurements", None) or {}
        if isinstance(m.get(SELF_HOSTED_KEY), int):
            n += m[SELF_HOSTED_KEY]
            scen += m[SELF_HOSTED_KEY] > 0
        why = m.get(FEATURE_UNAVAILABLE_KEY)
        if why and why not in reasons:
            reasons.append(why)
    if n:
        line = (f"memmap_on_memory exercised: {n} hot-added block{'s' if n != 1 else ''} had a self-hosted "
                f"memmap (in {scen} scenario{'s' if scen != 1 else ''})")
    else:
        line = "memmap_on_memory NOT exercised: no hot-added block had a self-hosted memmap"
    return "\n".join([line] + [f"memmap_on_memory cannot apply on this kernel: {w}" for w in reasons])
