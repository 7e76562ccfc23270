"""memhp: the command line.

  memhp boot   [--kernel SPEC] [--memmap-on-memory on|off|force] [--dimm SIZE]... [--dry-run] [-- CMD...]
  memhp run    [--kernel SPEC] [--json FILE] [--junit FILE] [-k EXPR] [--scenarios DIR]
  memhp kernel fetch SPEC
  memhp kernel build --tree DIR [--fragment F]... [--patch P]... [--base tinyconfig|defconfig] [--jobs N]
  memhp bench  [--kernel SPEC] [--runs N]

Exit status: 0 pass; 1 the kernel failed (FAIL, CRASH, HANG); 2 bad input; 3 infrastructure
error (QEMU or the host); with `run --bisect`, 3 becomes 125 so `git bisect run` skips.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

from harness import report
from harness.errors import GuestCrash, Hang, HarnessError, InfraError, QMPCommandError, UsageError

MiB = 1 << 20
DEFAULT_BLOCK = 128 * MiB


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        raise UsageError(f"{message}" + (f" (memhp {sub} --help)" if sub else " (memhp --help)"))


def err(msg: str) -> None:
    print(f"memhp: error: {msg}", file=sys.stderr, flush=True)


def info(msg: str) -> None:
    print(f"memhp: {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """'128M', '1G', '512MiB', '134217728' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise UsageError(f"bad size {text!r}: use e.g. 128M or 1G")
    n = int(m.group(1))
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    if not m.group(2) and n < 4096:
        mult = MiB  # a bare small number means MiB, as in QEMU's -m
    return n * mult


def memmap_value(text: str) -> Optional[str]:
    t = text.strip()
    return {"on": "1", "off": "0", "none": None}.get(t.lower(), t)


def check_dimms(sizes: Sequence[int], slots: int, mem_mb: int, maxmem_mb: int) -> List[str]:
    """Validate requested DIMMs against the machine. Raises UsageError; returns warnings. Pure."""
    warnings = []
    if maxmem_mb < mem_mb:
        raise UsageError(f"--maxmem {maxmem_mb}M is below the base memory {mem_mb}M")
    if len(sizes) > slots:
        raise UsageError(f"{len(sizes)} DIMMs requested but the machine has {slots} slots (--slots)")
    for s in sizes:
        if s <= 0 or s % (2 * MiB):
            raise UsageError(f"DIMM size {s} bytes is not a multiple of 2 MiB; QEMU would refuse it "
                             f"(backend memory size must be multiple of 0x200000)")
        if s % DEFAULT_BLOCK:
            warnings.append(f"DIMM size {s // MiB} MiB is not a multiple of the 128 MiB memory block: "
                            f"QEMU accepts it, but the guest kernel will refuse it")
    total = sum(sizes) // MiB
    if total > maxmem_mb - mem_mb:
        raise UsageError(f"DIMMs total {total} MiB but only {maxmem_mb - mem_mb} MiB fit under --maxmem "
                         f"{maxmem_mb}M with {mem_mb}M of base memory")
    return warnings


# ---------------------------------------------------------------- common
def _add_vm_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", default=None, help="debian:6.1, debian:6.12 (default), debian-src:6.1, "
                                                  "a bzImage, or a build folder")
    p.add_argument("--accel", default=os.environ.get("MEMHP_ACCEL", "auto"), choices=("auto", "tcg", "kvm"))
    p.add_argument("--fragment", action="append", default=[], help="extra kconfig fragment (debian-src:)")
    p.add_argument("--patch", action="append", default=[], help="patch to apply (debian-src:)")


def _resolve(args, need_image: bool = True):
    from harness.image import build
    from harness.kernel import DEFAULT_SPEC, resolve
    from harness.preflight import check_kernel
    spec = args.kernel or DEFAULT_SPEC
    kernel = resolve(spec, fragments=tuple(args.fragment), patches=tuple(args.patch))
    for w in check_kernel(kernel):
        info(f"warning: {w}")
    image = build(kernel) if need_image else None
    return spec, kernel, image


