"""Merge the report.json documents of shards (`memhp run --shard I/N`) into one. Pure.

A shard's document records {"shard": {"index": I, "count": N, "selection": [every scenario of
the unsharded selection]}}. Documents are grouped by kernel spec; within a kernel the shards
must be 1..N of the same N and the same selection, each exactly once, and their scenarios
must cover the selection with no scenario twice. Anything else is a MergeError naming the
files: an overlap (a shard or a scenario given twice, or two unsharded runs of one kernel) or
a gap (a shard or a scenario missing). Different kernels merge side by side, as one
several-kernel report (the "kernels" list `memhp run --kernel A --kernel B` writes).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from harness.reports import report
from harness.reports.rundir import kernel_docs


class MergeError(ValueError):
    """The shards do not fit together (overlap or gap); the message names the files."""


def _spec(doc: Mapping[str, Any]) -> str:
    k = doc.get("kernel") if isinstance(doc.get("kernel"), dict) else {}
    return str(k.get("spec") or k.get("release") or "?")


def summary(results: Sequence[Mapping[str, Any]]) -> Dict[str, int]:
    return {o: sum(1 for r in results if r.get("outcome") == o) for o in report.OUTCOMES}


def exit_status(results: Sequence[Mapping[str, Any]]) -> int:
    return report.exit_status([SimpleNamespace(outcome=r.get("outcome")) for r in results])


def kernel_doc(kernel: Mapping[str, Any], results: List[Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
    """A single-kernel report.json document (what report.write_json writes), with extra keys."""
    doc: Dict[str, Any] = {"kernel": dict(kernel), "results": results, "summary": summary(results),
                           "exit_status": exit_status(results)}
    doc.update({k: v for k, v in extra.items() if v is not None})
    return doc


def combine(kdocs: Sequence[Mapping[str, Any]], **extra: Any) -> Dict[str, Any]:
    """One document for one kernel (its own form, loadable by load_run), else {"kernels": [...]} with the
    summary over every kernel and the worst exit status (a kernel failure outranks infrastructure)."""
    if len(kdocs) == 1:
        doc = dict(kdocs[0])
        doc.update({k: v for k, v in extra.items() if v is not None})
        return doc
    allres = [r for d in kdocs for r in d.get("results", [])]
    doc = {"kernels": [dict(d) for d in kdocs], "summary": summary(allres),
           "exit_status": exit_status(allres) if allres else report.EXIT_OK}
    doc.update({k: v for k, v in extra.items() if v is not None})
    return doc


def _shard(kdoc: Mapping[str, Any], top: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    s = kdoc.get("shard", top.get("shard"))
    return s if isinstance(s, dict) else None


def merge(docs: Sequence[Tuple[str, Mapping[str, Any]]]) -> Dict[str, Any]:
    """docs: (file name, report.json document) per shard report. The merged document."""
    groups: Dict[str, List[Tuple[str, Mapping[str, Any], Optional[Mapping[str, Any]]]]] = {}
    for label, doc in docs:
        for kd in kernel_docs(doc):
            groups.setdefault(_spec(kd), []).append((label, kd, _shard(kd, doc)))
    merged = [_merge_kernel(spec, parts) for spec, parts in groups.items()]
    return combine(merged, merged_from=[label for label, _ in docs])


def _merge_kernel(spec: str, parts: List[Tuple[str, Mapping[str, Any], Optional[Mapping[str, Any]]]]
                  ) -> Dict[str, Any]:
    if len(parts) == 1 and (parts[0][2] is None or int(parts[0][2].get("count", 1)) == 1):
        kd = dict(parts[0][1])
        kd.pop("shard", None)
        return kd
    unsharded = [label for label, _, s in parts if s is None]
    if unsharded:
        raise MergeError(f"kernel {spec}: {', '.join(unsharded)} {'is' if len(unsharded) == 1 else 'are'} not a "
                         f"shard, and {len(parts)} reports hold this kernel: they overlap")
    counts = {int(s.get("count", 0)) for _, _, s in parts}
    if len(counts) != 1:
        what = ", ".join(f"{label}: /{s.get('count')}" for label, _, s in parts)
        raise MergeError(f"kernel {spec}: shards of different counts ({what})")
    n = counts.pop()
    by_index: Dict[int, str] = {}
    for label, _, s in parts:
        i = int(s.get("index", 0))
        if i in by_index:
            raise MergeError(f"kernel {spec}: shard {i}/{n} given twice ({by_index[i]} and {label}): overlap")
        by_index[i] = label
    missing = [i for i in range(1, n + 1) if i not in by_index]
    if missing:
        raise MergeError(f"kernel {spec}: shard{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(f'{i}/{n}' for i in missing)} missing: a gap")
    selections = {tuple(s.get("selection") or ()) for _, _, s in parts}
    if len(selections) != 1:
        raise MergeError(f"kernel {spec}: the shards were cut from different selections of scenarios "
                         f"(different -k or suite versions): {', '.join(l for l, _, _ in parts)}")
    selection = list(selections.pop())
    releases = {str((kd.get("kernel") or {}).get("release") or "") for _, kd, _ in parts} - {""}
    if len(releases) > 1:
        raise MergeError(f"kernel {spec}: the shards ran different kernels ({', '.join(sorted(releases))})")
    seen: Dict[str, str] = {}
    results: Dict[str, Dict[str, Any]] = {}
    for label, kd, _ in sorted(parts, key=lambda p: int(p[2].get("index", 0))):
        for r in kd.get("results", []):
            name = str(r.get("name", ""))
            if name in seen:
                raise MergeError(f"kernel {spec}: scenario {name} is in {seen[name]} and in {label}: overlap")
            seen[name] = label
            results[name] = dict(r)
    extra = [x for x in results if x not in set(selection)]
    if extra:
        raise MergeError(f"kernel {spec}: {', '.join(extra[:5])} ran but {'is' if len(extra) == 1 else 'are'} "
                         f"not in the shards' selection")
    gap = [x for x in selection if x not in results]
    if gap:
        more = f" and {len(gap) - 5} more" if len(gap) > 5 else ""
        raise MergeError(f"kernel {spec}: no result for {', '.join(gap[:5])}{more} in any shard: a gap")
    kernel = next(((kd.get("kernel") or {}) for _, kd, _ in parts if (kd.get("kernel") or {}).get("release")),
                  parts[0][1].get("kernel") or {})
    return kernel_doc(kernel, [results[x] for x in selection])
