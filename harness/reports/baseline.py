"""A run compared with a baseline run (`memhp run --baseline OLD/report.json`): what changed. Pure.

Each scenario of the new run, per kernel, gets one status:

  new failure     FAIL, CRASH or HANG now; it was not failing in the baseline (PASS, SKIP, INFRA)
  fixed           PASS now; it was failing in the baseline
  still failing   failing in both
  still passing   PASS now, not failing in the baseline
  not judged      SKIP or INFRA now: this run says nothing about the kernel (old outcome shown)
  new scenario    not in the baseline (a failing new scenario counts as a new failure for --fail-on new)
  removed         in the baseline, no longer in the suite

Kernels are paired by spec; when each side holds exactly one kernel they are paired whatever
their specs (the nightly run of a branch against last night's build of it). A baseline
scenario that the suite still has but this run did not select (-k, another shard) is left out,
not "removed": `universe` names every scenario the suite has now.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

NEW_FAILURE, FIXED, STILL_FAILING, STILL_PASSING = "new failure", "fixed", "still failing", "still passing"
NOT_JUDGED, NEW_SCENARIO, REMOVED = "not judged", "new scenario", "removed"
ORDER = (NEW_FAILURE, FIXED, STILL_FAILING, NOT_JUDGED, NEW_SCENARIO, REMOVED, STILL_PASSING)
FAILING = ("fail", "crash", "hang")


@dataclass(frozen=True)
class Change:
    kernel: str             # the new run's kernel spec (the baseline's for a removed kernel)
    name: str               # "module::case"
    status: str             # one of ORDER
    old: Optional[str]      # outcome in the baseline; None for a new scenario
    new: Optional[str]      # outcome now; None for a removed one
    message: str = ""       # the new run's message

    @property
    def is_new_failure(self) -> bool:
        """What `--fail-on new` exits 1 on: a new failure, or a new scenario that fails."""
        return self.status == NEW_FAILURE or (self.status == NEW_SCENARIO and self.new in FAILING)


def _status(old: Optional[str], new: str) -> str:
    if old is None:
        return NEW_SCENARIO
    if new in FAILING:
        return STILL_FAILING if old in FAILING else NEW_FAILURE
    if new == "pass":
        return FIXED if old in FAILING else STILL_PASSING
    return NOT_JUDGED


def _spec(doc: Mapping[str, Any]) -> str:
    k = doc.get("kernel") if isinstance(doc.get("kernel"), dict) else {}
    return str(k.get("spec") or k.get("release") or "")


def _outcomes(doc: Mapping[str, Any]) -> Dict[str, Mapping[str, Any]]:
    return {str(r.get("name", "")): r for r in doc.get("results", []) if isinstance(r, dict)}


def compare(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]],
            universe: Optional[Set[str]] = None) -> Tuple[Change, ...]:
    """Changes from the baseline's kernel documents `old` to the new run's `new` (each a single-kernel
    report.json document: {"kernel": {...}, "results": [...]}), ordered as ORDER, then kernel, then name."""
    pairs: List[Tuple[str, Optional[Mapping[str, Any]], Optional[Mapping[str, Any]]]] = []
    if len(old) == 1 and len(new) == 1:
        pairs.append((_spec(new[0]), old[0], new[0]))
    else:
        olds = {_spec(d): d for d in old}
        for d in new:
            pairs.append((_spec(d), olds.pop(_spec(d), None), d))
        pairs += [(spec, d, None) for spec, d in olds.items()]
    out: List[Change] = []
    for spec, o, n in pairs:
        oo = _outcomes(o) if o is not None else {}
        nn = _outcomes(n) if n is not None else {}
        for name, r in nn.items():
            prev = oo.get(name)
            out.append(Change(spec, name, _status(prev.get("outcome") if prev else None, str(r.get("outcome"))),
                              str(prev.get("outcome")) if prev else None, str(r.get("outcome")),
                              str(r.get("message") or "")))
        for name, r in oo.items():
            if name not in nn and (universe is None or name not in universe):
                out.append(Change(spec, name, REMOVED, str(r.get("outcome")), None))
    rank = {s: i for i, s in enumerate(ORDER)}
    return tuple(sorted(out, key=lambda c: (rank[c.status], c.kernel, c.name)))


def counts(changes: Sequence[Change]) -> Dict[str, int]:
    return {s: sum(1 for c in changes if c.status == s) for s in ORDER}


def render(changes: Sequence[Change], source: str, width: int = 110) -> str:
    """New failures first, then every other status but "still passing" (counted in the summary line)."""
    n = counts(changes)
    lines = [f"compared with the baseline {source}: " + ", ".join(f"{n[s]} {s}" for s in ORDER)]
    for c in changes:
        if c.status == STILL_PASSING:
            continue
        was = (c.old or "-").upper()
        now = (c.new or "-").upper()
        msg = " ".join(c.message.split())
        line = f"  {c.status.upper():<13}  {c.kernel}  {c.name}  {was} -> {now}"
        if msg and c.new in FAILING:
            line += f"  {msg[:max(20, width - len(line))]}"
        lines.append(line)
    return "\n".join(lines)


def as_json(changes: Sequence[Change], source: str) -> Dict[str, Any]:
    """What report.json records under "baseline"."""
    return {"source": source, "counts": counts(changes),
            "changes": [{"kernel": c.kernel, "name": c.name, "status": c.status, "old": c.old, "new": c.new}
                        for c in changes]}
