"""Prototype, measurement only: is restoring a snapshot of a booted idle guest faster than a boot?

    .venv/bin/python tests/bench/snapshot.py --kernel debian:6.12 --runs 3

Per run, on one host and load: a fresh boot (QEMU launch -> first SSH command), then the booted
guest is stopped and migrated to a file (QMP `migrate` to "exec:cat > FILE"; QEMU 7.2 has no
"file:" URI), then a new QEMU with the same command line plus `-incoming "exec:cat FILE"` is timed
from launch to its first SSH command. The restored guest is compared with the saved one: the
baseline counters the scenarios start from (MemTotal, each zone's spanned/present/managed, every
memory block's state), SSH, the guest clock against the host's, and a pc-dimm hot-add (ACPI
still delivers the device, a new block appears). Nothing here is wired into the scenarios.
"""
from __future__ import annotations

import os
import sys

# This folder holds bisect.py, which would shadow the standard library's: the repo root instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from harness.cache import cache_root, ensure_dir  # noqa: E402
from harness.kernels.kernel import resolve  # noqa: E402
from harness.vm import machine as machine_mod  # noqa: E402
from harness.vm.guest import VM, Guest  # noqa: E402
from harness.vm.ssh import SSH  # noqa: E402
from harness.vm.image import build  # noqa: E402

MiB = 1024 * 1024
BASELINE = ("cat /sys/devices/system/memory/block_size_bytes; "
            "for b in /sys/devices/system/memory/memory*; do echo ${b##*/} $(cat $b/state); done; "
            "grep MemTotal /proc/meminfo; grep -E '^Node|spanned|present|managed' /proc/zoneinfo")
MIGRATE_S = 300


def _wait_migration(vm, deadline_s: float) -> dict:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        st = vm.qmp.execute("query-migrate")
        if st.get("status") in ("completed", "failed", "cancelled"):
            return st
        time.sleep(0.05)
    raise TimeoutError(f"migration not completed within {deadline_s:.0f} s")


def _clock_skew(vm) -> float:
    """Guest wall clock minus host wall clock, seconds (busybox date: whole seconds, plus the SSH round trip)."""
    t0 = time.time()
    g = float(vm.run("date +%s", timeout=60, check=True).stdout.strip())
    return g - (t0 + time.time()) / 2


def one_run(kernel, image, work: Path, n: int) -> dict:
    snap = work / f"snap-{n}.bin"
    fresh = VM(kernel, image, ensure_dir(work / f"fresh-{n}"))
    try:
        fresh.start()
        t = fresh.machine.times
        boot_s = t["ssh"] - t["launch"]
        saved = fresh.run(BASELINE, timeout=60, check=True).stdout
        saved_skew = _clock_skew(fresh)
        fresh.guest._ssh.close()                 # no TCP connection inside the saved slirp state
        fresh.guest._ssh = None
        t0 = time.monotonic()
        fresh.qmp.execute("stop")
        fresh.qmp.execute("migrate", {"uri": f"exec:cat > {snap}"})
        st = _wait_migration(fresh, MIGRATE_S)
        save_s = time.monotonic() - t0
        if st["status"] != "completed":
            raise RuntimeError(f"migration {st['status']}: {st}")
    finally:
        fresh.machine.shutdown()
    size_mb = snap.stat().st_size / MiB

    restored = VM(kernel, image, ensure_dir(work / f"restored-{n}"))
    restored.machine.ready_marker = None          # init printed it before the snapshot
    orig = machine_mod.build_argv
    machine_mod.build_argv = lambda c, rt: orig(c, rt) + ["-incoming", f"exec:cat {snap}"]
    try:
        m = restored.machine
        m.launch()                                # its `cont` does not start a -S guest in inmigrate
    finally:
        machine_mod.build_argv = orig
    try:
        end = time.monotonic() + MIGRATE_S
        while m.qmp.execute("query-migrate").get("status") != "completed":
            if time.monotonic() > end or not m.alive:
                raise TimeoutError("the incoming migration did not complete")
            time.sleep(0.02)
        if m.qmp.execute("query-status")["status"] != "running":
            m.qmp.execute("cont")
        m.times["running"] = time.monotonic()
        ssh = SSH("127.0.0.1", m.runtime.ssh_port, image.ssh_key, image.host_key_pub)
        ssh.connect(timeout=60, alive=lambda: m.alive)
        m.times["ssh"] = time.monotonic()
        restored.guest = Guest(m, ssh)
        t = restored.machine.times
        restore_s = t["ssh"] - t["launch"]
        now = restored.run(BASELINE, timeout=60, check=True).stdout
        skew = _clock_skew(restored)
        from harness.memory.dimm import add_dimm
        blocks0 = int(restored.run("ls -d /sys/devices/system/memory/memory* | wc -l", check=True).stdout)
        add_dimm(restored.qmp, 128 * MiB)
        deadline, blocks1 = time.monotonic() + 60, blocks0
        while time.monotonic() < deadline and blocks1 == blocks0:
            blocks1 = int(restored.run("ls -d /sys/devices/system/memory/memory* | wc -l", check=True).stdout)
            time.sleep(0.2)
        dmesg = restored.run("dmesg | tail -5", timeout=60).stdout
    finally:
        restored.close()
        snap.unlink(missing_ok=True)
    return {"boot_s": boot_s, "save_s": save_s, "restore_s": restore_s, "size_mb": size_mb,
            "same_baseline": now == saved, "diff": [(a, b) for a, b in zip(saved.splitlines(), now.splitlines())
                                                     if a != b][:5],
            "load_s": t["running"] - t["launch"], "skew_saved_s": saved_skew, "skew_restored_s": skew, "dimm_blocks": (blocks0, blocks1),
            "dmesg_tail": dmesg.strip().splitlines()[-2:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="debian:6.12")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    kernel = resolve(a.kernel)
    image = build(kernel)
    work = Path(tempfile.mkdtemp(prefix="snapshot-", dir=ensure_dir(cache_root() / "logs")))
    print(f"kernel {kernel.release}, -kernel {os.environ.get('MEMHP_ENTRY', 'default entry')}, logs {work}")
    runs = []
    for n in range(1, a.runs + 1):
        r = one_run(kernel, image, work, n)
        runs.append(r)
        print(f"run {n}: fresh boot {r['boot_s']:.2f}s, save {r['save_s']:.2f}s ({r['size_mb']:.0f} MiB), "
              f"restore -> SSH {r['restore_s']:.2f}s (running after {r['load_s']:.2f}s); baseline {'same' if r['same_baseline'] else r['diff']}; "
              f"clock skew saved {r['skew_saved_s']:+.1f}s restored {r['skew_restored_s']:+.1f}s; "
              f"DIMM blocks {r['dimm_blocks'][0]} -> {r['dimm_blocks'][1]}", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in ("boot_s", "save_s", "restore_s")}
    print(f"medians of {len(runs)}: fresh boot {med['boot_s']:.2f}s, save {med['save_s']:.2f}s, "
          f"restore {med['restore_s']:.2f}s (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
