"""Never hang, never lie: faults injected into real guests are classified, and the run goes on.

The fault scenarios live in fault_scenarios/ and run through `memhp run --scenarios`, as a
user would run a suite; this module reads the classified results (JSON, JUnit, table, exit
status). Ctrl-C and the broken-KVM paths drive `memhp` directly.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import FAULT_SCENARIOS, MEMHP, qemu_processes, run_dir_of, wait_gone

pytestmark = [pytest.mark.guest, pytest.mark.faults]

MOD = "injected_faults::"
# scenario -> the outcome memhp must give it. Each fault is followed by another scenario, whose
# own correct outcome shows that the run survived the fault before it.
EXPECTED = {
    "f1_guest_panic": "crash",
    "f2_guest_stops_responding": "hang",
    "f3_qemu_sigkilled": "infra",
    "f4_qmp_connection_dropped": "infra",
    "f5_dropbear_killed": "pass",
    "f6_ssh_channel_wedged": "hang",
    "f7_guest_reset": "crash",
    "f8_dropbear_fails_to_start": "infra",
    "f9_healthy_after_faults": "pass",
}
ORDER = list(EXPECTED)


@pytest.fixture(scope="module")
def fault_run(memhp_cli, memhp_spec, tmp_path_factory):
    d = tmp_path_factory.mktemp("fault-run")
    res = memhp_cli(["run", "--kernel", memhp_spec, "--accel", "auto", "--scenarios", FAULT_SCENARIOS,
                     "-k", "not sigint_target", "--json", d / "report.json", "--junit", d / "junit.xml",
                     "--artifacts", d / "artifacts"], timeout=900)
    assert (d / "report.json").exists(), f"memhp run wrote no JSON report\n{res}"
    doc = json.loads((d / "report.json").read_text())
    results = {r["name"][len(MOD):]: r for r in doc["results"]}
    return res, doc, results, ET.parse(d / "junit.xml").getroot()


def _check_outcome(results, name, res):
    assert name in results, f"scenario {name} did not run\n{res}"
    r = results[name]
    assert r["outcome"] == EXPECTED[name], (
        f"{name}: expected outcome {EXPECTED[name].upper()}, memhp said {r['outcome'].upper()}: "
        f"{r['message'][:800]}")
    return r


@pytest.mark.parametrize("name", ORDER[:-1])
def test_fault_classified_and_next_scenario_runs(fault_run, name):
    res, doc, results, _ = fault_run
    r = _check_outcome(results, name, res)
    nxt = ORDER[ORDER.index(name) + 1]
    _check_outcome(results, nxt, res)   # the next scenario ran and got its own verdict
    m = r["measurements"]
    if name == "f1_guest_panic":
        assert "Kernel panic - not syncing: sysrq triggered crash" in r["message"], r["message"]
        assert m.get("guest_panicked_event") is True, \
            f"pvpanic did not report GUEST_PANICKED (pvpanic_mmio loaded?): {m}"
        assert m["elapsed_s"] < m["cmd_timeout_s"] / 2, \
            f"the panic was reported after {m['elapsed_s']}s: it waited out the command timeout"
    elif name == "f2_guest_stops_responding":
        assert r["message"].startswith("Hang: timed out after"), r["message"]
    elif name == "f3_qemu_sigkilled":
        assert "QEMU exited with status -9" in r["message"], r["message"]
    elif name == "f4_qmp_connection_dropped":
        assert "QMPError" in r["message"] and "QMP connection closed" in r["message"], r["message"]
        assert m.get("execute_error", "").startswith("QMPError"), m
    elif name == "f5_dropbear_killed":
        assert m.get("transport") == "serial", m
    elif name == "f6_ssh_channel_wedged":
        assert r["message"].startswith("Hang: timed out after 5.0s waiting for guest command"), r["message"]
        assert m["guest_alive"] is True, m            # the guest was up: only the channel wedged
        # The verdict comes at the command's deadline (plus the watchdog's grace at most), and
        # closing the VM (dmesg over serial, quit) does not wait on the wedged channel.
        assert m["verdict_s"] < m["cmd_timeout_s"] + 10, m
        assert m["close_s"] < 60, m
    elif name == "f7_guest_reset":
        assert "SHUTDOWN" in r["message"] and "guest-reset" in r["message"], r["message"]
        assert m["shutdown_events"] == [{"guest": True, "reason": "guest-reset"}], m
        assert m["elapsed_s"] < m["cmd_timeout_s"] / 2, m
    elif name == "f8_dropbear_fails_to_start":
        assert "memhp-init: dropbear failed" in r["message"], r["message"]
        assert m["elapsed_s"] < m["boot_timeout_s"] / 2, f"reported after the boot deadline, not at once: {m}"


def test_fault_run_reports(fault_run):
    """Exit status 1 (the kernel failed), the one-line summary, the table, JSON and JUnit agree."""
    res, doc, results, junit = fault_run
    assert sorted(results) == sorted(EXPECTED), res
    for name in ORDER:
        _check_outcome(results, name, res)
    want = {o: sum(1 for v in EXPECTED.values() if v == o) for o in ("pass", "fail", "crash", "hang", "infra", "skip")}
    assert res.rc == 1, f"CRASH/HANG present: memhp run must exit 1\n{res}"
    assert doc["exit_status"] == 1 and doc["summary"] == want, doc["summary"]
    line = (f"memhp: {want['pass']} pass, 0 fail, {want['crash']} crash, {want['hang']} hang, "
            f"{want['infra']} infra, 0 skip ({len(EXPECTED)} scenarios)")
    assert line in res.stdout.splitlines()[-1], res.stdout[-500:]
    for name, outcome in EXPECTED.items():
        assert re.search(rf"^{re.escape(MOD + name)}\s+{outcome.upper()}\s", res.stdout, re.M), res.stdout
    assert junit.get("tests") == str(len(EXPECTED)) and junit.get("failures") == "0"
    assert junit.get("errors") == str(want["crash"] + want["hang"] + want["infra"])
    for tc in junit.iter("testcase"):
        name = tc.get("name")[len(MOD):]
        err = tc.find("error")
        if EXPECTED[name] == "pass":
            assert err is None and tc.find("failure") is None, name
        else:
            assert err is not None and err.get("type") == EXPECTED[name], name
    assert "Traceback" not in res.stderr, res.stderr
    for name in ORDER:
        r = results[name]
        print(f"{name:<28} {r['outcome'].upper():<6} {r['duration']:6.1f}s  verdict after "
              f"{r['measurements'].get('elapsed_s', '-')}s  {' '.join(r['message'].split())[:70]}")


def test_infra_only_run_exits_3(memhp_cli, memhp_spec, tmp_path):
    res = memhp_cli(["run", "--kernel", memhp_spec, "--scenarios", FAULT_SCENARIOS, "-k", "f3_qemu_sigkilled",
                     "--json", tmp_path / "r.json"], timeout=600)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["outcome"] for r in doc["results"]] == ["infra"], res
    assert res.rc == 3, f"only INFRA: memhp run must exit 3\n{res}"
    assert "memhp: 0 pass, 0 fail, 0 crash, 0 hang, 1 infra, 0 skip (1 scenarios)" in res.stdout, res


def _start_idle_run(session_tmp, memhp_spec, tmp_path):
    """`memhp run` of the sigint_target scenario, returned once its guest idles in a command:
    (process, TMPDIR it runs under, the QEMU's run folders)."""
    tmp = Path(tempfile.mkdtemp(prefix="sig-", dir=session_tmp))
    art = tmp_path / "artifacts"
    argv = [str(MEMHP), "run", "--kernel", memhp_spec, "--scenarios", str(FAULT_SCENARIOS),
            "-k", "sigint_target", "--artifacts", str(art)]
    proc = subprocess.Popen(argv, env=dict(os.environ, TMPDIR=str(tmp)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while True:  # wait until the guest is up and running the scenario's command
        logs = list(art.rglob("console.log"))
        if logs and "SIGINT-TARGET-IDLE" in logs[0].read_text(errors="replace").replace(
                "echo SIGINT-TARGET-IDLE", ""):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the scenario's guest never started its command (exit {proc.returncode}): {err[-2000:]}")
        time.sleep(0.1)
    before = qemu_processes(str(tmp))
    assert len(before) == 1, before
    run_dirs = [run_dir_of(a) for _, a in before]
    assert all(d is not None and d.is_dir() for d in run_dirs), run_dirs
    return proc, tmp, run_dirs


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_signal_stops_every_qemu(session_tmp, memhp_spec, tmp_path, sig):
    """Ctrl-C, or the terminal closing (SIGHUP, handled like SIGTERM), mid-run: every QEMU
    child is gone within 5 s, its run folder too; exit 130."""
    proc, tmp, run_dirs = _start_idle_run(session_tmp, memhp_spec, tmp_path)
    try:
        proc.send_signal(sig)
        t0 = time.monotonic()
        left = wait_gone(str(tmp), 5.0)
        gone_after = time.monotonic() - t0
        assert not left, f"QEMU still alive {gone_after:.1f}s after {sig.name}: {left}"
        while any(d.exists() for d in run_dirs) and time.monotonic() - t0 < 5.0:
            time.sleep(0.05)
        dirs_after = time.monotonic() - t0
        assert not [d for d in run_dirs if d.exists()], f"run folders still there 5 s after {sig.name}: {run_dirs}"
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"{sig.name}: QEMU gone {gone_after:.2f}s, run folders {dirs_after:.2f}s after the signal")
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "memhp: error: interrupted" in err, err[-2000:]
    assert not list(tmp.glob("memhp-*")), list(tmp.glob("memhp-*"))


def test_sigkill_of_memhp_kills_qemu_within_1s(session_tmp, memhp_spec, tmp_path):
    """memhp itself SIGKILLed (no handler, no cleanup runs): QEMU dies with it through the
    parent-death signal, within 1 s. Every folder the run made for its artifacts is 0700, and the
    QEMU's run folder names its owner's pid."""
    proc, tmp, run_dirs = _start_idle_run(session_tmp, memhp_spec, tmp_path)
    art = tmp_path / "artifacts"
    modes = {str(d): oct(d.stat().st_mode & 0o777) for d in [art, *art.rglob("*")] if d.is_dir()}
    assert set(modes.values()) == {"0o700"}, modes
    assert all((d / "pid").read_text().split() for d in run_dirs), run_dirs   # written at creation
    try:
        proc.kill()
        t0 = time.monotonic()
        proc.wait(timeout=10)
        left = wait_gone(str(tmp), 1.0)
        gone_after = time.monotonic() - t0
    finally:
        for pid, _ in qemu_processes(str(tmp)):   # never leave one behind, even when failing
            os.kill(pid, signal.SIGKILL)
        proc.communicate()
    print(f"SIGKILL: QEMU gone {gone_after:.2f}s after memhp died")
    assert not left, f"QEMU outlived a SIGKILLed memhp by more than 1 s: {left}"


def test_sigkilled_boot_leaves_a_run_folder_the_next_command_removes(session_tmp, memhp_spec, tmp_path):
    """`memhp boot` runs its Machine in its own process: SIGKILLed, nothing of it cleans up, so its
    $TMPDIR/memhp-* run folder stays. The folder names its owner's pid from creation
    (cache.make_run_dir), so the next memhp command's clean_stale() removes it at once (not only
    after RUN_DIR_MAX_AGE). Its --logs folder is created 0700."""
    tmp = Path(tempfile.mkdtemp(prefix="kill9-", dir=session_tmp))
    logs = tmp_path / "logs" / "boot"
    proc = subprocess.Popen([str(MEMHP), "boot", "--kernel", memhp_spec, "--logs", str(logs), "--", "sleep 600"],
                            env=dict(os.environ, TMPDIR=str(tmp)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ((logs / "console.log").exists() and "Run /init" in (logs / "console.log").read_text(errors="replace")):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the guest never reached /init (exit {proc.returncode}): {proc.communicate()[1][-2000:]}")
            time.sleep(0.2)
        run_dirs = [run_dir_of(a) for _, a in qemu_processes(str(tmp))]
        assert len(run_dirs) == 1 and run_dirs[0] is not None, run_dirs
        run_dir = run_dirs[0]
        assert (run_dir / "pid").read_text().split() == [str(proc.pid)]
        assert {oct(d.stat().st_mode & 0o777) for d in (tmp_path / "logs", logs, run_dir)} == {"0o700"}
        proc.kill()
        proc.wait(timeout=10)
        left = wait_gone(str(tmp), 10.0)
    finally:
        for pid, _ in qemu_processes(str(tmp)):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert not left, left
    assert run_dir.is_dir(), "nothing of a SIGKILLed memhp should have run to remove its folder"
    res = subprocess.run([str(MEMHP), "kernel", "fetch", memhp_spec], env=dict(os.environ, TMPDIR=str(tmp)),
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not run_dir.exists(), f"the next memhp command left the dead run's folder {run_dir}"


# ---------------------------------------------------------------- KVM present but broken
def kvm_boots(kernel_image: Path, timeout: float = 20.0) -> bool:
    """Independent of memhp: does a kernel print its banner under KVM here? (the world we are in)"""
    if not os.path.exists("/dev/kvm"):
        return False
    p = subprocess.Popen(["qemu-system-x86_64", "-accel", "kvm", "-M", "pc", "-cpu", "host", "-m", "256",
                          "-nodefaults", "-display", "none", "-no-reboot", "-kernel", str(kernel_image),
                          "-append", "console=ttyS0 panic=-1", "-serial", "stdio"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        os.set_blocking(p.stdout.fileno(), False)
        buf, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = p.stdout.read() or b""
            buf += chunk
            if b"Linux version" in buf:
                return True
            if not chunk and p.poll() is not None:
                return False
            time.sleep(0.05)
        return False
    finally:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def kvm_works(memhp_kernel) -> bool:
    return kvm_boots(Path(memhp_kernel.image))


def _accel_in(logs: Path) -> str:
    return re.search(r"-accel (\w+)", (logs / "argv.txt").read_text()).group(1)


def test_accel_kvm_forced(memhp_cli, memhp_spec, kvm_works, tmp_path):
    """--accel kvm: works where KVM works; where KVM is present but broken, fails fast (exit 3)."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent: --accel kvm has nothing to test")
    res = memhp_cli(["boot", "--kernel", memhp_spec, "--accel", "kvm", "--logs", tmp_path, "--", "true"],
                    timeout=300)
    assert "Traceback" not in res.stderr, res
    assert not res.qemus(), res.qemus()
    if kvm_works:
        assert res.rc == 0, res
        assert _accel_in(tmp_path) == "kvm"
        return
    assert res.rc == 3, f"broken KVM forced: exit 3 expected\n{res}"
    assert res.wall < 30, f"--accel kvm took {res.wall:.1f}s to fail\n{res}"
    assert len(res.err_lines) == 1 and res.err_lines[0].startswith("memhp: error: "), res
    assert "KVM" in res.err_lines[0], res


def test_accel_auto_falls_back(memhp_cli, memhp_spec, kvm_works, tmp_path):
    """--accel auto: KVM where it works; else TCG, with one warning line, both when it probes KVM
    (fresh cache) and when it remembers the verdict (second run, same cache)."""
    from harness.cache import cache_root
    real = cache_root()
    cache = tmp_path / "cache"
    cache.mkdir()
    for sub in ("kernels", "images", "debs", "configs"):  # share the big stages; not the KVM verdict
        if (real / sub).exists():
            (cache / sub).symlink_to(real / sub)
    for run in ("probe", "remembered"):
        logs = tmp_path / run
        res = memhp_cli(["boot", "--kernel", memhp_spec, "--accel", "auto", "--logs", logs, "--", "true"],
                        env={"MEMHP_CACHE": str(cache)}, timeout=600)
        assert res.rc == 0, res
        assert not res.qemus(), res.qemus()
        kvm_warnings = [ln for ln in res.err_lines if "KVM" in ln]
        if kvm_works:
            assert _accel_in(logs) == "kvm" and not kvm_warnings, res
        elif not os.path.exists("/dev/kvm"):
            assert _accel_in(logs) == "tcg" and not kvm_warnings, res
        else:
            assert _accel_in(logs) == "tcg", res
            assert len(kvm_warnings) == 1 and kvm_warnings[0].startswith("memhp: warning: KVM is present but"), \
                f"{run}: want exactly one KVM warning line\n{res}"
            if run == "probe":
                assert "falling back to TCG" in kvm_warnings[0], res
            else:
                assert "found broken before" in kvm_warnings[0], res
