"""memhp: the command line.

  memhp boot   [--kernel SPEC] [--memmap-on-memory on|off|force] [--dimm SIZE]... [--dry-run] [-- CMD...]
  memhp run    [--kernel SPEC]... [--json FILE] [--junit FILE] [-k EXPR] [--scenarios DIR]
               [--shard I/N] [--durations-from REPORT] [--baseline REPORT] [--fail-on any|new]
  memhp report RUN_DIR --format FMT [-o FILE] | memhp report --merge REPORT... [-o FILE]
  memhp kernel fetch SPEC
  memhp kernel build --tree DIR [--fragment F]... [--patch P]... [--base tinyconfig|defconfig] [--jobs N]
  memhp bench  [--kernel SPEC] [--runs N] [--no-suite] [-k EXPR] [--jobs N] [--firmware seabios|qboot]

Exit status: 0 pass; 1 the kernel failed (FAIL, CRASH, HANG); 2 bad input (checked before
anything is fetched or booted); 3 infrastructure (QEMU, the host, apt, an unexpected exception,
whose traceback goes to a log file). report.exit_for_error is the one mapping. With
`run --bisect`: 0, 1, 125 (skip) for infrastructure, 128 (abort) for bad input.
SIZE: a bare number is MiB everywhere, as in QEMU's -m.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from harness.cache import cache_root, ensure_dir
from harness.errors import HarnessError, InfraError, UsageError
from harness.memory.checks import exercised_summary
from harness.reports import report

MiB = 1 << 20
DEFAULT_BLOCK = 128 * MiB


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("allow_abbrev", False)  # "--bis" must not silently mean --bisect
        super().__init__(*a, **kw)

    def error(self, message):  # one line, exit 2, no usage dump
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        raise UsageError(f"{message}" + (f" (memhp {sub} --help)" if sub else " (memhp --help)"))


def _say(line: str) -> None:
    # A user's non-UTF-8 path or value must not turn the message itself into a traceback.
    data = (line + "\n").encode(sys.stderr.encoding or "utf-8", "backslashreplace")
    if sys.stderr.isatty():     # start on a clean line: `memhp run` may be showing its live progress line
        data = b"\r\x1b[K" + data
    sys.stderr.flush()
    sys.stderr.buffer.write(data) if hasattr(sys.stderr, "buffer") else sys.stderr.write(data.decode())
    sys.stderr.flush()


def err(msg: str) -> None:
    _say(f"memhp: error: {' '.join(msg.split())}")


def info(msg: str) -> None:
    _say(f"memhp: {msg}")


def parse_size(text: str) -> int:
    """'128M', '1G', '512MiB', '64K' -> bytes. ONE unit rule: a bare number is MiB, as in QEMU's -m."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() == "ib"):
        raise UsageError(f"bad size {_show(text)}: use e.g. 128M or 1G (a bare number is MiB)")
    n = int(m.group(1))
    mult = {"": MiB, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    if m.group(3) and not m.group(2):   # "4096B": bytes, said explicitly
        mult = 1
    return n * mult


def size_mib(opt: str, text: str) -> int:
    """A size option in whole MiB (--mem, --maxmem), with the same unit rule as parse_size."""
    b = parse_size(text)
    if b % MiB:
        raise UsageError(f"{opt} {text}: not a whole number of MiB")
    return b // MiB


def _show(value) -> str:
    from harness.kernels.preflight import _show as show
    return show(value)


# kstrtobool (lib/kstrtox.c): the first character decides, y/Y/t/T/1 or n/N/f/F/0, or o/O then n/N
# or f/F. 6.6+ also takes exactly "force" or "FORCE" (mm/memory_hotplug.c, set_memmap_mode).
_KSTRTOBOOL = re.compile(r"[yYtT1nNfF0]|[oO][nNfF]")
MEMMAP_HELP = ("on, off, force, none (omit the parameter), or a raw value the kernel's parser takes "
               "(y, n, 1, 0, yes, no, true, false, t, f, FORCE, ...; default on)")


def memmap_value(text: str) -> Optional[str]:
    """--memmap-on-memory -> the kernel parameter's value (None: leave it off the command line).

    on/off/none are memhp's words; anything else goes to the kernel verbatim, so it must be a value
    the kernel's parser accepts, and never one that could split the command line."""
    t = text.strip()
    mapped = {"on": "1", "off": "0", "none": None}
    if t.lower() in mapped:
        return mapped[t.lower()]
    if not re.fullmatch(r"[A-Za-z0-9]{1,16}", t) or not (t in ("force", "FORCE") or _KSTRTOBOOL.match(t)):
        raise UsageError(f"--memmap-on-memory {_show(text)}: the kernel would refuse it; use {MEMMAP_HELP}")
    return t


COMMAND_LINE_SIZE = 2048   # arch/x86/include/asm/setup.h: the kernel keeps this many bytes, NUL included


def check_append(words: Sequence[str]) -> Tuple[str, ...]:
    """--append: each word is ONE kernel parameter. The kernel splits its command line on
    whitespace and groups with double quotes, and `--` hands the rest to init; QEMU's -append
    passes the string through unchanged. So: printable ASCII, no space, no quote, not `--`."""
    for w in words:
        if not w:
            raise UsageError("--append: empty kernel parameter")
        bad = next((c for c in w if not (0x21 <= ord(c) <= 0x7e) or c == '"'), None)
        if bad is not None:
            what = ("a space" if bad == " " else "a double quote" if bad == '"' else
                    "a control character" if ord(bad) < 0x20 or ord(bad) == 0x7f else "a non-ASCII byte")
            raise UsageError(f"--append {_show(w)}: {what} would split or corrupt the kernel command line; "
                             f"give one parameter per --append, printable ASCII without quotes")
        if w == "--":
            raise UsageError("--append --: would hand the rest of the kernel command line to init")
    return tuple(words)


def check_cmdline_length(cmdline: str) -> None:
    n = len(cmdline.encode())
    if n >= COMMAND_LINE_SIZE:
        raise UsageError(f"the kernel command line would be {n} bytes; x86_64 keeps only "
                         f"{COMMAND_LINE_SIZE - 1} (COMMAND_LINE_SIZE {COMMAND_LINE_SIZE}): shorten --append")


# Limits: QEMU's pc machine takes at most 255 vCPUs (max_cpus of pc-i440fx) and NUMA node ids
# below 128 (MAX_NODES); slots 0..256 (VMSpec.validate, ACPI_MAX_RAM_SLOTS); -cpu max under TCG
# has 40 physical address bits, so maxmem stays below 1 TiB.
MAX_CPUS, MAX_NUMA, MAX_SLOTS, MAX_MAXMEM_MB = 255, 128, 256, 1 << 20
MAX_TIMEOUT_S, MAX_RUNS = 7 * 86400, 1000
MAX_JOBS = 4 * (os.cpu_count() or 1)


def int_in(opt: str, lo: int, hi: int):
    """argparse type: an integer in lo..hi, or a one-line UsageError."""
    def conv(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise UsageError(f"{opt} {_show(text)}: not a whole number") from None
        if not lo <= v <= hi:
            raise UsageError(f"{opt} {v}: must be {lo}..{hi}")
        return v
    return conv


def seconds(opt: str):
    def conv(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise UsageError(f"{opt} {_show(text)}: not a number of seconds") from None
        if not (math.isfinite(v) and 0 < v <= MAX_TIMEOUT_S):
            raise UsageError(f"{opt} {_show(text)}: must be more than 0 and at most {MAX_TIMEOUT_S} s")
        return v
    return conv


def check_k(expr: Optional[str]) -> Optional[str]:
    """-k: compiled by pytest's own Expression, as `pytest -k` would; a bad one is bad input."""
    if expr is None:
        return None
    from _pytest.mark.expression import Expression
    if not expr.strip():
        raise UsageError("-k: empty expression")
    try:
        Expression.compile(expr)
    except Exception as e:  # SyntaxError (pytest 8+) or ParseError (older)
        raise UsageError(f"-k {_show(expr)}: not a valid expression: {getattr(e, 'msg', None) or e}") from None
    return expr


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
def _add_vm_opts(p: argparse.ArgumentParser, many_kernels: bool = False) -> None:
    p.add_argument("--kernel", default=None, action="append" if many_kernels else "store",
                   help="debian:6.1, debian:6.12 (default), debian-src:6.1, a bzImage, or a build folder"
                        + ("; repeat it to run the suite on each kernel" if many_kernels else ""))
    p.add_argument("--accel", default=os.environ.get("MEMHP_ACCEL", "auto"), choices=("auto", "tcg", "kvm"))
    p.add_argument("--fragment", action="append", default=[], help="extra kconfig fragment (debian-src: only)")
    p.add_argument("--patch", action="append", default=[], help="patch to apply (debian-src: only)")


def _check_kernel_opts(args) -> str:
    """Before anything is fetched: options that cannot apply to the kernel are bad input."""
    from harness.kernels.kernel import DEFAULT_SPEC
    from harness.kernels.preflight import check_kernel_options
    spec = DEFAULT_SPEC if args.kernel is None else args.kernel
    if not str(spec).strip():
        raise UsageError("--kernel: empty kernel spec")
    check_kernel_options(spec, args.fragment, args.patch)
    return spec


def _need_qemu() -> None:
    import shutil
    from harness.errors import HostToolMissing
    if shutil.which("qemu-system-x86_64") is None:
        raise HostToolMissing("qemu-system-x86_64 not found: install the Debian package qemu-system-x86")


def _clean_stale() -> None:
    """Remove what dead runs left (run folders, cache scratch). Never stops a run: one warning."""
    from harness import cache
    cache.cache_root()  # an unusable cache folder is bad input (CacheError), not a warning
    clean = getattr(cache, "clean_stale", None)
    if clean is None:  # harness.cache.clean_stale comes with the cache-safety work (issue 8)
        return
    try:
        clean()
    except Exception as e:
        info(f"warning: could not clean up stale files of earlier runs: {_one_line(e)}")


def _resolve(args, need_image: bool = True):
    from harness.vm.image import build
    from harness.kernels.kernel import resolve
    from harness.kernels.preflight import check_kernel
    spec = _check_kernel_opts(args)
    _clean_stale()
    kernel = resolve(spec, fragments=tuple(args.fragment), patches=tuple(args.patch))
    for w in check_kernel(kernel):
        info(f"warning: {w}")
    image = build(kernel) if need_image else None
    return spec, kernel, image


# ---------------------------------------------------------------- boot
def boot_spec_kw(args, sizes: Sequence[int]) -> Tuple[dict, List[str]]:
    """Every `memhp boot` option checked: (VMSpec keywords, warnings). Raises UsageError; touches nothing."""
    from harness.vm.qemu_argv import GuestConfig
    mem, maxmem = size_mib("--mem", args.mem), size_mib("--maxmem", args.maxmem)
    if not 0 < maxmem <= MAX_MAXMEM_MB:
        raise UsageError(f"--maxmem {args.maxmem}: must be more than 0 and at most 1 TiB")
    warnings = check_dimms(sizes, args.slots, mem, maxmem)
    if args.dimm_node is not None and args.dimm_node >= args.numa:
        raise UsageError(f"--dimm-node {args.dimm_node}: the machine has nodes 0..{args.numa - 1} (--numa {args.numa})")
    spec_kw = dict(mem_mb=mem, slots=args.slots, maxmem_mb=maxmem, cpus=args.cpus,
                   numa_nodes=args.numa, memmap_on_memory=memmap_value(args.memmap_on_memory),
                   default_state=args.default_state, extra_cmdline=check_append(args.append))
    if args.virtio_mem:
        from harness.memory.virtio_mem import parse_spec
        spec_kw.update(parse_spec(args.virtio_mem, parse_size))
    try:
        config = GuestConfig(**spec_kw)   # validates what QEMU and the kernel would refuse
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_cmdline_length(config.cmdline())
    return spec_kw, warnings


def cmd_boot(args) -> int:
    from harness.vm.qemu_argv import GuestConfig, Runtime, build_argv, format_argv
    sizes = [parse_size(s) for s in args.dimm]
    spec_kw, warnings = boot_spec_kw(args, sizes)
    _check_kernel_opts(args)
    if args.logs:
        from harness.kernels.preflight import check_output_dir
        check_output_dir("--logs", args.logs)
    for w in warnings:
        info(f"warning: {w}")
    if args.dry_run:
        from harness.vm.machine import free_port
        spec_name, kernel, image = _resolve(args)
        accel = "tcg" if args.accel == "auto" else args.accel
        from harness.vm.guest import entry_image
        rt = Runtime(kernel=entry_image(kernel), initrd=image.initramfs,
                     run_dir=Path(tempfile.gettempdir()) / "memhp-RUNDIR", ssh_port=free_port(), accel=accel)
        print(format_argv(build_argv(GuestConfig(**spec_kw), rt)))
        return 0
    from harness.vm.guest import VM
    from harness.memory.blocks import dimm_blocks
    from harness.memory.dimm import add_dimm
    _need_qemu()
    spec_name, kernel, image = _resolve(args)
    log_dir = Path(args.logs) if args.logs else None
    if log_dir is None:
        log_dir = Path(tempfile.mkdtemp(prefix="boot-", dir=ensure_dir(cache_root() / "logs")))
    with VM(kernel, image, log_dir, accel=args.accel, **spec_kw) as vm:
        if sizes:
            bs = int(vm.run("cat /sys/devices/system/memory/block_size_bytes", check=True).stdout, 16)
            for s in sizes:
                d = add_dimm(vm.qmp, s, node=args.dimm_node)
                info(f"added {d.id}: {s // MiB} MiB at {d.addr:#x}, blocks {list(dimm_blocks(d, bs))}")
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
    if not sys.stdin.isatty():
        info("stdin is not a terminal; nothing to do")
        return
    info("escape: ~. at the start of a line leaves the shell")
    info(f"shell ended: {vm.shell(sys.stdin.fileno(), sys.stdout.fileno())}")


# ---------------------------------------------------------------- run
def scenarios_dir() -> Path:
    return Path(__file__).resolve().parent / "scenarios"


def _pytest_argv(scen: Path, *extra: str) -> List[str]:
    """The inner pytest's argv: fixed words and memhp's own absolute paths only. Every user value
    travels in the RunOptions plugin object, so none can be read as a pytest option."""
    return [str(scen), "-p", "no:cacheprovider", f"--rootdir={scen}", "-c", os.devnull, *extra]


class _Count:
    """Counts the scenarios a -k expression selects (collection only; nothing is fetched)."""

    def __init__(self):
        self.selected = 0
        self.items: list = []       # matrix.Item per selected scenario, in collection order
        self.interrupted = False

    def pytest_collection_finish(self, session):
        from harness.plugin import _display_name
        from harness.workflows.matrix import Item
        self.selected = len(session.items)
        self.items = [Item(i.nodeid, _display_name(i), _display_name(i).split("::", 1)[0]) for i in session.items]

    def pytest_keyboard_interrupt(self, excinfo):
        self.interrupted = True


def _selected(scen: Path, opts) -> int:
    return len(_collect(scen, opts))


def _collect(scen: Path, opts) -> list:
    """The scenarios `opts` selects, as harness.workflows.matrix.Item, in collection order."""
    import io

    import pytest
    counter = _Count()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = pytest.main(_pytest_argv(scen, "--collect-only", "-q"), plugins=[opts, counter])
    if counter.interrupted:
        raise KeyboardInterrupt
    if rc not in (0, 5):
        last = next((ln for ln in reversed(buf.getvalue().splitlines()) if ln.strip()), "")
        raise InfraError(f"pytest could not collect the scenarios in {scen} (exit {int(rc)}): {last[:300]}")
    return counter.items


def _check_run_outputs(args) -> None:
    from harness.kernels.preflight import check_output_dir, check_output_file
    files = [(opt, v) for opt, v in (("--json", args.json), ("--junit", args.junit), ("--ktap", args.ktap),
                                     ("--kcidb", args.kcidb), ("--html", args.html)) if v is not None]
    for opt, v in files:
        check_output_file(opt, v)
    seen = {}
    for opt, v in files:
        other = seen.setdefault(Path(v).absolute(), opt)
        if other != opt:
            raise UsageError(f"{other} and {opt} name the same file {_show(v)}")
    if args.artifacts is not None:
        check_output_dir("--artifacts", args.artifacts)


def _write_report(opt: str, fn, path: Path, *a) -> None:
    try:
        fn(path, *a)
    except OSError as e:  # checked before the run, so the host changed under us: INFRA
        raise InfraError(f"could not write {opt} {path}: {e.strerror or e} (results are in the artifacts)") from None


def cmd_run(args) -> int:
    """The suite on each --kernel (one shard of it with --shard); the logic is harness.workflows.matrix."""
    from harness.plugin import RunOptions
    from harness.workflows import matrix
    scen = Path(args.scenarios).absolute() if args.scenarios else scenarios_dir()
    if args.scenarios is not None:
        from harness.kernels.preflight import _stat_input
        _stat_input("--scenarios", args.scenarios, allow_missing=True)
    if not scen.is_dir():
        raise UsageError(f"--scenarios {_show(args.scenarios)}: not a folder")
    if "::" in str(scen):
        raise UsageError(f"--scenarios {_show(args.scenarios)}: a folder name with '::' reads as a test id")
    scen = scen.resolve()
    keyword = check_k(args.k)
    specs = _run_specs(args)
    _check_run_outputs(args)
    if len(specs) > 1 and args.html is not None:
        raise UsageError("--html is one page per kernel: render each kernel's folder with memhp report "
                         "RUN_DIR/<kernel> --format html")
    shard = matrix.parse_shard(args.shard) if args.shard is not None else None
    if args.fail_on == "new" and args.baseline is None:
        raise UsageError("--fail-on new needs --baseline (new compared with what?)")
    base_doc = matrix.load_report("--baseline", args.baseline) if args.baseline is not None else None
    dur_doc = matrix.load_report("--durations-from", args.durations_from) if args.durations_from is not None \
        else base_doc
    durations = matrix.durations_of(dur_doc) if dur_doc is not None else {}
    opts = RunOptions(kernel=specs[0], accel=args.accel, fragments=tuple(args.fragment),
                      patches=tuple(args.patch), keyword=keyword)
    selection = _collect(scen, opts)
    if not selection:
        raise UsageError(f"no scenario matched{' -k ' + _show(args.k) if args.k else ''} in {scen}")
    universe = {i.name for i in _collect(scen, RunOptions(kernel=specs[0]))} if base_doc is not None else None
    items = matrix.plan_shard(selection, shard, durations)
    _need_qemu()
    # Made once a kernel resolved (_run_kernel): a spec that turns out bad writes nothing.
    art = Path(args.artifacts) if args.artifacts else \
        cache_root() / "artifacts" / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    if shard is not None:
        info(f"shard {shard}: {len(items)} of the {len(selection)} selected scenarios"
             + (" (balanced by recorded durations)" if durations else " (balanced by module)"))
    tty = sys.__stderr__ is not None and sys.__stderr__.isatty() and os.environ.get("TERM") != "dumb"
    progress, term = None, None
    if tty and items:
        from harness.workflows.progress import Progress
        # A duplicate of the terminal's fd: the inner pytest swaps fd 2 for a capture file while a
        # scenario runs, and the live line must reach the terminal, never pytest.log.
        term = open(os.dup(sys.__stderr__.fileno()), "w", buffering=1, errors="backslashreplace")
        progress = Progress(specs, len(items), durations, term,
                            jobs=min(args.jobs, len({i.module for i in items})))
    t0 = time.monotonic()
    try:
        runs = matrix.run_matrix(specs, art, items, lambda spec, d, its, prog: _run_kernel(
            args, spec, d, scen, keyword, its, prog, sharded=shard is not None, live=not tty), progress)
    finally:
        if progress is not None:
            progress.close()
            term.close()
    wall = time.monotonic() - t0
    ensure_dir(art)
    print(matrix.tables(runs))
    for r in runs:
        facts = next((x.measurements["facts"] for x in r.results if isinstance(x.measurements.get("facts"), dict)),
                     None)
        if facts:
            print(f"\nkernel facts{' (' + r.spec + ')' if len(runs) > 1 else ''}: release {facts.get('release')}, "
                  f"block {facts.get('block_size', 0) >> 20} MiB, struct page {facts.get('struct_page')} B "
                  f"(from {facts.get('struct_page_source')}), pageblock order {facts.get('pageblock_order')}, "
                  f"memmap_on_memory={facts.get('param')}")
    results = [x for r in runs for x in r.results]
    print()
    print(exercised_summary(results))
    changes, compared = None, None
    if base_doc is not None:
        from harness.reports import baseline as basecmp
        changes = matrix.compare(runs, base_doc, universe)
        compared = basecmp.as_json(changes, str(args.baseline))
        print()
        print(basecmp.render(changes, str(args.baseline)))
    shard_info = matrix.shard_json(shard, selection)
    doc = matrix.report_json(runs, shard_info, compared)
    matrix.write_kernel_reports(art, runs, shard_info)
    report.write_doc(art / "report.json", doc)
    print(f"{report.summary_line(results)}{' on ' + str(len(runs)) + ' kernels' if len(runs) > 1 else ''} "
          f"in {wall:.0f}s; artifacts: {art}")
    if args.json:
        _write_report("--json", report.write_doc, Path(args.json), doc)
    if args.junit:
        _write_report("--junit", report.write_junit_suites, Path(args.junit), matrix.junit_suites(runs))
    _write_renderings(args, art)
    return matrix.exit_status(runs, changes, args.fail_on, empty_ok=shard is not None)


def _run_specs(args) -> List[str]:
    """Every --kernel of `memhp run` (default debian:6.12), each checked against --fragment/--patch."""
    from harness.kernels.kernel import DEFAULT_SPEC
    from harness.kernels.preflight import check_kernel_options
    specs = list(args.kernel) if args.kernel else [DEFAULT_SPEC]
    for spec in specs:
        if not str(spec).strip():
            raise UsageError("--kernel: empty kernel spec")
        check_kernel_options(spec, args.fragment, args.patch)
    dup = next((x for i, x in enumerate(specs) if x in specs[:i]), None)
    if dup is not None:
        raise UsageError(f"--kernel {_show(dup)} given twice")
    return specs


def _run_kernel(args, spec: str, art: Path, scen: Path, keyword, items, progress, sharded: bool, live: bool):
    """One kernel: resolve it, run the inner pytest on `items`, read its results (a KernelRun)."""
    import pytest

    from harness.plugin import RunOptions
    from harness.workflows.matrix import KernelRun
    one = argparse.Namespace(**vars(args))
    one.kernel = spec
    spec, kernel, image = _resolve(one)
    ensure_dir(art)
    if kernel.config is not None and Path(kernel.config).is_file():
        # the run folder names its kernel's .config itself: with the PVH entry, -kernel in argv.txt
        # is a cached vmlinux with no config beside it (memhp report reads RUN_DIR/kernel.config first)
        shutil.copyfile(kernel.config, art / "kernel.config")
    res_path = art / "results.json"
    opts = RunOptions(kernel=spec, accel=args.accel, fragments=tuple(args.fragment), patches=tuple(args.patch),
                      keyword=keyword, artifacts=str(art), results=str(res_path), live=live)
    info(f"kernel {kernel.release or '?'} ({spec}); artifacts in {art}")
    # The PVH vmlinux, extracted and cached once here: a warning that it cannot be (the bzImage is
    # booted instead) reaches the terminal, which pytest's capture in the workers would hide.
    from harness.vm.guest import entry_image
    entry_image(kernel)
    # A worker per module at most: a single module runs serially, with no xdist worker between
    # memhp and its QEMU.
    jobs = min(args.jobs, len({i.module for i in items}) or 1)
    argv = _pytest_argv(scen, "-v", *_jobs_argv(jobs))
    if sharded:     # this shard's node ids instead of the folder (memhp's own paths, never a user word)
        argv = [f"{scen}/{i.nodeid}" for i in items] + argv[1:]
    plugins = [opts]
    if progress is not None:
        progress.map_nodeids({i.nodeid: i.name for i in items})
        plugins.append(progress)
    t0 = time.monotonic()
    with open(art / "pytest.log", "w") as log, contextlib.redirect_stdout(log):
        rc = pytest.main(argv, plugins=plugins)
    wall = time.monotonic() - t0
    if rc == pytest.ExitCode.INTERRUPTED:  # Ctrl-C: pytest tore the guests down; main() says so
        raise KeyboardInterrupt
    results = [report.Result(**r) for r in json.loads(res_path.read_text())] if res_path.exists() else []
    if not results:
        raise InfraError(f"pytest ran no scenario (exit {int(rc)}); see {art / 'pytest.log'}")
    if rc in (pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.USAGE_ERROR) and \
            report.exit_status(results) != report.EXIT_KERNEL:
        raise InfraError(f"pytest stopped with an internal error (exit {int(rc)}) after {len(results)} "
                         f"scenario(s); see {art / 'pytest.log'}")
    from harness.reports.kernelfacts import kernel_json
    facts = kernel_json(kernel.release, spec, args.patch, art)   # the --patch series, copied into art/patches
    return KernelRun(spec, facts, tuple(results), art, wall)


def _jobs_argv(jobs: int) -> List[str]:
    """pytest-xdist words for `run --jobs N`: one guest per worker, a module's tests (and its
    shared guest) in one worker (--dist loadfile). N=1 is the plain serial run."""
    return [] if jobs <= 1 else ["-n", str(jobs), "--dist", "loadfile"]


def _write_renderings(args, art: Path) -> None:
    """--ktap/--kcidb/--html: rendered from the run folder just written, as `memhp report` would;
    reproduce.sh in every failed scenario's folder (harness.reports.reproducer)."""
    wanted = [(opt, fmt, v) for opt, fmt, v in (("--ktap", "ktap", args.ktap), ("--kcidb", "kcidb", args.kcidb),
                                                ("--html", "html", args.html)) if v is not None]
    from harness.reports import load_runs, render, reproducer
    run = load_runs(art)
    for one in run.runs:
        try:
            reproducer.write_all(one)
        except OSError as e:
            raise InfraError(f"could not write a reproducer in {one.path}: {e.strerror or e}") from None
    if not wanted:
        return
    for opt, fmt, v in wanted:
        _write_report(opt, lambda path, text: Path(path).write_text(text), Path(v), render(run, fmt))


# ---------------------------------------------------------------- report
def cmd_report(args) -> int:
    """Render any format from a finished run folder; no guest is booted."""
    from harness.reports import RunDirError, load_runs, render
    if args.merge is not None:
        return _merge_reports(args)
    if args.run_dir is None or args.format is None:
        raise UsageError("memhp report RUN_DIR --format FORMAT, or memhp report --merge REPORT... (memhp report --help)")
    if (args.vmlinux or args.fetch_vmlinux) and args.format not in ("email", "html"):
        raise UsageError(f"--{'vmlinux' if args.vmlinux else 'fetch-vmlinux'} decodes the splats of --format email "
                         f"or html; --format {args.format} prints them as captured")
    if args.output is not None:
        from harness.kernels.preflight import check_output_file
        check_output_file("--output", args.output)
    try:
        run = load_runs(Path(args.run_dir))
        if args.format in ("email", "html"):    # the splats through decode_stacktrace.sh, when a debug vmlinux is at hand
            from harness.reports.decode import decode_all
            run = decode_all(run, Path(args.vmlinux) if args.vmlinux else None, args.fetch_vmlinux)
        text = render(run, args.format)
    except RunDirError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:     # html of a several-kernel run
        raise UsageError(str(e)) from None
    if args.output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        _write_report("--output", lambda path, s: Path(path).write_text(s), Path(args.output), text)
    return 0


def cmd_replay(args) -> int:
    """memhp replay RUN_DIR[/scenario]: harness.workflows.replay."""
    from harness.workflows import replay
    _need_qemu()
    return replay.replay_path(Path(args.run_dir))


def _merge_reports(args) -> int:
    """memhp report --merge A B ... [-o FILE]: the shards' report.json documents as one (harness.reports.merge)."""
    from harness.reports.merge import MergeError, merge
    from harness.workflows.matrix import load_report
    if args.run_dir is not None:
        raise UsageError(f"report: give either RUN_DIR ({_show(args.run_dir)}) or --merge, not both")
    if args.format not in (None, "json"):
        raise UsageError("report --merge writes JSON; render it afterwards: memhp report MERGED.json --format ...")
    if args.output is not None:
        from harness.kernels.preflight import check_output_file
        check_output_file("--output", args.output)
    docs = [(m, load_report("--merge", m)) for m in args.merge]
    try:
        doc = merge(docs)
    except MergeError as e:
        raise UsageError(f"--merge: {e}") from None
    text = json.dumps(doc, indent=2, default=str) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        _write_report("--output", lambda path, s: Path(path).write_text(s), Path(args.output), text)
    return 0


# ---------------------------------------------------------------- kernel
def cmd_kernel_fetch(args) -> int:
    from harness.kernels.kernel import resolve
    from harness.kernels.preflight import check_kernel_options
    if not args.spec.strip():
        raise UsageError("kernel fetch: empty kernel spec")
    check_kernel_options(args.spec)
    _clean_stale()
    k = resolve(args.spec)
    print(Path(k.image).parent if k.image else "")
    return 0


def cmd_kernel_build(args) -> int:
    from harness.kernels import kbuild
    from harness.kernels.preflight import _stat_input, check_input_file
    _stat_input("--tree", args.tree)
    if not os.path.isdir(args.tree) or not os.path.isfile(os.path.join(args.tree, "Makefile")):
        raise UsageError(f"--tree {_show(args.tree)}: not a kernel source tree (no Makefile)")
    for opt, values in (("--fragment", args.fragment), ("--patch", args.patch)):
        for v in values:
            check_input_file(opt, v)
    _clean_stale()
    k = kbuild.build(Path(args.tree), fragments=[Path(f) for f in args.fragment],
                     patches=[Path(p) for p in args.patch], base=args.base, jobs=args.jobs)
    print(Path(k.image).parent)
    return 0


def cmd_bisect(args) -> int:
    from harness.workflows import bisect
    _clean_stale()
    return bisect.main(bisect.Options(
        tree=Path(args.tree).resolve(), good=args.good, bad=args.bad, k=args.k,
        fragments=tuple(Path(f).resolve() for f in args.fragment), patches=tuple(Path(p).resolve() for p in args.patch),
        repeat=args.repeat, json_path=Path(args.json) if args.json else None, base=args.base, jobs=args.jobs))


# ---------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from harness.workflows import bench
    spec = _check_kernel_opts(args)
    keyword = check_k(args.k) if args.k else None
    cpus = bench.parse_cpus(args.cpu)
    from harness.kernels.preflight import check_input_file
    for f in args.build_fragment:
        check_input_file("--build-fragment", f)
    from harness.cache import cache_root
    if args.build_only:
        d = Path(tempfile.mkdtemp(prefix="bench-", dir=_mk(cache_root() / "logs")))
        figures = bench.build_figures(d, [Path(f).resolve() for f in args.build_fragment], None, say=print)
        print(bench.last_line(figures, 0, "n/a"))
        return 0
    _need_qemu()
    spec, kernel, image = _resolve(args)
    d = Path(tempfile.mkdtemp(prefix="bench-", dir=_mk(cache_root() / "logs")))
    figures = bench.bench(kernel, image, spec, args.accel, args.runs, d, suite=not args.no_suite, jobs=args.jobs,
                          keyword=keyword, firmware=args.firmware, say=print, entry=args.entry, cpus=cpus)
    if args.build:
        figures.update(bench.build_figures(d, [Path(f).resolve() for f in args.build_fragment], None, say=print))
    print(bench.last_line(figures, args.runs, kernel.release or "?"))
    return 0


def _mk(p: Path) -> Path:
    return ensure_dir(p)    # every folder it creates 0700


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="memhp", description="Real-kernel test harness for Linux memory hotplug.",
                epilog="SIZE: a number with K, M, G or T (128M, 1G); a bare number is MiB everywhere, "
                       "as in QEMU's -m. Exit status: 0 pass, 1 kernel failure, 2 bad input, 3 infrastructure.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    sub.required = True

    b = sub.add_parser("boot", help="boot a guest; run CMD in it or open a shell",
                       epilog="SIZE: a number with K, M, G or T (128M, 1G, 512MiB); a bare number is MiB "
                              "everywhere (--mem, --maxmem, --dimm), as in QEMU's -m; 4096B for bytes.")
    _add_vm_opts(b)
    b.add_argument("--memmap-on-memory", default="on", help=MEMMAP_HELP)
    b.add_argument("--default-state", default="offline", help="memhp_default_state (default offline)")
    b.add_argument("--mem", default="1024", help="base memory SIZE (default 1024, i.e. 1 GiB)")
    b.add_argument("--slots", type=int_in("--slots", 0, MAX_SLOTS), default=4, help=f"DIMM slots, 0..{MAX_SLOTS}")
    b.add_argument("--maxmem", default="8192", help="maxmem SIZE, at most 1T (default 8192, i.e. 8 GiB)")
    b.add_argument("--cpus", type=int_in("--cpus", 1, MAX_CPUS), default=2, help=f"vCPUs, 1..{MAX_CPUS}")
    b.add_argument("--numa", type=int_in("--numa", 1, MAX_NUMA), default=1,
                   help=f"NUMA nodes, 1..{MAX_NUMA} (node 1+ start memory-less)")
    b.add_argument("--dimm", action="append", default=[], help="hot-add a DIMM of SIZE after boot (repeatable)")
    b.add_argument("--dimm-node", type=int_in("--dimm-node", 0, MAX_NUMA - 1), default=None,
                   help="NUMA node of the --dimm DIMMs (below --numa)")
    b.add_argument("--virtio-mem", default=None, metavar="SIZE[,node=N,block-size=B,requested=R]",
                   help="a virtio-mem-pci device of SIZE (block-size default 2M, power of two, at least 1M; "
                        "requested default SIZE, plugged at boot)")
    b.add_argument("--append", action="append", default=[],
                   help="one extra kernel parameter (repeatable): printable ASCII, no spaces or quotes")
    b.add_argument("--timeout", type=seconds("--timeout"), default=600.0, help="CMD timeout in seconds")
    b.add_argument("--logs", default=None, help="folder for console.log, qmp.jsonl, argv.txt")
    b.add_argument("--dry-run", action="store_true", help="print QEMU's argv and exit")
    b.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD...: run in the guest, exit with its status")
    b.set_defaults(func=cmd_boot)

    r = sub.add_parser("run", help="run the scenario suite on one or more kernels")
    _add_vm_opts(r, many_kernels=True)
    r.add_argument("--json", default=None)
    r.add_argument("--junit", default=None)
    r.add_argument("--ktap", default=None, help="write the results as KTAP v1")
    r.add_argument("--kcidb", default=None, help="write the results as KCIDB v5 JSON")
    r.add_argument("--html", default=None, help="write a self-contained HTML report")
    r.add_argument("-k", default=None, help="pytest -k expression selecting scenarios")
    r.add_argument("--artifacts", default=None, help="artifacts folder (default under the cache)")
    r.add_argument("--bisect", action="store_true",
                   help="exit for `git bisect run`: 0 pass, 1 kernel failure, 125 infrastructure, 128 bad input")
    r.add_argument("--scenarios", default=None, help="folder of scenario modules (default: the built-in suite)")
    r.add_argument("--jobs", type=int_in("--jobs", 1, MAX_JOBS), default=os.cpu_count() or 1,
                   help=f"parallel guests, one scenario module each (pytest-xdist), 1..{MAX_JOBS}; "
                        f"default: the number of CPUs")
    r.add_argument("--shard", default=None, metavar="I/N",
                   help="run shard I of N: a deterministic, balanced part of the selected scenarios")
    r.add_argument("--durations-from", default=None, metavar="REPORT",
                   help="balance --shard and estimate the ETA by this report.json's durations (default: --baseline's)")
    r.add_argument("--baseline", default=None, metavar="REPORT",
                   help="compare with an earlier run (its report.json or folder): new failures, fixed, ...")
    r.add_argument("--fail-on", default="any", choices=("any", "new"),
                   help="exit 1 on any kernel failure (default), or only on new failures against --baseline")
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("report", help="render a finished run folder (email, ktap, kcidb, html, json, junit, "
                                       "markdown), or merge shards' reports")
    rp.add_argument("run_dir", nargs="?", default=None,
                    help="a run's artifacts folder (it holds report.json), or a report.json")
    rp.add_argument("--format", default=None,
                    choices=("email", "ktap", "kcidb", "html", "json", "junit", "markdown", "reproducer"),
                    help="reproducer: a bash script (QEMU, python3, ssh; no memhp) for the first failed scenario")
    rp.add_argument("--merge", nargs="+", default=None, metavar="REPORT",
                    help="merge the report.json of every shard (memhp run --shard I/N) into one; "
                         "overlaps and gaps are refused")
    rp.add_argument("-o", "--output", default=None, help="write here instead of standard output")
    rp.add_argument("--vmlinux", default=None, metavar="FILE",
                    help="email/html: decode the splats with this vmlinux (with debug info) and the tree's "
                         "scripts/decode_stacktrace.sh; default: one found beside the kernel or in the cache")
    rp.add_argument("--fetch-vmlinux", action="store_true",
                    help="email/html of a debian: kernel: fetch its linux-image-<release>-dbg (about 280 MB, "
                         "cached) to decode the splats")
    rp.set_defaults(func=cmd_report)

    rr = sub.add_parser("replay", help="boot the recorded kernel and QEMU command line again, replay the recorded "
                                       "QMP and guest commands; exit 0 the same observations came back, 1 not")
    rr.add_argument("run_dir", help="a run's artifacts folder (its failed scenarios) or one scenario's folder in it")
    rr.set_defaults(func=cmd_replay)

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
    kb.add_argument("--jobs", type=int_in("--jobs", 1, MAX_JOBS), default=None, help=f"make -j, 1..{MAX_JOBS}")
    kb.set_defaults(func=cmd_kernel_build)

    bi = sub.add_parser("bisect", help="find the first bad commit of a kernel git tree (exit 0 found, "
                                       "1 inconclusive, 2 bad input or endpoints, 3 infrastructure)")
    bi.add_argument("--tree", required=True, help="the kernel git tree (never written)")
    bi.add_argument("--good", required=True, help="a commit that passes")
    bi.add_argument("--bad", required=True, help="a later commit that fails")
    bi.add_argument("-k", default=None, help="pytest -k expression (default: the bad endpoint's failing scenarios)")
    bi.add_argument("--fragment", action="append", default=[])
    bi.add_argument("--patch", action="append", default=[], help="applied on top of every step (repeatable)")
    bi.add_argument("--repeat", type=int_in("--repeat", 1, 100), default=1, help="runs per step, 1..100 (flaky bugs)")
    bi.add_argument("--json", default=None)
    bi.add_argument("--base", default="tinyconfig", choices=("tinyconfig", "defconfig"))
    bi.add_argument("--jobs", type=int_in("--jobs", 1, MAX_JOBS), default=None, help=f"make -j, 1..{MAX_JOBS}")
    bi.set_defaults(func=cmd_bisect)

    be = sub.add_parser("bench", help="boot N times, split the boot into phases, run the suite once; "
                                      "print the ratios")
    _add_vm_opts(be)
    be.add_argument("--runs", type=int_in("--runs", 1, MAX_RUNS), default=3, help=f"boots, 1..{MAX_RUNS}")
    be.add_argument("--no-suite", action="store_true", help="skip the suite run (suite_ratio=n/a)")
    be.add_argument("-k", default=None, help="narrow the suite run with a pytest -k expression")
    be.add_argument("--jobs", type=int_in("--jobs", 1, MAX_JOBS), default=os.cpu_count() or 1,
                    help="parallel guests for the suite run (memhp run --jobs)")
    be.add_argument("--firmware", choices=("seabios", "qboot"), default="seabios",
                    help="firmware of the timed boots (qboot: /usr/share/qemu/qboot.rom)")
    be.add_argument("--entry", choices=("bzimage", "pvh"), default=None,
                    help="-kernel of the timed boots and the suite: the bzImage, or its vmlinux through "
                         "the PVH note (default: as MEMHP_ENTRY says)")
    be.add_argument("--cpu", default=None, help="QEMU -cpu model(s) of the timed boots, e.g. max,qemu64: "
                                                "the boots alternate, each model gets --runs boots")
    be.add_argument("--build", action="store_true", help="add the build figures: a cold build of "
                    "debian-src:6.1 with kconfigs/ in a temporary cache, then a one-file rebuild")
    be.add_argument("--build-only", action="store_true", help="only the build figures (no boots, no suite)")
    be.add_argument("--build-fragment", action="append", default=[],
                    help="an extra kconfig fragment for the build figures (e.g. to measure a trimmed config)")
    be.set_defaults(func=cmd_bench)
    return p


_killed_on_interrupt = 0


def _interrupt(signum, frame):
    # Ctrl-C/SIGTERM means stop now: SIGKILL every QEMU at once, whatever runs next (pytest's
    # teardown, a guest command). The shutdown that follows removes their run folders.
    global _killed_on_interrupt
    from harness.vm.machine import kill_all
    _killed_on_interrupt += kill_all()
    raise KeyboardInterrupt


def _bisect_requested(argv: Sequence[str]) -> bool:
    """`run ... --bisect`, read from the raw words so that even a parse error maps to 128."""
    words = list(argv)
    words = words[:words.index("--")] if "--" in words else words
    first = next((w for w in words if not w.startswith("-")), None)
    return first == "run" and "--bisect" in words


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 1000 else text[:1000] + "..."


def _crash_log(exc: BaseException) -> str:
    """Write the traceback of an unexpected exception to a file; return its path."""
    import traceback
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    folders = []
    try:
        folders.append(cache_root() / "logs")
    except Exception:
        pass
    folders.append(Path(tempfile.gettempdir()))
    for d in folders:
        try:
            ensure_dir(d)
            path = d / (name if d.name == "logs" else "memhp-" + name)
            path.write_text(f"memhp {' '.join(sys.argv[1:])!r}\n{text}", errors="backslashreplace")
            return str(path)
        except OSError:
            continue
    return "(nowhere: no writable folder)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from harness.vm.machine import cleanup_all
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):   # a closed terminal stops QEMU too
        signal.signal(sig, _interrupt)
    words = list(sys.argv[1:] if argv is None else argv)
    status = _main(words, cleanup_all)
    return report.bisect_status(status) if _bisect_requested(words) else status


def _main(argv: List[str], cleanup_all) -> int:
    """Run one command; every error becomes one line and the exit status report.exit_for_error gives."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt as e:
        n = cleanup_all() + _killed_on_interrupt
        err(f"interrupted; stopped {n} QEMU process(es)")
        return report.exit_for_error(e)
    except HarnessError as e:
        err(_one_line(e))
        return report.exit_for_error(e)
    except Exception as e:  # not raised on purpose: the host (OSError) or a bug in memhp; INFRA
        err(f"{type(e).__name__}: {_one_line(e)} (traceback in {_crash_log(e)})")
        return report.exit_for_error(e)
    finally:
        cleanup_all()
