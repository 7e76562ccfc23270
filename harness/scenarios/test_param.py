"""memory_hotplug.memmap_on_memory: what each boot-time spelling reads back, and that it is read-only.

Guests: boot() per value. The parameter can only be set on the kernel command line, so every
value needs its own guest (one short boot each; nothing is hot-added).

Rules (expect.expected_param_readback): 1, y and on read "Y"; 0 reads "N"; force reads "force"
from 6.6 on and "N" before (6.1's bool parser takes the leading "f" as false); "Force" reads
"N" everywhere (6.6+ accepts only force and FORCE, then kstrtobool). Before 5.13 there is no
such parameter: SKIP, saying so. On every
version the file is mode 0444 and a write is refused, leaving the value as it was.
"""
from __future__ import annotations

import pytest

from harness.memory import expect
from harness.memory.checks import Verdict, Verdicts

PARAM_FILE = "/sys/module/memory_hotplug/parameters/memmap_on_memory"
VALUES = ("1", "y", "on", "force", "Force", "0")
READONLY_RULE = ("mm/memory_hotplug.c registers memmap_on_memory with mode 0444: sysfs has no store "
                 "for it, so opening it for writing fails (EACCES) even for root, and the value stays")


@pytest.mark.parametrize("value", VALUES)
def test_param_readback(boot, measure, value):
    vm = boot(memmap_on_memory=value)
    g = vm.guest
    v = Verdicts()
    release = g.run("uname -r", timeout=30, check=True).stdout.strip()
    version = expect.parse_release(release)
    if version[:2] < expect.V_FEATURE:
        measure("feature_unavailable", f"feature not present in this kernel ({release}): "
                                       f"memory_hotplug.memmap_on_memory arrived in 5.13")
        pytest.skip(f"feature not present in this kernel ({release}): memory_hotplug.memmap_on_memory arrived in 5.13")
    cmdline = g.read("/proc/cmdline").split()
    v.eq("kernel command line", True, f"memory_hotplug.memmap_on_memory={value}" in cmdline,
         "the guest booted with the value under test (else the readback proves nothing)")
    want = expect.expected_param_readback(version, value)
    got = g.read(PARAM_FILE).strip()
    measure("readback", {"written": value, "read": got, "kernel": release})
    v.eq(f"{PARAM_FILE} after booting with ={value} on {release}", want, got,
         expect.expected_param_readback.__doc__.strip().splitlines()[0] + " (kstrtobool; force is 6.6+)")
    mode = g.run(f"stat -c %a {PARAM_FILE}", timeout=30, check=True).stdout.strip()
    v.eq(f"mode of {PARAM_FILE}", "444", mode, READONLY_RULE)
    other = "N" if got == "Y" else "Y"
    res = g.write(PARAM_FILE, other)
    text = " ".join((res.stderr + " " + res.stdout).split())
    v.add(Verdict(f"echo {other} > {PARAM_FILE}", not res.ok, "refused",
                  f"refused (status {res.status}): {text}" if not res.ok else "accepted", READONLY_RULE))
    v.eq(f"{PARAM_FILE} after the refused write", got, g.read(PARAM_FILE).strip(), READONLY_RULE)
    v.raise_if_failed()
