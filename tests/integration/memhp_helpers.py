"""Helpers shared by the integration tests that drive the memhp command line and real guests."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

_VENV_MEMHP = Path(sys.executable).with_name("memhp")
MEMHP = str(_VENV_MEMHP) if _VENV_MEMHP.exists() else (shutil.which("memhp") or "memhp")

_SOCK_RE = re.compile(r"path=(\S+?)/console\.sock")


def run_memhp(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    """Run the installed memhp; never raises on a non-zero exit (the tests judge it)."""
    return subprocess.run([MEMHP, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def show(proc: subprocess.CompletedProcess) -> str:
    """The whole exchange, for assertion messages."""
    return (f"\n$ {' '.join(map(str, proc.args))}\nexit {proc.returncode}\n--- stdout ---\n{proc.stdout}"
            f"--- stderr ---\n{proc.stderr}")


def qemu_processes(marker: str) -> List[Tuple[int, str]]:
    """(pid, cmdline) of every live qemu-system process whose command line contains `marker`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if "qemu-system" in cmd.split(" ", 1)[0] and marker in cmd and "zombie" not in state:
            found.append((int(d.name), cmd))
    return found


def run_dirs_in(folder: Path) -> List[str]:
    """The private run folders named by every argv.txt under `folder` (one per QEMU started)."""
    dirs = []
    for argv in sorted(Path(folder).rglob("argv.txt")):
        m = _SOCK_RE.search(argv.read_text(errors="replace"))
        if m:
            dirs.append(m.group(1))
    return dirs


def leftover_qemu(folder: Path) -> List[Tuple[int, str]]:
    """QEMU processes still running for any VM whose argv.txt lies under `folder`."""
    out = []
    for rd in run_dirs_in(folder):
        out += qemu_processes(rd + "/")
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return "zombie" not in next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                                    if ln.startswith("State:"))
    except (OSError, StopIteration):
        return False


def not_passing(results) -> List[str]:
    """Scenarios of a whole-suite run that did not pass. A SKIP counts as a verdict only with its
    reason (a version gate names the kernel and the rule); a bare SKIP would hide a failure."""
    return [f"{r['outcome'].upper()} {r['name']}: {' '.join(r['message'].split())[:300]}"
            for r in results if r["outcome"] != "pass"
            and not (r["outcome"] == "skip" and len(r["message"].replace("Skipped:", "").strip()) > 10)]