# ---------------------------------------------------------------- boot
def cmd_boot(args) -> int:
    from harness.qemu_argv import VMSpec, build_argv, format_argv
    sizes = [parse_size(s) for s in args.dimm]
    for w in check_dimms(sizes, args.slots, args.mem, args.maxmem):
        info(f"warning: {w}")
    spec_kw = dict(mem_mb=args.mem, slots=args.slots, maxmem_mb=args.maxmem, cpus=args.cpus,
                   numa_nodes=args.numa, memmap_on_memory=memmap_value(args.memmap_on_memory),
                   default_state=args.default_state, extra_cmdline=tuple(args.append))
    try:
        VMSpec(kernel=Path("k"), initrd=Path("i"), run_dir=Path("/r"), ssh_port=22,
               accel="tcg", **spec_kw).validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.dry_run:
        from harness.machine import free_port
        spec_name, kernel, image = _resolve(args)
        accel = "tcg" if args.accel == "auto" else args.accel
        spec = VMSpec(kernel=kernel.image, initrd=image.initramfs,
                      run_dir=Path(tempfile.gettempdir()) / "memhp-RUNDIR", ssh_port=free_port(),
                      accel=accel, **spec_kw)
        print(format_argv(build_argv(spec)))
        return 0
    from harness.guest import VM
    from harness.hotplug import add_dimm, wait_blocks
    from harness.observe import gather_facts
    spec_name, kernel, image = _resolve(args)
    log_dir = Path(args.logs) if args.logs else None
    if log_dir is None:
        from harness.cache import cache_root
        base = cache_root() / "logs"
        base.mkdir(exist_ok=True)
        log_dir = Path(tempfile.mkdtemp(prefix="boot-", dir=base))
    with VM(kernel, image, log_dir, accel=args.accel, **spec_kw) as vm:
        if sizes:
            bs = int(vm.run("cat /sys/devices/system/memory/block_size_bytes", check=True).stdout, 16)
            for s in sizes:
                d = add_dimm(vm.qmp, s, bs, node=args.dimm_node)
                info(f"added {d.id}: {s // MiB} MiB at {d.addr:#x}, blocks {list(d.block_ids)}")
        cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
        if cmd:
            import shlex
            res = vm.run(" ".join(cmd) if len(cmd) == 1 else shlex.join(cmd), timeout=args.timeout)
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
            return res.status
        info(f"guest up (logs in {log_dir}); interactive shell, exit to stop")
        _interactive(vm)
        return 0


def _interactive(vm) -> None:
    import select
    import termios
    import tty
    if not sys.stdin.isatty():
        info("stdin is not a terminal; nothing to do")
        return
    chan = vm.ssh._client.invoke_shell(term=os.environ.get("TERM", "vt100"))
    old = termios.tcgetattr(sys.stdin)
    try:
        tty.setraw(sys.stdin.fileno())
        while True:
            r, _, _ = select.select([chan, sys.stdin], [], [])
            if chan in r:
                data = chan.recv(4096)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if sys.stdin in r:
                data = os.read(sys.stdin.fileno(), 1024)
                if not data:
                    break
                chan.send(data)
    finally:
        termios.tcsetattr(sys.stdin, termios.TCSADRAIN, old)


# ---------------------------------------------------------------- run
def scenarios_dir() -> Path:
    return Path(__file__).resolve().parent / "scenarios"


