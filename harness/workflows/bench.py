"""`memhp bench`: N boots split into phases, the ready-time ratios, one suite run.

Every figure is a host wall time or a guest clock reading from the same boots, so the ratios
(host time / the guest kernel's own time to /init) compare like with like on a loaded host.
Phases of one boot, each from the clock that sees it:
  qemu      QEMU launched -> first firmware output (SeaBIOS's debug port 0x402, polled here);
            without firmware output (qboot prints nothing), QEMU launched -> CPUs started (`cont`)
  firmware  that point -> kernel entry (the host time the console showed "Run /init" minus
            its dmesg timestamp): firmware, the PVH or linuxboot option ROM, bzImage decompression
  kernel    kernel entry -> "Run /init as init process" (dmesg)
  init      /init -> dropbear listening (guest-images/init's "memhp-init: ..." marks in dmesg)
  ssh       dropbear listening -> the first SSH command ran (ready marker, connect, auth)

`--cpu A,B` alternates the boots between QEMU CPU models (one summary line per model; the ratios
are the first model's); `--entry` sets MEMHP_ENTRY (the VM layer's choice of -kernel) for the
boots and the suite run.

`--build` adds the build figures (build_figures): a cold build of debian-src:6.1 with kconfigs/
in a temporary cache (the user's cache is only read: the unpacked linux-source), then a rebuild
after a one-file change in the same object tree; kbuild records each build's phases itself
(harness.kernels.buildphases), bench reads them from build.json.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from harness.errors import InfraError
from harness.memory.parsers import parse_dmesg_boot_time

INIT_LINE = "Run /init as init process"
MARK_RE = re.compile(r"^\[\s*(\d+\.\d+)\] memhp-init: (.+?)\s*$", re.M)
QBOOT = Path("/usr/share/qemu/qboot.rom")
PHASES = ("qemu", "firmware", "kernel", "init", "ssh")
PHASE_TEXT = {"qemu": "QEMU start -> first firmware output", "firmware": "firmware -> kernel entry",
              "kernel": "kernel entry -> /init (dmesg)", "init": "/init -> dropbear listening",
              "ssh": "listening -> SSH command ran"}


class BenchError(InfraError):
    """A boot that bench cannot split into phases (a marker missing from the console or dmesg)."""


@dataclass(frozen=True)
class Boot:
    """One boot's phases (seconds) and its host-observed ready times."""

    phases: Dict[str, float]
    serial_ready: float                # launch -> ready marker on the console
    ssh_ready: float                   # launch -> first SSH command
    to_init: float                     # the guest kernel's own time to /init (dmesg)
    marks: Dict[str, float]            # init's marks, guest uptime
    firmware_output: bool              # the firmware printed on the debug port
    accel: str
    cpu: str = ""                      # the -cpu model QEMU was given
    kernel_file: str = ""              # what -kernel got: the bzImage, or its PVH vmlinux


def split_boot(times: Dict[str, float], console_text: str, arrived: Callable[[int], Optional[float]],
               dmesg: str, first_fw: Optional[float]) -> Boot:
    """Pure: the phases of one boot from the Machine's times, the console and dmesg."""
    to_init = parse_dmesg_boot_time(dmesg, INIT_LINE)
    if not to_init:
        raise BenchError(f"could not find {INIT_LINE!r} in the guest's dmesg")
    at = console_text.find(INIT_LINE)
    seen = arrived(at) if at >= 0 else None
    if seen is None:
        raise BenchError(f"the console never showed {INIT_LINE!r} (console loglevel too low?)")
    marks = {m.group(2): float(m.group(1)) for m in MARK_RE.finditer(dmesg)}
    if "dropbear listening" not in marks:
        raise BenchError("guest-images/init printed no 'dropbear listening' mark")
    entry = seen - to_init                       # host time of the kernel's clock zero
    start = first_fw if first_fw is not None else times["cont"]
    listening = entry + marks["dropbear listening"]
    phases = {"qemu": start - times["launch"], "firmware": entry - start, "kernel": to_init,
              "init": marks["dropbear listening"] - to_init, "ssh": times["ssh"] - listening}
    return Boot(phases, times["ready"] - times["launch"], times["ssh"] - times["launch"], to_init, marks,
                first_fw is not None, "")


