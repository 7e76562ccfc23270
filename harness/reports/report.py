"""Outcomes and reports: classify, then render a table, JSON and JUnit XML.

PASS, FAIL (a check did not hold), CRASH (panic/Oops/BUG/WARNING on the console), HANG (a
deadline ran out), INFRA (QEMU or the host failed), SKIP (with its reason).
"""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from harness.errors import CheckFailed, GuestCommandError, GuestCrash, GuestRefused, Hang, UsageError
from harness.reports.memmap import cost_device

PASS, FAIL, CRASH, HANG, INFRA, SKIP = "pass", "fail", "crash", "hang", "infra", "skip"
OUTCOMES = (PASS, FAIL, CRASH, HANG, INFRA, SKIP)
KERNEL_FAILURES = (FAIL, CRASH, HANG)

EXIT_OK, EXIT_KERNEL, EXIT_USAGE, EXIT_INFRA = 0, 1, 2, 3
EXIT_INTERRUPTED = 130

# `memhp run --bisect`: git bisect run reads 0 good, 125 skip, 1..127 (but 125) bad, and aborts on
# anything else. Bad input must abort (128), never mark a commit bad; infrastructure skips.
BISECT_STATUS = {EXIT_OK: 0, EXIT_KERNEL: 1, EXIT_USAGE: 128, EXIT_INFRA: 125, EXIT_INTERRUPTED: 130}

# Worst first when one scenario ends in several outcomes (call, then teardown). A kernel verdict
# outranks INFRA, so a teardown error can never hide the kernel's FAIL.
RANK = {PASS: 0, SKIP: 1, INFRA: 2, FAIL: 3, HANG: 4, CRASH: 5}


def _pytest_failed(exc: BaseException) -> bool:
    """pytest.fail(): a check the scenario failed on purpose."""
    try:
        from _pytest.outcomes import Failed
    except ImportError:
        return False
    return isinstance(exc, Failed)


def classify(exc: Optional[BaseException]) -> str:
    """Map an exception (or None) to an outcome.

    Only the kernel's own doing is FAIL/CRASH/HANG: a check that did not hold, a guest command or
    hotplug request the kernel refused, a splat, a deadline. Everything else, QEMU, the host, bad
    input reaching a scenario, and any unexpected exception (a bug in memhp), is INFRA."""
    if exc is None:
        return PASS
    if isinstance(exc, GuestCrash):
        return CRASH
    if isinstance(exc, Hang):
        return HANG
    if isinstance(exc, (CheckFailed, AssertionError, GuestCommandError, GuestRefused)) or _pytest_failed(exc):
        return FAIL
    return INFRA


def exit_for_error(exc: BaseException) -> int:
    """The exit status of a command that stopped on `exc`: bad input 2, else from classify()."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    return EXIT_KERNEL if classify(exc) in KERNEL_FAILURES else EXIT_INFRA


def bisect_status(status: int) -> int:
    """`memhp run --bisect`: the status for `git bisect run`; an unknown one skips the commit."""
    return BISECT_STATUS.get(status, 125)


@dataclass
class Result:
    name: str
    outcome: str
    message: str = ""
    duration: float = 0.0
    measurements: Dict[str, Any] = field(default_factory=dict)
    artifacts: Optional[str] = None


def merge(r: Result, outcome: str, message: str, phase: str) -> None:
    """Fold one phase's (setup, call, teardown) outcome into the scenario's Result.

    The worst outcome (RANK) becomes the Result's outcome and its message comes first; every
    other failure is kept after it, so a teardown INFRA never hides the kernel's FAIL."""
    if outcome == PASS or (outcome == SKIP and r.outcome != PASS):
        return
    if r.outcome in (PASS, SKIP):
        r.outcome, r.message = outcome, message
    elif RANK[outcome] > RANK[r.outcome]:
        r.outcome, r.message = outcome, f"{message}\n--- also {r.outcome.upper()}: {r.message}"
    else:
        r.message = f"{r.message}\n--- also {outcome.upper()} in {phase}: {message}"


def exit_status(results: Sequence[Result]) -> int:
    """0 all passed (or skipped); 1 the kernel failed (FAIL/CRASH/HANG); 3 infrastructure error only."""
    outcomes = {r.outcome for r in results}
    if outcomes & set(KERNEL_FAILURES):
        return EXIT_KERNEL
    if INFRA in outcomes:
        return EXIT_INFRA
    if not results:
        return EXIT_INFRA
    return EXIT_OK


def summary_line(results: Sequence[Result]) -> str:
    counts = {o: sum(1 for r in results if r.outcome == o) for o in OUTCOMES}
    return ("memhp: " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES)
            + f" ({len(results)} scenarios)")


