"""Machine's parent-death set-up, on real (small) processes: prctl resolved before the fork,
and a child whose parent is not the one expected (it died between fork and prctl) kills
itself before it execs, so no QEMU can outlive memhp even then."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from harness.vm import machine


def test_prctl_is_resolved_in_the_parent():
    assert machine._prctl is not None, "prctl not resolved: QEMU would run without PR_SET_PDEATHSIG"


def test_child_of_a_dead_parent_kills_itself_before_exec():
    not_my_parent = os.getpid() + 1_000_000          # what the child sees is not this pid
    p = subprocess.Popen(["sleep", "30"], preexec_fn=machine._pdeathsig_for(not_my_parent))
    assert p.wait(timeout=10) == -signal.SIGKILL


def test_child_of_a_live_parent_runs_and_has_the_death_signal():
    p = subprocess.Popen(["sleep", "30"], preexec_fn=machine._pdeathsig_for(os.getpid()))
    try:
        time.sleep(0.2)
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def test_child_dies_with_its_parent():
    """A middle process starts `sleep` the way Machine starts QEMU, then is SIGKILLed."""
    code = ("import os, subprocess, sys, time\n"
            "from harness.vm import machine\n"
            "p = subprocess.Popen(['sleep', '60'], preexec_fn=machine._pdeathsig_for(os.getpid()))\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)\n")
    mid = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(mid.stdout.readline())
    mid.kill()
    mid.wait()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
            state = open(f"/proc/{child}/stat").read().split()[2]
            if state == "Z":
                break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.02)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived its SIGKILLed parent by more than 1 s")