class _FirstByte:
    """Polls a file until it is non-empty; the host time it first was (the firmware's first output)."""

    def __init__(self, path: Path):
        self.path, self.seen = path, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "_FirstByte":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                if self.path.stat().st_size > 0:
                    self.seen = time.monotonic()
                    return
            except OSError:
                pass
            time.sleep(0.002)


def boot_once(kernel, image, log_dir: Path, accel: str, bios: Optional[Path], cpu: Optional[str] = None) -> Boot:
    """One real boot, timed; the guest is shut down before returning."""
    from harness.vm.guest import VM
    fw_log = log_dir / "firmware.log"
    vm = VM(kernel, image, log_dir, accel=accel)
    vm.machine.bios, vm.machine.debugcon, vm.machine.cpu = bios, fw_log, cpu
    with _FirstByte(fw_log) as fw:
        try:
            vm.start()
            dmesg = vm.run("dmesg", timeout=60).stdout
            boot = split_boot(vm.machine.times, vm.console.text, vm.console.arrived, dmesg, fw.seen)
            argv = vm.machine.argv
            return Boot(boot.phases, boot.serial_ready, boot.ssh_ready, boot.to_init, boot.marks,
                        boot.firmware_output, vm.machine.runtime.accel, argv[argv.index("-cpu") + 1],
                        argv[argv.index("-kernel") + 1])
        finally:
            vm.close()


def run_suite(spec: str, accel: str, jobs: int, keyword: Optional[str], log: Path) -> float:
    """`memhp run` once, as a user runs it; its wall time. Exit 0 or 1 (kernel failures) count."""
    argv = [sys.executable, "-m", "harness", "run", "--kernel", spec, "--accel", accel, "--jobs", str(jobs)]
    if keyword:
        argv += ["-k", keyword]
    t0 = time.monotonic()
    with open(log, "w") as out:
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    wall = time.monotonic() - t0
    if rc not in (0, 1):
        raise InfraError(f"the suite run for bench exited {rc}; see {log}")
    return wall


def median_phases(boots: Sequence[Boot]) -> Dict[str, float]:
    return {p: statistics.median(b.phases[p] for b in boots) for p in PHASES}


def boot_line(i: int, b: Boot) -> str:
    # Each boot's own split too: on a noisy host one phase can swing (before the kernel's clock:
    # 0.17 s in one boot, 0.64 s in the next, same run), which the medians below hide.
    p = b.phases
    return (f"boot {i}: serial-ready {b.serial_ready:.2f}s  ssh-ready {b.ssh_ready:.2f}s  "
            f"kernel-to-/init {b.to_init:.2f}s  (before the kernel {p['qemu'] + p['firmware']:.2f}s, "
            f"init {p['init']:.2f}s, ssh {p['ssh']:.2f}s; ratio {b.ssh_ready / b.to_init:.2f}; accel {b.accel})")


CPU_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def parse_cpus(text: Optional[str]) -> List[Optional[str]]:
    """--cpu: one QEMU CPU model or several, comma-separated (boots alternate between them)."""
    if text is None:
        return [None]
    models = text.split(",")
    bad = [m for m in models if not CPU_RE.match(m)]
    if bad or len(set(models)) != len(models):
        from harness.errors import UsageError
        raise UsageError(f"--cpu {text!r}: QEMU CPU model names (e.g. max,qemu64), comma-separated, each once")
    return list(models)


def cpu_summary(cpu: str, boots: Sequence[Boot]) -> str:
    """One model's medians, for boots that alternated between CPU models in one run."""
    mi = statistics.median(b.to_init for b in boots)
    mh = statistics.median(b.ssh_ready for b in boots)
    med = median_phases(boots)
    return (f"cpu {cpu}: {len(boots)} boots, median ssh-ready {mh:.2f}s, kernel time to /init {mi:.2f}s, "
            f"firmware {med['firmware']:.2f}s, /init->listening {med['init']:.2f}s, "
            f"ssh_ready_ratio {mh / mi:.2f}")


