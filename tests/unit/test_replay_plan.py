"""The replay plan and the standalone reproducer, from a real planted-regression run
(tests/data/reports/planted-6.1): what gets replayed, in which order, what is compared, and
that the generated script is valid bash with a valid embedded python3 program."""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
import os
import subprocess
import sys
from pathlib import Path

from harness.reports import render, replaydriver, reproducer
from harness.reports.rundir import load_run

DATA = Path(__file__).resolve().parents[1] / "data" / "reports" / "planted-6.1"
SCEN = DATA / "test_dimm_lifecycle.py_test_block_sized_dimm_lifecycle"


def _plan():
    return replaydriver.make_plan((SCEN / "qmp.jsonl").read_text(), (SCEN / "commands.jsonl").read_text())


def test_plan_keeps_every_command_in_time_order():
    plan = _plan()
    qmp_sent = [json.loads(x)["msg"]["execute"] for x in (SCEN / "qmp.jsonl").read_text().splitlines()
                if json.loads(x)["dir"] == "send"]
    cmds = [json.loads(x)["cmd"] for x in (SCEN / "commands.jsonl").read_text().splitlines()]
    assert [s["execute"] for s in plan if s["kind"] == "qmp"] == [c for c in qmp_sent if c not in ("cont",)]
    assert [s["cmd"] for s in plan if s["kind"] == "cmd"] == cmds
    assert [s["t"] for s in plan] == sorted(s["t"] for s in plan)
    # The add comes before the online write, the online before the removal.
    order = [s.get("execute") or s["cmd"] for s in plan]
    add = order.index("device_add")
    online = next(i for i, x in enumerate(order) if "online_movable" in x)
    assert add < online < order.index("device_del")


def test_events_the_replay_waits_for():
    plan = {s["execute"]: s for s in _plan() if s["kind"] == "qmp"}
    assert [e["event"] for e in plan["device_del"]["events"]] == ["ACPI_DEVICE_OST", "DEVICE_DELETED",
                                                                  "ACPI_DEVICE_OST"]
    assert all(e["device"] in ("dimm1", None) for e in plan["device_del"]["events"])
    assert plan["device_add"]["reply"] == "return"


def test_summary_of_a_recorded_snapshot():
    doc = json.loads((DATA / "report.json").read_text())
    checks = doc["results"][0]["measurements"]["failed_checks"]
    failed_at = checks[0]["t"]
    state = replaydriver.recorded_state_at(_plan(), failed_at)
    # The state memhp judged: the check's observed present delta is in it (Movable was empty before).
    assert state["Movable@0.present"] == int(checks[0]["observed"])
    assert state["memory32/state"] == "online" and state["memory32/valid_zones"] == "Movable"
    assert state["MemTotal"] > 0 and "DMA32@0.managed" in state


