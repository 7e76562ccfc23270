"""Fault-injection scenarios, run by tests/integration/test_faults.py through
`memhp run --scenarios tests/integration/fault_scenarios`, never collected by a plain pytest run
(tests/integration/conftest.py ignores this folder).

Each scenario boots its own real guest and injects one fault. The harness must classify it
(CRASH, HANG, INFRA) and go on: the order below puts every fault before another scenario,
so each later outcome shows the run survived the fault before it. Deadlines are small on
purpose; `elapsed_s` records how long the harness took to give its verdict.
"""
from __future__ import annotations

import dataclasses
import gzip
import shutil
import socket
import stat
import time

import pytest

from harness.vm.guest import VM
from harness.vm.image import CpioEntry, write_newc

CMD_TIMEOUT = 300.0   # a panicked guest must be reported long before this runs out
HANG_TIMEOUT = 5.0    # the stopped guest's command deadline
BOOT_TIMEOUT = 300.0  # the dropbear-less guest must be reported long before this runs out


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
    vm.guest.run("killall dropbear", timeout=30, transport="serial", check=True)
    res = vm.run("echo still-here; cat /proc/sys/kernel/osrelease", timeout=60)
    measure("transport", res.transport)
    assert res.ok, res
    assert "still-here" in res.stdout, res.stdout
    assert vm.kernel.release in res.stdout, res.stdout
    assert res.transport == "serial" and vm.guest.transport == "serial", res


def test_f6_ssh_channel_wedged(boot, measure, elapsed):
    """The guest stays up but the SSH channel of a running command wedges: the command stops
    every dropbear process, its own session included, so neither output nor exit status can
    come. Expected: HANG at the command's deadline; VM.close() still finishes promptly."""
    vm = boot()
    measure("cmd_timeout_s", HANG_TIMEOUT)
    t0 = time.monotonic()
    try:
        vm.run("kill -STOP $(pidof dropbear); echo never-seen", timeout=HANG_TIMEOUT)
    finally:
        measure("verdict_s", round(time.monotonic() - t0, 2))
        measure("guest_alive", vm.machine.alive and not vm.machine.paused())
        t1 = time.monotonic()
        vm.close()
        measure("close_s", round(time.monotonic() - t1, 2))


@pytest.mark.allow_splats
def test_f7_guest_reset(boot, measure, elapsed):
    """sysrq 'b' resets the machine at once; -no-reboot makes QEMU exit 0 with SHUTDOWN
    {guest: true, reason: guest-reset}. The kernel's doing: Expected CRASH, not INFRA."""
    vm = boot()
    measure("cmd_timeout_s", CMD_TIMEOUT)
    try:
        vm.run("echo b > /proc/sysrq-trigger", timeout=CMD_TIMEOUT)
    finally:
        measure("qemu_exit", vm.machine.proc.poll())
        measure("shutdown_events", [e.get("data") for e in vm.qmp.events() if e.get("event") == "SHUTDOWN"]
                if vm.qmp else None)


def test_f8_dropbear_fails_to_start(memhp_kernel, memhp_image, artifacts, accel_opt, tmp_path, measure, elapsed):
    """The guest's dropbear cannot start (its host key is garbage: a second cpio archive
    appended to the initramfs overrides the file), so init prints "memhp-init: dropbear
    failed". Expected: INFRA at once, quoting that line, not a HANG after the boot deadline."""
    initramfs = tmp_path / "initramfs.cpio.gz"
    shutil.copyfile(memhp_image.initramfs, initramfs)
    with open(initramfs, "ab") as f:
        f.write(gzip.compress(write_newc([CpioEntry("etc/dropbear/dropbear_ed25519_host_key",
                                                    stat.S_IFREG | 0o600, b"not a key\n")])))
    image = dataclasses.replace(memhp_image, initramfs=initramfs)
    measure("boot_timeout_s", BOOT_TIMEOUT)
    with VM(memhp_kernel, image, artifacts, accel=accel_opt, boot_timeout=BOOT_TIMEOUT):
        pass


@pytest.fixture
def accel_opt(pytestconfig):
    return pytestconfig.getoption("accel")


def test_f9_healthy_after_faults(boot):
    """A plain guest after all of the above. Expected: PASS."""
    vm = boot()
    res = vm.run("cat /proc/sys/kernel/osrelease", timeout=60, check=True)
    assert res.stdout.strip() == vm.kernel.release, res.stdout


def test_sigint_target_idles(boot):
    """Not part of the fault run (deselected there): test_faults.py's Ctrl-C test interrupts
    `memhp run` while this guest sleeps, then checks every QEMU is gone."""
    vm = boot()
    vm.run("echo SIGINT-TARGET-IDLE > /dev/console; sleep 600", timeout=700)