def breakdown(boots: Sequence[Boot]) -> List[str]:
    med = median_phases(boots)
    total = sum(med.values())
    lines = [f"boot phases, median of {len(boots)} (seconds, share of ssh-ready):"]
    for p in PHASES:
        text = PHASE_TEXT[p]
        if p == "qemu" and not all(b.firmware_output for b in boots):
            text = "QEMU start -> CPUs started (the firmware printed nothing)"
        lines.append(f"  {text:<58} {med[p]:6.2f}s  {100 * med[p] / total:4.0f}%")
    steps = _init_steps(boots)
    for name, v in steps:
        lines.append(f"    /init {name:<51} {v:6.2f}s")
    return lines


def _init_steps(boots: Sequence[Boot]) -> List:
    """Median guest time between init's consecutive marks (the first from /init's exec)."""
    names = list(boots[0].marks)
    out = []
    prev = None
    for n in names:
        vals = [b.marks[n] - (b.marks[prev] if prev else b.to_init) for b in boots if n in b.marks
                and (prev is None or prev in b.marks)]
        out.append((f"-> {n}", statistics.median(vals)))
        prev = n
    return out


def bench(kernel, image, spec: str, accel: str, runs: int, log_root: Path, suite: bool, jobs: int,
          keyword: Optional[str], firmware: str, say: Callable[[str], None], entry: Optional[str] = None,
          cpus: Sequence[Optional[str]] = (None,)) -> Dict[str, float]:
    """The whole bench; prints through `say`; returns the figures of the last line."""
    bios = QBOOT if firmware == "qboot" else None
    if bios is not None and not bios.is_file():
        raise InfraError(f"{bios} not found (Debian package qemu-system-data)")
    if entry is not None:
        # The VM layer picks -kernel from MEMHP_ENTRY; the suite run inherits it too.
        os.environ["MEMHP_ENTRY"] = entry
    # Several CPU models: the boots alternate between them, so the load drifts alike for each.
    by_cpu: Dict[Optional[str], List[Boot]] = {c: [] for c in cpus}
    n = 0
    for i in range(runs):
        for c in cpus:
            n += 1
            d = Path(log_root) / f"boot-{n}"
            d.mkdir(parents=True, exist_ok=True)
            b = boot_once(kernel, image, d, accel, bios, c)
            by_cpu[c].append(b)
            say(boot_line(n, b) + (f" cpu {b.cpu}" if len(cpus) > 1 else ""))
    boots = by_cpu[cpus[0]]
    pvh = boots[0].kernel_file != str(kernel.image)
    say(f"entry: {'PVH, the uncompressed vmlinux' if pvh else 'the bzImage'} (-kernel {boots[0].kernel_file})")
    if len(cpus) > 1:
        for c in cpus:
            say(cpu_summary(by_cpu[c][0].cpu, by_cpu[c]))
        say(f"the figures below are those of cpu {boots[0].cpu}")
    for line in breakdown(boots):
        say(line)
    mi = statistics.median(b.to_init for b in boots)
    ms = statistics.median(b.serial_ready for b in boots)
    mh = statistics.median(b.ssh_ready for b in boots)
    say(f"medians: serial-ready {ms:.2f}s, ssh-ready {mh:.2f}s, kernel time to /init {mi:.2f}s "
        f"(ratios are host-observed times / the guest kernel's own time to /init; firmware {firmware})")
    figures = {"ssh_ready_ratio": mh / mi, "serial_ready_ratio": ms / mi}
    if suite:
        wall = run_suite(spec, accel, jobs, keyword, Path(log_root) / "suite.log")
        figures["suite_ratio"] = wall / mi
        say(f"suite: {wall:.0f}s wall with --jobs {jobs}{' -k ' + repr(keyword) if keyword else ''} "
            f"(log {Path(log_root) / 'suite.log'})")
    return figures


