"""`memhp bench`: N real boots, one line each, then the ready-time ratios. No timing asserts:
the host is shared, so only the shape of the output and the sign of the figures are judged."""
from __future__ import annotations

import re

import pytest

from memhp_helpers import run_memhp, show

pytestmark = pytest.mark.guest

RUNS = 3
BOOT_LINE = re.compile(r"^boot (\d+): serial-ready (\d+\.\d+)s  ssh-ready (\d+\.\d+)s  "
                       r"kernel-to-/init (\d+\.\d+)s  \(accel (tcg|kvm)\)$")
RATIOS = re.compile(r"serial_ready_ratio=(\d+\.\d+) ssh_ready_ratio=(\d+\.\d+)")


def test_bench_three_boots(record_property):
    p = run_memhp(["bench", "--kernel", "debian:6.12", "--runs", str(RUNS)], timeout=RUNS * 600)
    assert p.returncode == 0, show(p)
    lines = p.stdout.strip().splitlines()
    boots = [m for m in map(BOOT_LINE.match, lines) if m]
    assert [int(m.group(1)) for m in boots] == list(range(1, RUNS + 1)), show(p)
    for m in boots:
        serial, ssh, init = map(float, m.group(2, 3, 4))
        # Host-observed ready times include the kernel's own boot, and SSH comes after the serial marker.
        assert 0 < init and 0 < serial <= ssh, m.group(0)
    last = RATIOS.search(lines[-1])
    assert last, f"last line has no ratios: {lines[-1]!r}" + show(p)
    serial_ratio, ssh_ratio = map(float, last.groups())
    assert serial_ratio > 0 and ssh_ratio > 0 and ssh_ratio >= serial_ratio, lines[-1]
    assert f"runs={RUNS}" in lines[-1] and "kernel=6.12." in lines[-1]
    record_property("bench", {"serial_ready_ratio": serial_ratio, "ssh_ready_ratio": ssh_ratio,
                              "boots": [m.group(0) for m in boots]})
    print("\n" + p.stdout)
