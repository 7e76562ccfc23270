"""Decode the splats of a finished run with the kernel tree's scripts/decode_stacktrace.sh.

decode_run() is the one step before rendering that runs programs: with a vmlinux that has
debug info (given, found beside the kernel image or in the usual places, or for Debian's
kernels fetched from linux-image-<release>-dbg on request), each failed scenario's console
excerpt around its splat goes through decode_stacktrace.sh and is kept in Scenario.decoded;
the renderers stay pure. It never fails the report: without a vmlinux, or when decoding does
not work, RunData.decode_note says in one sentence why and how to decode by hand.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, List, Optional

from harness.errors import HarnessError, UsageError
from harness.kernels import debuginfo
from harness.reports.rundir import RunData, RunSet, Scenario, parse_argv

# The excerpt the email quotes (mail.CONSOLE_BEFORE / CONSOLE_AFTER); decoded as a whole.
BEFORE, AFTER = 10, 40


def _crashes(run: RunData) -> List[Scenario]:
    return [s for s in run.scenarios if s.failed and s.splat is not None and s.splat.line >= 0]


def how_to(run: RunData) -> str:
    """One sentence: how a reader decodes the excerpt by hand."""
    rel = run.kernel.release or "RELEASE"
    pkg = f" (Debian: linux-image-{rel}-dbg, or memhp report --fetch-vmlinux)" if \
        run.kernel.spec.startswith("debian:") else ""
    return (f"Not decoded: no vmlinux with debug info was at hand. To decode, run the tree's "
            f"scripts/decode_stacktrace.sh vmlinux-{rel}{pkg} on the excerpt.")


def check_vmlinux(path: Path) -> Path:
    """--vmlinux FILE: an existing ELF file with debug info, else bad input."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--vmlinux {path}: no such file")
    if not debuginfo.has_debug_info(p):
        raise UsageError(f"--vmlinux {path}: not a vmlinux with debug info (no .debug_info section)")
    return p


def decode_run(run: RunData, vmlinux: Optional[Path] = None, fetch: bool = False) -> RunData:
    """run with each crash excerpt decoded when a vmlinux with debug info is at hand (see the module)."""
    crashes = _crashes(run)
    if not crashes:
        return run
    rel = run.kernel.release
    image = parse_argv(crashes[0].argv).get("kernel")
    img = Path(image) if image else None
    try:
        vml = vmlinux or debuginfo.find_vmlinux(img, rel)
        if vml is None and fetch:
            if not run.kernel.spec.startswith("debian:"):
                return replace(run, decode_note=how_to(run) + " (--fetch-vmlinux knows Debian's kernels only)")
            vml = debuginfo.fetch_debian(rel)
    except HarnessError as e:
        return replace(run, decode_note=f"{how_to(run)} (fetching the debug package failed: {e})")
    if vml is None:
        return replace(run, decode_note=how_to(run))
    trees = [Path(run.kernel.tree)] if run.kernel.tree else []
    trees += [p for p in (img.parents if img else ()) if (p / debuginfo.DECODE_SCRIPT).is_file()]
    script = debuginfo.decode_script(trees, rel)
    if script is None:
        return replace(run, decode_note=f"Not decoded: no kernel tree with {debuginfo.DECODE_SCRIPT} at hand "
                                        f"(memhp kernel build or debian-src: unpacks one).")
    decoded = {}
    for s in crashes:
        try:
            text = debuginfo.decode("\n".join(s.splat_excerpt(BEFORE, AFTER)) + "\n", vml, script)
        except HarnessError as e:
            return replace(run, decode_note=f"Not decoded: {debuginfo.DECODE_SCRIPT} failed ({e}).")
        if debuginfo.decoded_frames(text):
            decoded[s.name] = text
    if not decoded:
        return replace(run, decode_note=f"Not decoded: {debuginfo.DECODE_SCRIPT} resolved no frame with "
                                        f"{vml.name} (a vmlinux of another build?).")
    scen = tuple(replace(s, decoded=decoded[s.name]) if s.name in decoded else s for s in run.scenarios)
    return replace(run, scenarios=scen,
                   decode_note=f"Decoded with the tree's {debuginfo.DECODE_SCRIPT} and {vml.name} (debug info).")


def decode_all(run: Any, vmlinux: Optional[Path] = None, fetch: bool = False) -> Any:
    """decode_run over a RunData or each kernel of a RunSet (memhp report --format email|html)."""
    vml = check_vmlinux(vmlinux) if vmlinux is not None else None
    if isinstance(run, RunSet):
        return replace(run, runs=tuple(decode_run(r, vml, fetch) for r in run.runs))
    return decode_run(run, vml, fetch)
