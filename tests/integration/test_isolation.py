"""Two `memhp run` at once on one machine: both pass, and they share no port, socket or folder.

Both runs get the same TMPDIR and the default artifacts location, as two users of one host
would, so any separation comes from memhp itself.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import MEMHP, qemu_processes, run_dir_of

pytestmark = pytest.mark.guest

SCENARIO = "block_sized_dimm_lifecycle"


def _argv_facts(argv_text: str) -> dict:
    port = re.search(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-:22", argv_text)
    con = re.search(r"socket,id=con0,path=([^,\s']+)", argv_text)
    qmp = re.search(r"socket,id=qmp0,path=([^,\s']+)", argv_text)
    assert port and con and qmp, argv_text
    return {"port": int(port.group(1)), "console": con.group(1), "qmp": qmp.group(1),
            "run_dir": str(Path(con.group(1)).parent)}


def test_two_runs_at_once(session_tmp, memhp_spec):
    tmp = Path(tempfile.mkdtemp(prefix="iso-", dir=session_tmp))
    env = dict(os.environ, TMPDIR=str(tmp))
    argv = [str(MEMHP), "run", "--kernel", memhp_spec, "--accel", "auto", "-k", SCENARIO]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL) for _ in range(2)]
    seen, overlap = {}, 0
    try:
        deadline = time.monotonic() + 600
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            live = qemu_processes(str(tmp))
            overlap = max(overlap, len(live))
            for pid, a in live:
                seen.setdefault(pid, a)
            time.sleep(0.1)
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"exit {p.returncode}\n{out[-2000:]}\n{err[-2000:]}"
        assert "memhp: 1 pass, 0 fail, 0 crash, 0 hang, 0 infra, 0 skip (1 scenarios)" in out, out[-1000:]
    assert overlap == 2, f"the two runs' guests never ran at the same time (max {overlap}); nothing was tested"
    assert len(seen) == 2, seen

    # Live argv (from /proc) and the argv.txt each run saved: the same facts, all distinct.
    live = [_argv_facts(" ".join(a)) for a in seen.values()]
    arts = [Path(re.search(r"artifacts in (\S+)", err).group(1)) for _, err in outs]
    assert arts[0] != arts[1] and not arts[0].is_relative_to(arts[1]) and not arts[1].is_relative_to(arts[0])
    saved = []
    for a in arts:
        files = sorted(a.rglob("argv.txt"))
        assert files, f"no argv.txt under {a}"
        saved.append(_argv_facts(files[0].read_text()))
    assert sorted(map(str, live), key=str) == sorted(map(str, saved), key=str), (live, saved)
    for key in ("port", "console", "qmp", "run_dir"):
        assert saved[0][key] != saved[1][key], f"both runs used the same {key}: {saved[0][key]}"
    for d in (s["run_dir"] for s in saved):
        assert not Path(d).exists(), f"run folder {d} left behind"
    assert not qemu_processes(str(tmp))
    print(f"ports {saved[0]['port']} / {saved[1]['port']}, run folders {saved[0]['run_dir']} / "
          f"{saved[1]['run_dir']}, artifacts {arts[0]} / {arts[1]}")
