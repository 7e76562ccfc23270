"""`memhp bench`: N boots split into phases, the ready-time ratios, one suite run.

Every figure is a host wall time or a guest clock reading from the same boots, so the ratios
(host time / the guest kernel's own time to /init) compare like with like on a loaded host.
Phases of one boot, each from the clock that sees it:
  qemu      QEMU launched -> first firmware output (SeaBIOS's debug port 0x402, polled here);
            without firmware output (qboot prints nothing), QEMU launched -> CPUs started (`cont`)
  firmware  that point -> kernel entry (the host time the console showed "Run /init" minus
            its dmesg timestamp): firmware, bzImage decompression
  kernel    kernel entry -> "Run /init as init process" (dmesg)
  init      /init -> dropbear listening (guest-images/init's "memhp-init: ..." marks in dmesg)
  ssh       dropbear listening -> the first SSH command ran (ready marker, connect, auth)
"""
from __future__ import annotations

import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

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


def boot_once(kernel, image, log_dir: Path, accel: str, bios: Optional[Path]) -> Boot:
    """One real boot, timed; the guest is shut down before returning."""
    from harness.vm.guest import VM
    fw_log = log_dir / "firmware.log"
    vm = VM(kernel, image, log_dir, accel=accel)
    vm.machine.bios, vm.machine.debugcon = bios, fw_log
    with _FirstByte(fw_log) as fw:
        try:
            vm.start()
            dmesg = vm.run("dmesg", timeout=60).stdout
            boot = split_boot(vm.machine.times, vm.console.text, vm.console.arrived, dmesg, fw.seen)
            return Boot(boot.phases, boot.serial_ready, boot.ssh_ready, boot.to_init, boot.marks,
                        boot.firmware_output, vm.machine.runtime.accel)
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
    return (f"boot {i}: serial-ready {b.serial_ready:.2f}s  ssh-ready {b.ssh_ready:.2f}s  "
            f"kernel-to-/init {b.to_init:.2f}s  (accel {b.accel})")


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
          keyword: Optional[str], firmware: str, say: Callable[[str], None], entry: str = "bzimage") -> Dict[str, float]:
    """The whole bench; prints through `say`; returns the figures of the last line."""
    bios = QBOOT if firmware == "qboot" else None
    if bios is not None and not bios.is_file():
        raise InfraError(f"{bios} not found (Debian package qemu-system-data)")
    if entry == "pvh":
        import dataclasses
        from harness.kernels.pvh import pvh_vmlinux
        vmlinux = pvh_vmlinux(Path(kernel.image))
        if vmlinux is None:
            say("entry: the kernel has no PVH ELF note (CONFIG_PVH); booting the bzImage")
        else:
            kernel = dataclasses.replace(kernel, image=vmlinux)
            say(f"entry: PVH, -kernel {vmlinux}")
    boots = []
    for i in range(runs):
        d = Path(log_root) / f"boot-{i + 1}"
        d.mkdir(parents=True, exist_ok=True)
        b = boot_once(kernel, image, d, accel, bios)
        boots.append(b)
        say(boot_line(i + 1, b))
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
    suite = f"{figures['suite_ratio']:.1f}" if "suite_ratio" in figures else "n/a"
    return (f"ssh_ready_ratio={figures['ssh_ready_ratio']:.2f} suite_ratio={suite} "
            f"serial_ready_ratio={figures['serial_ready_ratio']:.2f} runs={runs} kernel={release}")