def test_diff_and_verdict():
    assert replaydriver.diff({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == [("b", 2, 3), ("c", "(absent)", 4)]
    chk = [{"name": "X", "expected": "1", "observed": "2", "rule": "r"}]
    assert replaydriver.verdict(True, [], chk, []).startswith("REPRODUCED")
    assert replaydriver.verdict(True, [], [], []).startswith("SAME")
    out = replaydriver.verdict(False, ["present: recorded 1, replayed 2"], chk, [])
    assert out.splitlines()[-1].startswith("DIFFERENT: 1 ") and "differs: present" in out


def test_new_argv_changes_only_sockets_port_and_images():
    words = shlex.split((SCEN / "argv.txt").read_text())
    new = replaydriver.new_argv(words, "/k/bzImage", "/k/initrd", "/s", 4242)
    changed = [(a, b) for a, b in zip(words, new) if a != b]
    assert len(new) == len(words)
    assert {b for _, b in changed} == {"/k/bzImage", "/k/initrd",
                                       "socket,id=con0,path=/s/console.sock,server=on,wait=off",
                                       "socket,id=qmp0,path=/s/qmp.sock,server=on,wait=off",
                                       next(w for w in new if "hostfwd" in w)}
    assert "hostfwd=tcp:127.0.0.1:4242-:22" in " ".join(new)


def test_reproducer_script_is_valid_bash_and_python(tmp_path):
    run = load_run(DATA)
    text = render(run, "reproducer")
    script = tmp_path / "reproduce.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    py = text.split("<<'MEMHP_PY'\n", 1)[1].rsplit("\nMEMHP_PY\n", 1)[0]
    compile(py, "reproduce.sh:python", "exec")
    assert "import harness" not in py and "from harness" not in py, "the reproducer must not need memhp"
    assert "Movable present delta after online_movable: expected 32768, observed 33280" in text
    # The plan it carries is the scenario's.
    blob = re.search(r'DATA = """\n(.*?)\n"""', text, re.S).group(1)
    import base64
    data = json.loads(base64.b64decode("".join(blob.split())))
    assert data["plan"] == json.loads(json.dumps(_plan())) and data["failed_at"]


def test_reproducer_without_a_recorded_command_line(tmp_path):
    run = load_run(Path(__file__).resolve().parents[1] / "data" / "reports" / "faults-6.12")
    assert reproducer.pick(run, "no-such-scenario") is None


def test_email_lists_the_steps_without_reads():
    run = load_run(DATA)
    steps = reproducer.steps_summary(run.scenarios[0])
    assert steps == ["qmp object-add qom-type=memory-backend-ram id=mem-dimm1 size=134217728",
                     "qmp device_add driver=pc-dimm id=dimm1 memdev=mem-dimm1",
                     "sh  echo online_movable > /sys/devices/system/memory/memory32/state",
                     "sh  echo offline > /sys/devices/system/memory/memory32/state",
                     "qmp device_del id=dimm1", "qmp object-del id=mem-dimm1"]
    body = render(run, "email")
    assert "reproduce.sh" in body and "qmp device_add driver=pc-dimm id=dimm1 memdev=mem-dimm1" in body


def test_a_plan_without_recorded_output_is_not_comparable():
    """A run from before commands.jsonl kept outputs: a replay would compare nothing, so it is refused."""
    stripped = "\n".join(json.dumps({k: v for k, v in json.loads(x).items() if k != "stdout"})
                         for x in (SCEN / "commands.jsonl").read_text().splitlines())
    assert replaydriver.comparable(_plan())
    assert not replaydriver.comparable(replaydriver.make_plan((SCEN / "qmp.jsonl").read_text(), stripped))


def test_boot_to_boot_page_differences_are_not_a_different_observation():
    """Boot memory differs by a page between boots (measured: DMA32 managed 227104 vs 227103,
    MemTotal 4 kB apart); replay compares what changed since the first observation instead."""
    from harness.reports.replaydriver import diff, rebase
    rec = [{"MemTotal": 923776, "DMA32@0.managed": 227104, "memory32/state": "offline"},
           {"MemTotal": 1955968, "DMA32@0.managed": 227104, "memory32/state": "online"}]
    rep = [{"MemTotal": 923772, "DMA32@0.managed": 227103, "memory32/state": "offline"},
           {"MemTotal": 1955964, "DMA32@0.managed": 227103, "memory32/state": "online"}]
    assert all(not diff(rebase(a, rec[0]), rebase(b, rep[0])) for a, b in zip(rec, rep))
    off_by_a_page = dict(rep[1], MemTotal=rep[1]["MemTotal"] + 4)          # hotplug got one page wrong
    assert diff(rebase(rec[1], rec[0]), rebase(off_by_a_page, rep[0])) == [("MemTotal", 1032192, 1032196)]
    other_state = dict(rep[1], **{"memory32/state": "offline"})
    assert diff(rebase(rec[1], rec[0]), rebase(other_state, rep[0])) == [("memory32/state", "online", "offline")]


def test_reproducer_names_the_bzimage_when_memhp_booted_the_pvh_vmlinux():
    run = load_run(DATA)
    s = run.scenarios[0]
    assert "PVH" not in reproducer.script(run, s)          # recorded -kernel is a bzImage here
    pvh = s.argv.replace(shlex.split(s.argv)[shlex.split(s.argv).index("-kernel") + 1],
                         "/c/memhp/pvh/0123/vmlinux")
    text = reproducer.script(run, dataclasses.replace(s, argv=pvh))
    assert "through its PVH entry" in text and "KERNEL=/path/to/vmlinuz or bzImage" in text
    assert "KERNEL=${KERNEL:-/c/memhp/pvh/0123/vmlinux}" in text


def test_kill_with_parent_takes_the_child_down_with_a_killed_parent(tmp_path):
    """The reproducer's QEMU gets kill_with_parent(): SIGKILL the process that started it (a
    middle python here, starting `sleep` as the reproducer starts QEMU) and the child is gone too."""
    import signal
    import time
    pidfile = tmp_path / "child.pid"
    middle = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from harness.reports.replaydriver import kill_with_parent\n"
        "p = subprocess.Popen(['sleep', '300'], preexec_fn=kill_with_parent())\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(300)\n")])
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline and middle.poll() is None, "the middle process did not start sleep"
            time.sleep(0.05)
        child = int(pidfile.read_text())
        os.kill(middle.pid, signal.SIGKILL)
        middle.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, f"sleep (pid {child}) outlived its SIGKILLed parent"
            time.sleep(0.05)
    finally:
        if middle.poll() is None:
            middle.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"     # a zombie is dead, waiting for init to reap it
    except FileNotFoundError:
        return False
