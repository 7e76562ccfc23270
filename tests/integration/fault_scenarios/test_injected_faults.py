"""Fault-injection scenarios, run by tests/integration/test_faults.py through
`memhp run --scenarios tests/integration/fault_scenarios`, never collected by a plain pytest run
(tests/integration/conftest.py ignores this folder).

Each scenario boots its own real guest and injects one fault. The harness must classify it
(CRASH, HANG, INFRA) and go on: the order below puts every fault before another scenario,
so each later outcome shows the run survived the fault before it. Deadlines are small on
purpose; `elapsed_s` records how long the harness took to give its verdict.
"""
from __future__ import annotations

import socket
import time

import pytest

CMD_TIMEOUT = 300.0   # a panicked guest must be reported long before this runs out
HANG_TIMEOUT = 5.0    # the stopped guest's command deadline


@pytest.fixture
def elapsed(measure):
    t0 = time.monotonic()
    yield
    measure("elapsed_s", round(time.monotonic() - t0, 2))


@pytest.mark.allow_splats
def test_f1_guest_panic(boot, measure, elapsed):
    """sysrq 'c' panics the kernel; pvpanic pauses QEMU (GUEST_PANICKED). Expected: CRASH, fast."""
    vm = boot()
    measure("cmd_timeout_s", CMD_TIMEOUT)
    try:
        vm.run("echo c > /proc/sysrq-trigger", timeout=CMD_TIMEOUT)
    finally:
        measure("guest_panicked_event", any(e.get("event") == "GUEST_PANICKED" for e in vm.qmp.events()))


def test_f2_guest_stops_responding(boot, measure, elapsed):
    """QMP `stop` freezes the vCPUs: the guest answers nothing. Expected: HANG, bounded."""
    vm = boot()
    vm.qmp.execute("stop")
    measure("cmd_timeout_s", HANG_TIMEOUT)
    vm.run("true", timeout=HANG_TIMEOUT)


def test_f3_qemu_sigkilled(boot, elapsed):
    """QEMU dies under the scenario (SIGKILL). Expected: INFRA, not a hang."""
    vm = boot()
    vm.machine.kill()
    vm.run("true", timeout=CMD_TIMEOUT)


def test_f4_qmp_connection_dropped(boot, measure, elapsed):
    """The QMP connection drops (its socket shut down under the client) while the scenario
    waits for an event. Expected: INFRA, promptly, from both wait_event and execute."""
    vm = boot()
    sock = vm.qmp._client._writer.get_extra_info("socket")
    sock.shutdown(socket.SHUT_RDWR)
    try:
        vm.qmp.execute("query-status")
    except Exception as e:  # recorded; the wait below is what the outcome comes from
        measure("execute_error", f"{type(e).__name__}: {e}")
    vm.qmp.wait_event("DEVICE_DELETED", timeout=CMD_TIMEOUT)


def test_f5_dropbear_killed(boot, measure, elapsed):
    """dropbear dies in the guest (killed from the serial shell). Expected: PASS, because
    memhp falls back to the serial console and the command still runs."""
    vm = boot()
    vm.console.run("killall dropbear", timeout=30).check()
    res = vm.run("echo still-here; cat /proc/sys/kernel/osrelease", timeout=60)
    measure("transport", res.transport)
    assert res.ok, res
    assert "still-here" in res.stdout, res.stdout
    assert vm.kernel.release in res.stdout, res.stdout
    assert res.transport == "serial" and vm.guest.transport == "serial", res


def test_f6_healthy_after_faults(boot):
    """A plain guest after all of the above. Expected: PASS."""
    vm = boot()
    res = vm.run("cat /proc/sys/kernel/osrelease", timeout=60, check=True)
    assert res.stdout.strip() == vm.kernel.release, res.stdout


def test_sigint_target_idles(boot):
    """Not part of the fault run (deselected there): test_faults.py's Ctrl-C test interrupts
    `memhp run` while this guest sleeps, then checks every QEMU is gone."""
    vm = boot()
    vm.run("echo SIGINT-TARGET-IDLE > /dev/console; sleep 600", timeout=700)
