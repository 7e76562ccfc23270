"""Shared fixtures for the integration tests that drive memhp as a user would.

Every QEMU these tests start, in this process or through a `memhp` subprocess, gets its run
folder under one session folder: TMPDIR (and tempfile.tempdir) point there, and Machine
makes its run folder with tempfile.mkdtemp. So the QEMU's argv names the session folder,
which is how the session-end check tells our qemu-system processes from those of other
people on the same machine. The check fails the session if any of ours is still alive.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

# Scenario modules that inject faults on purpose; test_faults.py runs them via `memhp run`.
collect_ignore = ["fault_scenarios"]

MEMHP = Path(sys.executable).with_name("memhp")
FAULT_SCENARIOS = Path(__file__).resolve().parent / "fault_scenarios"
LEAK_GRACE_S = 5.0
SESSION_ENV = "MEMHP_IT_SESSION"


def qemu_processes(marker: str) -> List[Tuple[int, List[str]]]:
    """(pid, argv) of every live qemu-system process whose argv mentions `marker`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if not os.path.basename(argv[0].decode(errors="replace")).startswith("qemu-system"):
            continue
        if "Z" in state.split()[1:2]:  # a zombie is gone already; its parent just has not reaped it
            continue
        text = [a.decode(errors="replace") for a in argv if a]
        if any(marker in a for a in text):
            out.append((int(d.name), text))
    return out


def wait_gone(marker: str, timeout: float) -> List[Tuple[int, List[str]]]:
    """Poll until no qemu-system mentioning `marker` is alive; return the survivors at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = qemu_processes(marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def run_dir_of(argv: Sequence[str]) -> Optional[Path]:
    """The Machine's private run folder, from the console chardev's path=<run_dir>/console.sock."""
    for a in argv:
        if a.startswith("socket,id=con0,path="):
            return Path(a.split("path=", 1)[1].split(",", 1)[0]).parent
    return None


@pytest.fixture(scope="session", autouse=True)
def session_tmp():
    """The session folder every run folder goes under; at the end, no QEMU of ours may live."""
    if os.environ.get(SESSION_ENV):
        # A `memhp run --scenarios fault_scenarios` child loads this conftest too: the parent
        # session owns the folder and the check.
        yield Path(tempfile.gettempdir())
        return
    root = Path(tempfile.mkdtemp(prefix="memhp-it-"))
    old_env, old_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(root)
    os.environ[SESSION_ENV] = str(root)
    tempfile.tempdir = str(root)
    try:
        yield root
    finally:
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
        tempfile.tempdir = old_tempdir
        os.environ.pop(SESSION_ENV, None)
        survivors = wait_gone(str(root), LEAK_GRACE_S)
        for pid, _ in survivors:  # ours, by the marker: stop them, then fail the session
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(root, ignore_errors=True)
        if survivors:
            pytest.fail("qemu-system processes started by the tests outlived the session: "
                        + "; ".join(f"pid {p}: {' '.join(a)[:200]}" for p, a in survivors), pytrace=False)


@dataclass
class CLIResult:
    argv: List[str]
    rc: int
    stdout: str
    stderr: str
    wall: float
    tmpdir: Path

    @property
    def err_lines(self) -> List[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]

    def qemus(self) -> List[Tuple[int, List[str]]]:
        """QEMUs this invocation started that are still alive."""
        return qemu_processes(str(self.tmpdir))

    def __str__(self) -> str:
        return (f"$ {' '.join(self.argv)}\nexit {self.rc} after {self.wall:.1f}s\n--- stdout ---\n"
                f"{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}")


@pytest.fixture(scope="session")
def memhp_cli(session_tmp):
    """memhp_cli(args, env=..., timeout=...) runs .venv/bin/memhp; each call gets its own TMPDIR
    under the session folder, so its QEMUs (and run folders) can be found by path."""
    def run(args: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: float = 600.0) -> CLIResult:
        tmp = Path(tempfile.mkdtemp(prefix="cli-", dir=session_tmp))
        full_env = dict(os.environ, TMPDIR=str(tmp))
        full_env.pop("MEMHP_KERNEL", None)
        full_env.update(env or {})
        argv = [str(MEMHP)] + [str(a) for a in args]
        t0 = time.monotonic()
        p = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        return CLIResult(argv, p.returncode, p.stdout, p.stderr, time.monotonic() - t0, tmp)
    return run
