"""The kernel's own selftest, tools/testing/selftests/memory-hotplug/mem-on-off-test.sh, run in
the guest, from Debian's linux-source package of the guest kernel's line (harness.kernels.selftest).

Boots its own guest (`boot()`): the script onlines every offline block, offlines some online
ones (boot memory included) and injects notifier errors, so it leaves the guest changed.
Before it runs, two one-block DIMMs are hot-added and left offline, so the script's "online
all hot-pluggable memory" and "offline N%" steps work on hot-added memory too, not only on
boot memory. For its second half (notifier error injection) the guest gets debugfs mounted and
the kernel's memory-notifier-error-inject module (with its dependency) pushed into
/lib/modules and indexed with busybox depmod, so the script's own `modprobe` finds it.

Verdict (kselftest): the exit code must be what the script's own logic gives for its output
(selftest.judge: 4 only after "skip all tests:", 1 after a failed step, else 0). A whole skip
is a FAIL here: on this guest every prerequisite the script checks (root, sysfs, memory
blocks, removable blocks) holds. The script exits 0 when it skips only its second half; that
passes when the kernel has no error injector or no debugfs (the skipped part is recorded),
and is a FAIL when the kernel has both. The script's output is saved as selftest-output.txt in the
artifacts and its lines of interest are recorded as measurements.
"""
from __future__ import annotations

import shlex
from pathlib import Path
import time

from harness.kernels import modules, selftest
from harness.memory.checks import Verdicts
from harness.scenarios._common import facts_as_booted, hot_added

GUEST_DIR = "/tmp/memhp-selftest"


def push(vm, path: str, data: bytes) -> None:
    vm.guest.run(f"mkdir -p {shlex.quote(path.rsplit('/', 1)[0])} && cat > {shlex.quote(path)}",
                 timeout=120, stdin=data, check=True)


def install_inject_module(vm, kernel) -> list:
    """Push memory-notifier-error-inject (dependencies first) into the guest's /lib/modules and
    run depmod; returns the module file names pushed ([] when the kernel has none to push)."""
    if not kernel.modules:
        return []
    kos = modules.closure(kernel.modules, (selftest.INJECT_MODULE,))
    release = vm.run("uname -r", check=True).stdout.strip()
    for ko in kos:
        push(vm, f"/lib/modules/{release}/{ko.relative_to(kernel.modules)}", ko.read_bytes())
    if kos:
        vm.run(f"depmod {shlex.quote(release)}", timeout=120, check=True)
    return [ko.name for ko in kos]


def kernel_has_inject(kernel) -> bool:
    """memory-notifier-error-inject is built in (config =y, e.g. kconfigs/memhp.config builds) or a module."""
    if kernel.config:
        try:
            text = Path(kernel.config).read_text(errors="replace")
        except OSError:
            text = ""
        if "CONFIG_MEMORY_NOTIFIER_ERROR_INJECT=y" in text and "CONFIG_DEBUG_FS=y" in text:
            return True
    if not kernel.modules:
        return False
    name = selftest.INJECT_MODULE
    return name in modules.builtin_modules(kernel.modules) or name in modules.index(kernel.modules)


def test_selftest_mem_on_off(boot, memhp_kernel, artifacts, measure):
    t0 = time.monotonic()
    st = selftest.fetch(memhp_kernel.version)
    measure("selftest_source", {"package": st.package, "version": st.version, "origin": st.origin,
                                "fetch_s": round(time.monotonic() - t0, 1)})
    vm = boot()
    facts = facts_as_booted(vm)
    with hot_added(vm, facts.block_size, remove=False) as d1, hot_added(vm, facts.block_size, remove=False) as d2:
        measure("hot_added_blocks", [*d1.block_ids, *d2.block_ids])
        _run_selftest(vm, memhp_kernel, st, artifacts, measure)


def _run_selftest(vm, memhp_kernel, st, artifacts, measure) -> None:

    push(vm, f"{GUEST_DIR}/{selftest.SCRIPT}", st.script.read_bytes())
    pushed = install_inject_module(vm, memhp_kernel)
    measure("modules_pushed", pushed)
    has_inject = kernel_has_inject(memhp_kernel)
    # A kernel without DEBUG_FS has nothing to mount; the script then skips its second half.
    vm.run("grep -q ' /sys/kernel/debug debugfs ' /proc/mounts || mount -t debugfs debugfs /sys/kernel/debug",
           check=has_inject)

    env = " ".join(f"{k}={v}" for k, v in selftest.ASH_ENV.items())
    t1 = time.monotonic()
    res = vm.run(f"cd {GUEST_DIR} && {env} sh ./{selftest.SCRIPT} 2>&1", timeout=1200)
    measure("selftest_run_s", round(time.monotonic() - t1, 1))
    (artifacts / "selftest-output.txt").write_text(res.stdout + (res.stderr or ""))
    (artifacts / selftest.SCRIPT).write_bytes(st.script.read_bytes())
    out = selftest.judge(res.status, res.stdout + (res.stderr or ""))
    measure("selftest", {"status": out.status, "exit_code": out.exit_code, "skip_reasons": list(out.skip_reasons),
                         "failures": list(out.failures), "error_injection_ran": out.extra_ran,
                         "offline_tries": list(out.offline_results)})

    v = Verdicts()
    v.eq("kselftest exit code", out.expected_exit, out.exit_code,
         "mem-on-off-test.sh: 4 only after 'skip all tests:', else 1 after any unexpected/FAILED step, else 0 "
         "(also when it skips its error-injection half)")
    v.eq("lines reporting an unexpected result", [], list(out.failures),
         "online/offline_memory_expect_* print \"unexpected ...\"; the offline step prints FAILED")
    v.eq("notifier error injection half ran", has_inject, out.extra_ran,
         "it runs whenever debugfs is mounted and memory-notifier-error-inject loads"
         + ("" if has_inject else "; this kernel has no such module, so skipping it is legitimate"))
    legit = [] if has_inject else [s for s in out.skip_reasons if s.startswith("skip extra tests:")]
    v.eq("skip reasons", legit, list(out.skip_reasons), "no prerequisite may be missing on this guest")
    measure("skipped_parts", legit)
    v.eq("guest runs a command afterwards", 0, vm.run("true", timeout=60).status, "the selftest leaves the guest alive")
    v.raise_if_failed()