def table(results: Sequence[Result], width: int = 100) -> str:
    w = max([len(r.name) for r in results] + [8])
    lines = [f"{'SCENARIO':<{w}}  {'OUTCOME':<7}  {'TIME':>6}  DETAIL"]
    for r in results:
        msg = " ".join(r.message.split())
        lines.append(f"{r.name:<{w}}  {r.outcome.upper():<7}  {r.duration:5.1f}s  {msg[:max(20, width - w - 20)]}")
    return "\n".join(lines)


def memmap_cost_table(results: Sequence[Result]) -> str:
    """Rows come from measurements['memmap_cost'] entries recorded by the hot-add scenarios."""
    rows = []
    for r in results:
        for row in r.measurements.get("memmap_cost", []):
            rows.append(row)
    if not rows:
        return ""
    rows.sort(key=lambda x: (x["dimm_mib"], x["param"], cost_device(x)))
    out = ["memmap cost at hot-add / plug (kB of existing memory consumed; vmemmap pages hosted on the added "
           "memory itself)",
           f"{'SIZE':>6}  {'PARAM':<5}  {'DEVICE':<10}  {'MEMFREE DROP':>12}  {'EXPECTED':>9}  {'SELF-HOSTED':>11}  "
           f"APPLIED / WHY"]
    for x in rows:
        out.append(f"{x['dimm_mib']:>4}M  {x['param']:<5}  {cost_device(x):<10}  {x['memfree_drop_kb']:>9} kB  "
                   f"{x['expected_kb']:>6} kB  "
                   f"{x['self_hosted_pages']:>11}  {'yes' if x['applies'] else 'no'}: "
                   f"{re.sub(r'^applies: ', '', str(x['reason']))}")
    return "\n".join(out)


def write_doc(path: Path, doc: Dict[str, Any]) -> None:
    """A report.json document as built by harness.workflows.matrix (one kernel or several)."""
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")


def write_json(path: Path, kernel: Dict[str, Any], results: Sequence[Result]) -> None:
    doc = {"kernel": kernel, "results": [asdict(r) for r in results],
           "summary": {o: sum(1 for r in results if r.outcome == o) for o in OUTCOMES},
           "exit_status": exit_status(results)}
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")


# XML 1.0 forbids most control characters; console text (ANSI escapes, NULs) is full of them.
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _XML_BAD.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


def _suite(suite: str, results: Sequence[Any]) -> ET.Element:
    """One <testsuite>; results are Result-like (name, outcome, message, duration, measurements, artifacts)."""
    ts = ET.Element("testsuite", name=suite, tests=str(len(results)),
                    failures=str(sum(r.outcome in (FAIL,) for r in results)),
                    errors=str(sum(r.outcome in (CRASH, HANG, INFRA) for r in results)),
                    skipped=str(sum(r.outcome == SKIP for r in results)),
                    time=f"{sum(r.duration for r in results):.3f}")
    for r in results:
        tc = ET.SubElement(ts, "testcase", classname=suite, name=r.name, time=f"{r.duration:.3f}")
        msg = _xml_text(r.message)
        if r.outcome == FAIL:
            ET.SubElement(tc, "failure", type=r.outcome, message=msg[:500]).text = msg
        elif r.outcome in (CRASH, HANG, INFRA):
            ET.SubElement(tc, "error", type=r.outcome, message=msg[:500]).text = msg
        elif r.outcome == SKIP:
            ET.SubElement(tc, "skipped", message=msg[:500])
        if r.measurements or r.artifacts:
            props = ET.SubElement(tc, "properties")
            ET.SubElement(props, "property", name="outcome", value=r.outcome)
            if r.artifacts:
                ET.SubElement(props, "property", name="artifacts", value=str(r.artifacts))
            for k, v in r.measurements.items():
                ET.SubElement(props, "property", name=k, value=_xml_text(json.dumps(v, default=str)))
    return ts


def junit_text(suites: Sequence[Any]) -> str:
    """JUnit XML for [(suite name, results)]: one suite is a <testsuite> document (as every JUnit
    reader takes), several (one per kernel) are wrapped in <testsuites>."""
    if len(suites) == 1:
        root = _suite(*suites[0])
    else:
        root = ET.Element("testsuites", name="memhp")
        for name, results in suites:
            root.append(_suite(name, results))
    return "<?xml version='1.0' encoding='utf-8'?>\n" + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path: Path, suite: str, results: Sequence[Result]) -> None:
    write_junit_suites(path, [(suite, results)])


def write_junit_suites(path: Path, suites: Sequence[Any]) -> None:
    Path(path).write_text(junit_text(suites))