def cmd_run(args) -> int:
    import pytest
    scen = Path(args.scenarios).resolve() if args.scenarios else scenarios_dir()
    if not scen.is_dir():
        raise UsageError(f"--scenarios {args.scenarios}: not a folder")
    spec, kernel, image = _resolve(args)
    from harness.cache import cache_root
    art = Path(args.artifacts) if args.artifacts else \
        cache_root() / "artifacts" / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    art.mkdir(parents=True, exist_ok=True)
    res_path = art / "results.json"
    pargs = [str(scen), "-p", "no:cacheprovider", "--rootdir", str(scen),
             "-c", os.devnull, "-v", "--kernel", spec, "--accel", args.accel,
             "--memhp-artifacts", str(art), "--memhp-results", str(res_path), "--memhp-live"]
    for f in args.fragment:
        pargs += ["--fragment", f]
    for p in args.patch:
        pargs += ["--patch", p]
    if args.k:
        pargs += ["-k", args.k]
    info(f"kernel {kernel.release or '?'} ({spec}); artifacts in {art}")
    t0 = time.monotonic()
    with open(art / "pytest.log", "w") as log, contextlib.redirect_stdout(log):
        rc = pytest.main(pargs)
    wall = time.monotonic() - t0
    if rc == pytest.ExitCode.INTERRUPTED:  # Ctrl-C: pytest tore the guests down; main() says so
        raise KeyboardInterrupt
    results = [report.Result(**r) for r in json.loads(res_path.read_text())] if res_path.exists() else []
    if rc == 5 or (not results and rc in (0, 5)):
        raise UsageError(f"no scenario matched{' -k ' + args.k if args.k else ''}")
    if rc in (2, 3, 4) and not results:
        raise InfraError(f"pytest could not run the scenarios (exit {rc}); see {art / 'pytest.log'}")
    print(report.table(results))
    facts = next((r.measurements["facts"] for r in results if isinstance(r.measurements.get("facts"), dict)), None)
    if facts:
        print(f"\nkernel facts: release {facts.get('release')}, block {facts.get('block_size', 0) >> 20} MiB, "
              f"struct page {facts.get('struct_page')} B (from {facts.get('struct_page_source')}), "
              f"pageblock order {facts.get('pageblock_order')}, memmap_on_memory={facts.get('param')}")
    cost = report.memmap_cost_table(results)
    if cost:
        print()
        print(cost)
    kinfo = {"release": kernel.release, "spec": spec}
    if args.json:
        report.write_json(Path(args.json), kinfo, results)
    if args.junit:
        report.write_junit(Path(args.junit), f"memhp.{spec}", results)
    report.write_json(art / "report.json", kinfo, results)
    print(f"{report.summary_line(results)} in {wall:.0f}s; artifacts: {art}")
    status = report.exit_status(results)
    if args.bisect and status == report.EXIT_INFRA:
        return 125
    return status


# ---------------------------------------------------------------- kernel
def cmd_kernel_fetch(args) -> int:
    from harness.kernel import resolve
    k = resolve(args.spec)
    print(Path(k.image).parent if k.image else "")
    return 0


def cmd_kernel_build(args) -> int:
    from harness import kbuild
    k = kbuild.build(Path(args.tree), fragments=[Path(f) for f in args.fragment],
                     patches=[Path(p) for p in args.patch], base=args.base, jobs=args.jobs)
    print(Path(k.image).parent)
    return 0