def last_line(figures: Dict[str, float], runs: int, release: str) -> str:
    def f(key: str, fmt: str) -> str:
        return format(figures[key], fmt) if key in figures else "n/a"
    line = (f"ssh_ready_ratio={f('ssh_ready_ratio', '.2f')} suite_ratio={f('suite_ratio', '.1f')} "
            f"serial_ready_ratio={f('serial_ready_ratio', '.2f')} runs={runs} kernel={release}")
    if "cold_build_s" in figures:
        line += (f" cold_build_s={figures['cold_build_s']:.1f} rebuild_s={figures['rebuild_s']:.1f} "
                 f"build_load5={figures['build_load']:.2f}")
    return line


# ---------------------------------------------------------------- build figures

BUILD_VERSION = "6.1"                      # the issue's figure: debian-src:6.1 with kconfigs/
REBUILD_FILE = "mm/memory_hotplug.c"
# A real code change (a new object in .rodata), not a comment: the object's content changes.
REBUILD_LINE = 'static const char memhp_bench_rebuild[] __used = "memhp bench: one-file change";\n'


@dataclass(frozen=True)
class BuildRun:
    """One kbuild.build: its build.json seconds and phases, the load average before and after, and
    the CPU time (user + system) of every program it ran: far less sensitive to the host's load
    than the wall time, so two configs can be compared on a busy host."""

    seconds: float
    phases: Dict[str, float]
    load_before: Tuple[float, float, float]
    load_after: Tuple[float, float, float]
    cpu_s: float = 0.0


def one_file_patch(tree: Path, rel: str = REBUILD_FILE) -> str:
    """A unified diff (patch -p1) that appends REBUILD_LINE to `rel` of `tree`."""
    old = (Path(tree) / rel).read_text().splitlines(keepends=True)
    new = old + [REBUILD_LINE]
    return "".join(difflib.unified_diff(old, new, f"a/{rel}", f"b/{rel}"))


def _load() -> Tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]


def _timed_build(tree: Path, cache: Path, fragments: Sequence[Path], patches: Sequence[Path],
                 jobs: Optional[int]) -> BuildRun:
    import resource
    from harness.kernels import kbuild
    before = _load()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    art = kbuild.build(tree, fragments=fragments, patches=patches, cache=cache, jobs=jobs,
                       spec=f"debian-src:{BUILD_VERSION}")
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = _load()
    meta = json.loads((Path(art.image).parent / "build.json").read_text())
    if not meta.get("phases"):
        raise BenchError(f"{Path(art.image).parent}/build.json has no phases: it was not built by this run")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return BuildRun(float(meta["seconds"]), {k: float(v) for k, v in meta["phases"].items()}, before, after, cpu)


def build_line(what: str, r: BuildRun) -> str:
    from harness.kernels.buildphases import PHASES
    parts = " + ".join(f"{p} {r.phases[p]:.1f}s" for p in PHASES if p in r.phases)
    return (f"build {what}: {r.seconds:.1f}s = {parts}; CPU time {r.cpu_s:.0f}s  "
            f"(load average {'/'.join(f'{x:.2f}' for x in r.load_before)} before, "
            f"{'/'.join(f'{x:.2f}' for x in r.load_after)} after; 1/5/15 min)")


def build_figures(work: Path, fragments: Sequence[Path], jobs: Optional[int],
                  say: Callable[[str], None]) -> Dict[str, float]:
    """A cold build of debian-src:6.1 in a temporary cache under `work`, then a rebuild after a
    one-file change; the temporary cache is removed afterwards, the user's is never written."""
    from harness.kernels import kbuild
    tree = kbuild.source_tree(BUILD_VERSION)
    cache = Path(work) / "build-cache"
    extra = "".join(f" + {f}" for f in fragments)
    say(f"build: debian-src:{BUILD_VERSION} ({tree.parent.name}) with kconfigs/*.config{extra}, "
        f"-j{jobs or os.cpu_count()}, in a temporary cache {cache}")
    try:
        cold = _timed_build(tree, cache, fragments, (), jobs)
        say(build_line("cold", cold))
        patch = Path(work) / "one-file.patch"
        patch.write_text(one_file_patch(tree))
        re_ = _timed_build(tree, cache, fragments, (patch,), jobs)
        say(build_line(f"rebuild after a one-file change ({REBUILD_FILE})", re_))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"cold_build_s": cold.seconds, "rebuild_s": re_.seconds, "build_load": cold.load_after[1]}
