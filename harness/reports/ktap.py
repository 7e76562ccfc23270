"""KTAP v1 (Documentation/dev-tools/ktap.rst): one subtest per scenario module, one result per scenario.

    KTAP version 1
    1..2
      KTAP version 1
      # Subtest: hot_add
      1..2
      ok 1 nr_memmap_pages
      # self-hosted vmemmap pages ...: expected 4096, observed 0
      #   rule: each block with the feature keeps its vmemmap pages out of managed
      not ok 2 hot_add[on-1GiB]
    not ok 1 hot_add
    ok 2 param # SKIP ...

PASS is `ok`; SKIP is `ok ... # SKIP reason`; FAIL and CRASH are `not ok`; HANG is
`not ok ... # TIMEOUT`; INFRA is `not ok ... # ERROR` (KTAP's directive for a test that could
not run). Diagnostics precede the result line they belong to, as the kernel's own
kunit_parser.py attaches them.
"""
from __future__ import annotations

import re
from typing import List, Sequence

from harness.reports.rundir import RunData, Scenario, scrub_paths

MAX_DIAG_LINES = 40
# kunit_parser stops reading at these phrases anywhere in a line (KTAP_END); a quoted console
# line that holds one must not end the document early.
_KTAP_END = re.compile(r"(List of all partitions:|Kernel panic - not syncing: VFS:|reboot: System halted)")
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _name(text: str) -> str:
    """A result description: no '#' (it starts a directive), no whitespace runs."""
    return re.sub(r"\s+", "_", text.replace("#", "_")).strip("_") or "unnamed"


def _diag_line(text: str) -> str:
    text = _CTRL.sub(" ", text.replace("\r", "")).rstrip()
    if text.startswith("Subtest:"):      # would read as a subtest header
        text = " " + text
    return _KTAP_END.sub(lambda m: m.group(1).replace(":", " -"), text)


def diagnostics(s: Scenario, run: RunData) -> List[str]:
    """The `#` lines for one scenario: its checks (expected / observed / rule), splat, or message."""
    out: List[str] = []
    if s.outcome == "fail" and s.checks:
        for c in s.checks:
            out.append(f"{c.name}: expected {c.expected}, observed {c.observed}")
            out.append(f"  rule: {c.rule}")
    elif s.outcome == "crash" and s.splat:
        out.append(f"{s.splat.kind} on the console:")
        out += ["  " + line for line in s.splat.text.splitlines()]
    elif s.outcome not in ("pass", "skip") and s.message:      # a skip's reason is on its result line
        out += s.message.splitlines()
    if s.failed or s.outcome == "infra":
        out.append(f"outcome: {s.outcome.upper()}, {s.duration:.1f}s")
    out = [_diag_line(scrub_paths(x, [run.path])) for x in out]
    if len(out) > MAX_DIAG_LINES:
        out = out[:MAX_DIAG_LINES - 1] + [f"... ({len(out) - MAX_DIAG_LINES + 1} more lines)"]
    return out


def _result(n: int, s: Scenario) -> str:
    name = _name(s.case)
    if s.outcome == "pass":
        return f"ok {n} {name}"
    if s.outcome == "skip":
        reason = _diag_line(" ".join(s.message.split()))
        reason = re.sub(r"^Skipped: ", "", reason)
        return f"ok {n} {name} # SKIP {reason}".rstrip()
    if s.outcome == "hang":
        return f"not ok {n} {name} # TIMEOUT"
    if s.outcome == "infra":
        return f"not ok {n} {name} # ERROR infrastructure (QEMU or host), not the kernel"
    return f"not ok {n} {name}"


def _module_lines(run: RunData, pad: str) -> List[str]:
    """The module subtests of one run and their result lines, every line prefixed with pad."""
    lines: List[str] = []
    for i, (mod, scens) in enumerate(run.modules, 1):
        lines += [pad + "  KTAP version 1", f"{pad}  # Subtest: {_name(mod)}", f"{pad}  1..{len(scens)}"]
        for j, s in enumerate(scens, 1):
            lines += [pad + ("  # " + d if d else "  #") for d in diagnostics(s, run)]
            lines.append(pad + "  " + _result(j, s))
        lines.append(pad + _aggregate(i, _name(mod), scens))
    return lines


def _aggregate(n: int, name: str, scens) -> str:
    if any(s.outcome not in ("pass", "skip") for s in scens):
        return f"not ok {n} {name}"
    if scens and all(s.outcome == "skip" for s in scens):
        return f"ok {n} {name} # SKIP every scenario skipped"
    return f"ok {n} {name}"


def _kernel_line(run: RunData) -> str:
    return f"# memhp: kernel {run.kernel.release or '?'}" + (f" ({run.kernel.spec})" if run.kernel.spec else "")


def render(run: RunData) -> str:
    lines = ["KTAP version 1", f"1..{len(run.modules)}", _kernel_line(run)] + _module_lines(run, "")
    return "\n".join(lines) + "\n"


def render_many(runs: Sequence[RunData]) -> str:
    """Several kernels: one top-level test per kernel, its modules as subtests, its scenarios below."""
    lines = ["KTAP version 1", f"1..{len(runs)}"]
    for k, run in enumerate(runs, 1):
        name = _name(run.kernel.spec or run.kernel.release or f"kernel{k}")
        lines += ["  KTAP version 1", f"  # Subtest: {name}", f"  1..{len(run.modules)}", "  " + _kernel_line(run)]
        lines += _module_lines(run, "  ")
        lines.append(_aggregate(k, name, run.scenarios))
    return "\n".join(lines) + "\n"