# ---------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from harness.guest import VM
    from harness.parsers import parse_dmesg_boot_time
    spec, kernel, image = _resolve(args)
    from harness.cache import cache_root
    rows = []
    for i in range(args.runs):
        d = Path(tempfile.mkdtemp(prefix="bench-", dir=_mk(cache_root() / "logs")))
        with VM(kernel, image, d, accel=args.accel) as vm:
            t = vm.machine.times
            serial = t["ready"] - t["launch"]
            ssh = t["ssh"] - t["launch"]
            init = parse_dmesg_boot_time(vm.run("dmesg", timeout=30).stdout)
        if not init:
            raise InfraError("could not find 'Run /init as init process' in the guest's dmesg")
        rows.append((serial, ssh, init))
        print(f"boot {i + 1}: serial-ready {serial:.2f}s  ssh-ready {ssh:.2f}s  kernel-to-/init {init:.2f}s  "
              f"(accel {vm.spec.accel})")
    ms = statistics.median(r[0] for r in rows)
    mh = statistics.median(r[1] for r in rows)
    mi = statistics.median(r[2] for r in rows)
    print(f"medians: serial-ready {ms:.2f}s, ssh-ready {mh:.2f}s, kernel time to /init {mi:.2f}s "
          f"(ratios are host-observed ready time / the guest kernel's own time to /init)")
    print(f"serial_ready_ratio={ms / mi:.2f} ssh_ready_ratio={mh / mi:.2f} runs={len(rows)} "
          f"kernel={kernel.release}")
    return 0


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="memhp", description="Real-kernel test harness for Linux memory hotplug.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    sub.required = True

    b = sub.add_parser("boot", help="boot a guest; run CMD in it or open a shell")
    _add_vm_opts(b)
    b.add_argument("--memmap-on-memory", default="on", help="on, off, force, or a raw value (default on)")
    b.add_argument("--default-state", default="offline", help="memhp_default_state (default offline)")
    b.add_argument("--mem", type=int, default=1024, help="base memory in MiB (default 1024)")
    b.add_argument("--slots", type=int, default=4)
    b.add_argument("--maxmem", type=int, default=8192, help="maxmem in MiB (default 8192)")
    b.add_argument("--cpus", type=int, default=2)
    b.add_argument("--numa", type=int, default=1, help="NUMA nodes (node 1+ start memory-less)")
    b.add_argument("--dimm", action="append", default=[], help="hot-add a DIMM of SIZE after boot (repeatable)")
    b.add_argument("--dimm-node", type=int, default=None)
    b.add_argument("--append", action="append", default=[], help="extra kernel command line argument")
    b.add_argument("--timeout", type=float, default=600.0, help="CMD timeout in seconds")
    b.add_argument("--logs", default=None, help="folder for console.log, qmp.jsonl, argv.txt")
    b.add_argument("--dry-run", action="store_true", help="print QEMU's argv and exit")
    b.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD...: run in the guest, exit with its status")
    b.set_defaults(func=cmd_boot)

    r = sub.add_parser("run", help="run the scenario suite on a kernel")
    _add_vm_opts(r)
    r.add_argument("--json", default=None)
    r.add_argument("--junit", default=None)
    r.add_argument("-k", default=None, help="pytest -k expression selecting scenarios")
    r.add_argument("--artifacts", default=None, help="artifacts folder (default under the cache)")
    r.add_argument("--bisect", action="store_true", help="exit 125 instead of 3 on infrastructure errors")
    r.add_argument("--scenarios", default=None, help="folder of scenario modules (default: the built-in suite)")
    r.set_defaults(func=cmd_run)

    k = sub.add_parser("kernel", help="fetch or build kernels")
    ksub = k.add_subparsers(dest="kcommand", parser_class=_Parser)
    ksub.required = True
    kf = ksub.add_parser("fetch", help="fetch a kernel spec; print its folder")
    kf.add_argument("spec")
    kf.set_defaults(func=cmd_kernel_fetch)
    kb = ksub.add_parser("build", help="build a kernel tree with kconfigs/ fragments")
    kb.add_argument("--tree", required=True)
    kb.add_argument("--fragment", action="append", default=[])
    kb.add_argument("--patch", action="append", default=[])
    kb.add_argument("--base", default="tinyconfig", choices=("tinyconfig", "defconfig"))
    kb.add_argument("--jobs", type=int, default=None)
    kb.set_defaults(func=cmd_kernel_build)

    be = sub.add_parser("bench", help="boot N times; print ready-time ratios")
    _add_vm_opts(be)
    be.add_argument("--runs", type=int, default=3)
    be.set_defaults(func=cmd_bench)
    return p


_killed_on_interrupt = 0


def _interrupt(signum, frame):
    # Ctrl-C/SIGTERM means stop now: SIGKILL every QEMU at once, whatever runs next (pytest's
    # teardown, a guest command). The shutdown that follows removes their run folders.
    global _killed_on_interrupt
    from harness.machine import kill_all
    _killed_on_interrupt += kill_all()
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    from harness.machine import cleanup_all
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        n = cleanup_all() + _killed_on_interrupt
        err(f"interrupted; stopped {n} QEMU process(es)")
        return 130
    except UsageError as e:
        err(str(e))
        return report.EXIT_USAGE
    except (GuestCrash, Hang) as e:
        err(str(e))
        return report.EXIT_KERNEL
    except QMPCommandError as e:
        err(str(e))
        return report.EXIT_USAGE
    except (InfraError, HarnessError, OSError) as e:
        err(str(e))
        return report.EXIT_INFRA
    finally:
        cleanup_all()
