"""`memhp bench`: real boots alternating between two CPU models, one line each, the boot's phases,
a (narrowed) suite run, then the ratios. No timing asserts: the host is shared, so only the shape
of the output, the sign of the figures and their arithmetic (phases add up to the ssh-ready time)
are judged."""
from __future__ import annotations

import re

import pytest

from memhp_helpers import run_memhp, show

pytestmark = pytest.mark.guest

RUNS = 1
CPUS = ("max", "qemu64")     # the boots alternate between the models: RUNS boots each
BOOT_LINE = re.compile(r"^boot (\d+): serial-ready (\d+\.\d+)s  ssh-ready (\d+\.\d+)s  "
                       r"kernel-to-/init (\d+\.\d+)s  \(before the kernel (-?\d+\.\d+)s, init (-?\d+\.\d+)s, "
                       r"ssh (-?\d+\.\d+)s; ratio (\d+\.\d+); accel (tcg|kvm)\) cpu (\S+)$")
CPU_LINE = re.compile(r"^cpu (\S+): (\d+) boots, median ssh-ready (\d+\.\d+)s, kernel time to /init "
                      r"(\d+\.\d+)s, .* ssh_ready_ratio (\d+\.\d+)$")
PHASE_LINE = re.compile(r"^  (QEMU start -> first firmware output|firmware -> kernel entry|kernel entry -> /init "
                        r"\(dmesg\)|/init -> dropbear listening|listening -> SSH command ran)\s+(-?\d+\.\d+)s")
INIT_STEP = re.compile(r"^    /init -> (init started|modules loaded|network up|dropbear listening)\s+(-?\d+\.\d+)s$")
LAST = re.compile(r"^ssh_ready_ratio=(\d+\.\d+) suite_ratio=(\d+\.\d+) serial_ready_ratio=(\d+\.\d+) "
                  r"runs=(\d+) kernel=(\S+)$")
SUITE = re.compile(r"^suite: (\d+)s wall with --jobs (\d+) -k 'dimm_lifecycle'")


def test_bench_boots_phases_and_suite(record_property):
    p = run_memhp(["bench", "--kernel", "debian:6.12", "--runs", str(RUNS), "--cpu", ",".join(CPUS),
                   "-k", "dimm_lifecycle"], timeout=RUNS * len(CPUS) * 600 + 1800)
    assert p.returncode == 0, show(p)
    lines = p.stdout.strip().splitlines()
    boots = [m for m in map(BOOT_LINE.match, lines) if m]
    assert [int(m.group(1)) for m in boots] == list(range(1, RUNS * len(CPUS) + 1)), show(p)
    # Each boot's QEMU got the model its turn named (read back from its argv), in alternation.
    assert [m.group(10) for m in boots] == list(CPUS) * RUNS, show(p)
    per_cpu = {m.group(1): m for m in map(CPU_LINE.match, lines) if m}
    assert list(per_cpu) == list(CPUS) and all(int(m.group(2)) == RUNS for m in per_cpu.values()), show(p)
    for m in boots:
        serial, ssh, init = map(float, m.group(2, 3, 4))
        # Host-observed ready times include the kernel's own boot, and SSH comes after the serial marker.
        assert 0 < init < serial <= ssh, m.group(0)
        # The boot's own split adds up to its ssh-ready time (each figure rounded to 10 ms).
        before, after_init, last_ssh = map(float, m.group(5, 6, 7))
        assert abs(before + init + after_init + last_ssh - ssh) <= 0.03, m.group(0)
        assert abs(float(m.group(8)) - ssh / init) <= 0.02, m.group(0)
    phases = {m.group(1): float(m.group(2)) for m in map(PHASE_LINE.match, lines) if m}
    assert len(phases) == 5, show(p)
    # The SeaBIOS debug port is attached: the first phase ends at the firmware's first output.
    assert "QEMU start -> first firmware output" in phases, show(p)
    assert all(v > 0 for v in phases.values()), phases
    steps = {m.group(1): float(m.group(2)) for m in map(INIT_STEP.match, lines) if m}
    assert list(steps) == ["init started", "modules loaded", "network up", "dropbear listening"], show(p)
    # init's marks are consecutive dmesg timestamps, printed in the order init reaches them.
    assert all(v >= 0 for v in steps.values()), steps
    suite = next((m for m in map(SUITE.match, lines) if m), None)
    assert suite and int(suite.group(1)) > 0, show(p)
    last = LAST.match(lines[-1])
    assert last, f"last line is not machine-readable: {lines[-1]!r}" + show(p)
    ssh_ratio, suite_ratio, serial_ratio = map(float, last.group(1, 2, 3))
    assert 0 < serial_ratio <= ssh_ratio < suite_ratio, lines[-1]
    assert int(last.group(4)) == RUNS and last.group(5).startswith("6.12.")
    # The last line's figures are those of the first model's boots.
    assert last.group(1) == per_cpu[CPUS[0]].group(5), show(p)
    record_property("bench", {"serial_ready_ratio": serial_ratio, "ssh_ready_ratio": ssh_ratio,
                              "suite_ratio_k_dimm_lifecycle": suite_ratio, "phases": phases,
                              "boots": [m.group(0) for m in boots]})
    print("\n" + p.stdout)
