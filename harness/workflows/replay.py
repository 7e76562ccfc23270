"""`memhp replay RUN_DIR[/scenario]`: boot the same kernel with the same QEMU command line, replay
the recorded QMP and guest commands in their original order, wait on the same events, and say
whether the same observations came back (the same failed check, or the same splat).

The work is harness.reports.replaydriver's, the same code the standalone reproducer embeds;
this module finds the run's pieces (argv.txt, qmp.jsonl, commands.jsonl, the image's SSH key,
the kernel and initramfs named in argv.txt) and maps the answer to an exit status: 0 the same
observations came back, 1 they differ, 2 bad input (not a run folder, nothing recorded to
replay), 3 QEMU, the monitor or SSH failed.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, TextIO, Tuple

from harness.cache import cache_root
from harness.errors import InfraError, UsageError
from harness.reports import replaydriver
from harness.reports.reproducer import pick, scenario_data, ssh_key_for
from harness.reports.rundir import RunData, RunDirError, Scenario, load_run, parse_argv
from harness.vm.machine import pdeathsig_for


@dataclass(frozen=True)
class ReplayOutcome:
    scenario: str
    same: bool
    differences: Tuple[str, ...]
    workdir: Path


def resolve(path: Path) -> Tuple[RunData, List[Scenario]]:
    """RUN_DIR (its failed scenarios, else all of them) or RUN_DIR/scenario-folder (that one)."""
    path = Path(path)
    name = None
    if not (path / "report.json").is_file() and (path.parent / "report.json").is_file():
        path, name = path.parent, path.name
    try:
        run = load_run(path)
    except RunDirError as e:
        raise UsageError(str(e)) from None
    if name:
        s = pick(run, name)
        if s is None:
            raise UsageError(f"{path / name}: no scenario of this run recorded its QEMU command line there")
        return run, [s]
    chosen = [s for s in run.failed if s.artifacts and s.argv] or \
        [s for s in run.scenarios if s.artifacts and s.argv and s.outcome != "skip"]
    if not chosen:
        raise UsageError(f"{path}: no scenario recorded a QEMU command line to replay")
    return run, chosen


def replay_scenario(s: Scenario, out: TextIO = sys.stdout) -> ReplayOutcome:
    data = scenario_data(s)
    if not data["plan"]:
        raise UsageError(f"{s.name}: no QMP or guest command recorded (a run from before commands.jsonl?)")
    if not replaydriver.comparable(data["plan"]) and not data["splats"]:
        raise UsageError(f"{s.name}: the run recorded no guest output to compare (a run from before "
                         f"commands.jsonl kept outputs); run it again with this memhp")
    av = parse_argv(s.argv)
    for what, p in (("kernel image", av.get("kernel")), ("initramfs", av.get("initrd"))):
        if not p or not Path(p).is_file():
            raise InfraError(f"the recorded {what} {p or '(none)'} is gone; fetch or build the kernel again "
                             f"(memhp kernel fetch SPEC, or memhp boot --dry-run for the image)")
    key = ssh_key_for(s.argv)
    if key is None:
        raise InfraError(f"no SSH key beside the recorded initramfs {av.get('initrd')}")
    work = cache_root() / "replays" / f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(str(s.artifacts)).name}"[:200]
    work.mkdir(parents=True, exist_ok=True)
    out.write(f"replay: {s.name} (memhp said {s.outcome.upper()})\n")
    try:
        # QEMU dies with memhp replay, even a SIGKILLed one: the Machine's parent-death signal.
        same, diffs = replaydriver.replay(data["argv"], data["plan"], str(key), av["kernel"], av["initrd"],
                                          data["failed_at"], data["checks"], data["splats"], workdir=str(work),
                                          out=out, preexec_fn=pdeathsig_for(os.getpid()))
    except replaydriver.Failure as e:
        raise InfraError(f"replay of {s.name}: {e}") from None
    out.write(replaydriver.verdict(same, diffs, data["checks"], data["splats"]) + "\n")
    return ReplayOutcome(s.name, same, tuple(diffs), work)


def replay_path(path: Path, out: TextIO = sys.stdout) -> int:
    """Replay every chosen scenario; 0 when each gave back the same observations, else 1."""
    _, scenarios = resolve(path)
    results = [replay_scenario(s, out) for s in scenarios]
    return 0 if all(r.same for r in results) else 1
