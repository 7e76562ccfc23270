"""Tables over several kernels: kernel x scenario outcomes and the memmap cost, one column per kernel.

A column is (kernel label, results), where a result is anything with name, outcome, message
and duration (report.Result from a live run, rundir.Scenario from a run folder) and
measurements (for the memmap cost rows). A scenario a kernel did not run shows as "-". Pure.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from harness.reports.memmap import cost_device

Column = Tuple[str, Sequence[Any]]


def _names(columns: Sequence[Column]) -> List[str]:
    """Every scenario name, in first-seen order over the columns."""
    seen: Dict[str, None] = {}
    for _, results in columns:
        for r in results:
            seen.setdefault(r.name, None)
    return list(seen)


def _by_name(results: Sequence[Any]) -> Dict[str, Any]:
    return {r.name: r for r in results}


def kernel_table(columns: Sequence[Column], width: int = 110) -> str:
    """SCENARIO then one OUTCOME column per kernel; below it, one line per scenario that did not
    pass on a kernel (its outcome, the kernel, and the message's first words)."""
    names = _names(columns)
    w = max([len(n) for n in names] + [8])
    widths = [max(len(label), 7) for label, _ in columns]
    head = f"{'SCENARIO':<{w}}  " + "  ".join(f"{label:<{cw}}" for (label, _), cw in zip(columns, widths))
    lines = [head.rstrip()]
    maps = [_by_name(results) for _, results in columns]
    for n in names:
        cells = [(m[n].outcome.upper() if n in m else "-") for m in maps]
        lines.append((f"{n:<{w}}  " + "  ".join(f"{c:<{cw}}" for c, cw in zip(cells, widths))).rstrip())
    details = []
    for (label, _), m in zip(columns, maps):
        for n in names:
            r = m.get(n)
            if r is not None and r.outcome != "pass":
                msg = " ".join(str(r.message).split())
                details.append(f"  {r.outcome.upper():<5} {label} {n}: {msg[:max(30, width - len(n) - len(label) - 10)]}")
    if details:
        lines += ["", "not passed:"] + details
    return "\n".join(lines)


def _cost_rows(results: Sequence[Any]) -> Dict[Tuple[Any, str], Mapping[str, Any]]:
    rows = {}
    for r in results:
        for row in (r.measurements or {}).get("memmap_cost", []) or []:
            if isinstance(row, dict):
                rows[(row.get("dimm_mib", 0), str(row.get("param", "")), cost_device(row))] = row
    return rows


def memmap_cost_columns(columns: Sequence[Column]) -> str:
    """The memmap cost at hot-add, one row per (size, parameter, device), one column per kernel:
    MemFree drop / expected kB, self-hosted vmemmap pages, and whether the feature applied. "" if none."""
    per = [_cost_rows(results) for _, results in columns]
    keys = sorted({k for rows in per for k in rows}, key=lambda k: (k[0], k[1], k[2]))
    if not keys:
        return ""
    cells = [[(f"{rows[k]['memfree_drop_kb']}/{rows[k]['expected_kb']} kB, {rows[k]['self_hosted_pages']} p, "
               f"{'yes' if rows[k]['applies'] else 'no'}") if k in rows else "-" for k in keys] for rows in per]
    widths = [max([len(label)] + [len(c) for c in col]) for (label, _), col in zip(columns, cells)]
    out = ["memmap cost at hot-add per kernel (MemFree drop / expected kB; vmemmap pages on the DIMM itself; "
           "feature applied)",
           (f"{'SIZE':>6}  {'PARAM':<5}  {'DEVICE':<10}  "
            + "  ".join(f"{label:<{cw}}" for (label, _), cw in zip(columns, widths))).rstrip()]
    for i, (mib, param, device) in enumerate(keys):
        out.append((f"{mib:>4}M  {param:<5}  {device:<10}  "
                    + "  ".join(f"{col[i]:<{cw}}" for col, cw in zip(cells, widths))).rstrip())
    return "\n".join(out)


def _md(text: str) -> str:
    return re.sub(r"([|\\`*_<>\[\]])", r"\\\1", " ".join(str(text).split()))


def markdown(runs: Sequence[Any]) -> str:
    """The kernel x scenario table as GitHub-flavoured markdown (for $GITHUB_STEP_SUMMARY), from
    RunData objects; a second table lists what did not pass, with the message's first words."""
    columns = [(r.kernel.spec or r.kernel.release or f"kernel {i}", r.scenarios) for i, r in enumerate(runs, 1)]
    names = _names(columns)
    maps = [_by_name(results) for _, results in columns]
    lines = ["## memhp: kernel x scenario", ""]
    for (label, results), run in zip(columns, runs):
        counts = {}
        for r in results:
            counts[r.outcome] = counts.get(r.outcome, 0) + 1
        lines.append(f"- `{label}` ({run.kernel.release or '?'}): "
                     + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no scenario"))
    lines += ["", "| scenario | " + " | ".join(f"`{_md(label)}`" for label, _ in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for n in names:
        cells = [(("**" + m[n].outcome.upper() + "**") if m[n].outcome in ("fail", "crash", "hang", "infra")
                  else m[n].outcome.upper()) if n in m else "-" for m in maps]
        lines.append(f"| {_md(n)} | " + " | ".join(cells) + " |")
    bad = [(label, m[n]) for (label, _), m in zip(columns, maps) for n in names
           if n in m and m[n].outcome not in ("pass", "skip")]
    if bad:
        lines += ["", "| kernel | scenario | outcome | detail |", "|---|---|---|---|"]
        lines += [f"| `{_md(label)}` | {_md(r.name)} | {r.outcome.upper()} | {_md(str(r.message)[:300])} |"
                  for label, r in bad]
    return "\n".join(lines) + "\n"
