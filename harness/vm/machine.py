"""Machine: the QEMU process. It owns the process, the private run folder, the console and
the QMP connection, and always cleans up: polite `quit`, SIGKILL after a deadline, run
folder removed, in a `finally`. QEMU is started with PR_SET_PDEATHSIG, so even a SIGKILLed
memhp leaves no qemu-system process behind; every live Machine is held (strongly) in _live
until it is torn down, so Ctrl-C and atexit reach all of them.
"""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from harness.cache import cache_root, ensure_dir, make_run_dir
from harness.vm import accel as _accel
from harness.vm.console import Console
from harness.errors import GuestCrash, InfraError, KVMBroken, VMLaunchFailure
from harness.log import warn
from harness.vm.qemu_argv import ACCELS, GuestConfig, Runtime, build_argv, format_argv
from harness.vm.qmp import QMP

KVM_FIRST_OUTPUT_S = 10.0      # a working KVM prints the banner in well under a second
BOOT_READY_S = 120.0           # TCG boot to the ready marker is ~3-10 s; this is the hang bound
QUIT_GRACE_S = 3.0
FIRST_OUTPUT_RE = re.compile(r"Linux version \d")
KVM_FAILURE_RE = re.compile(r"emulation failure|KVM internal error|kvm run failed|failed to initialize kvm",
                            re.I)
HOSTFWD_RE = re.compile(r"Could not set up host forwarding rule")

_live: "set[Machine]" = set()   # strong references: a Machine leaves only in _teardown

# prctl resolved here, in the parent: the forked child must not load libc (dlopen takes locks
# other threads may have held at fork time). None where there is no prctl (not Linux).
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _prctl.restype = ctypes.c_int
except (OSError, AttributeError):
    _prctl = None
PR_SET_PDEATHSIG = 1
# A guest-initiated SHUTDOWN (QEMU exits: -no-reboot) whose reason means the kernel went down.
GUEST_SHUTDOWN_REASONS = ("guest-reset", "guest-panic", "guest-shutdown")


def cleanup_all() -> int:
    """Kill every Machine still running in this process and remove its run folder.
    Called from atexit and after Ctrl-C; returns how many were killed."""
    n = 0
    for m in list(_live):
        if m.alive:
            n += 1
        try:
            m.kill()
            m._teardown(grace=2)
        except Exception:
            pass
    return n


atexit.register(cleanup_all)


def kill_all() -> int:
    """SIGKILL every live QEMU of this process and nothing more, so it is safe in a signal
    handler; the shutdown that follows removes the run folders. Returns how many it killed."""
    n = 0
    for m in list(_live):
        if m.alive:
            m.kill()
            n += 1
    return n


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pdeathsig_for(parent: int):
    """The preexec_fn: SIGKILL QEMU when memhp dies, and die at once if memhp already died
    between fork and prctl (then the signal would never come). Also used by memhp replay's QEMU."""
    def child() -> None:  # runs in the child between fork and exec: no imports, no dlopen
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
    return child


_pdeathsig_for = pdeathsig_for


class GuestInitFailed(InfraError):
    """The guest's init printed a line that means it can never become ready (e.g. dropbear
    did not start); carries the console's last lines."""

    def __init__(self, msg: str, console_tail: str = ""):
        super().__init__(msg)
        self.console_tail = console_tail


class Machine:
    """One QEMU process. Use as a context manager; launch() returns once the guest's init
    printed its ready marker on the serial console."""

    def __init__(self, config: GuestConfig, kernel: Path, initrd: Path, accel: str = "auto",
                 log_dir: Optional[Path] = None, ready_marker: Optional[str] = None,
                 boot_timeout: float = BOOT_READY_S, fatal_re: Optional["re.Pattern"] = None,
                 qemu: str = "qemu-system-x86_64"):
        if accel not in ("auto",) + ACCELS:
            raise ValueError(f"accel must be auto, tcg or kvm, not {accel!r}")
        self.config = config
        self.kernel, self.initrd = Path(kernel), Path(initrd)
        self.accel_requested = accel
        self.qemu = qemu
        self.runtime: Optional[Runtime] = None   # set by launch(): run folder, port, accel
        self.log_dir = Path(log_dir) if log_dir else None
        self.ready_marker = ready_marker
        self.fatal_re = fatal_re   # a console line that means the guest can never become ready
        self.boot_timeout = boot_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.run_dir: Optional[Path] = None
        self.console: Optional[Console] = None
        self.qmp: Optional[QMP] = None
        self.argv: list = []
        self.times: dict = {}
        self.exitcode: Optional[int] = None
        self.fell_back_to_tcg = False
        self.bios: Optional[Path] = None       # Runtime.bios / .debugcon, set before launch (bench)
        self.debugcon: Optional[Path] = None
        self.cpu: Optional[str] = None         # Runtime.cpu: another -cpu model (bench --cpu)

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Machine":
        try:
            self.launch()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def launch(self) -> "Machine":
        qemu = _accel.check_qemu(self.qemu)
        if self.accel_requested == "kvm" and not _accel.kvm_usable():
            raise KVMBroken("--accel kvm: /dev/kvm is missing or not accessible")
        accel = _accel.choose(self.accel_requested, qemu)
        if accel is not None:
            return self._launch_with(accel)
        try:  # KVM opens but was never tried on this host and QEMU: try it, remember the verdict
            return self._launch_with("kvm")
        except KVMBroken as e:
            _accel.remember_kvm_verdict(qemu, False)
            self._teardown()
            warn(f"KVM is present but broken ({e}); falling back to TCG")
            self.fell_back_to_tcg = True
            return self._launch_with("tcg")

    def _launch_with(self, accel: str) -> "Machine":
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="run-", dir=ensure_dir(cache_root() / "logs")))
        ensure_dir(self.log_dir)
        for attempt in range(5):
            # 0700 with our pid recorded at once: clean_stale() of a later run removes it once we are gone
            self.run_dir = make_run_dir()
            self.runtime = Runtime(kernel=self.kernel, initrd=self.initrd, run_dir=self.run_dir,
                                   ssh_port=free_port(), accel=accel, qemu=self.qemu,
                                   bios=self.bios, debugcon=self.debugcon, cpu=self.cpu)
            self.argv = build_argv(self.config, self.runtime)
            (self.log_dir / "argv.txt").write_text(format_argv(self.argv) + "\n")
            self.times = {"launch": time.monotonic()}
            qlog = open(self.log_dir / "qemu.log", "ab")
            _live.add(self)
            try:
                self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=qlog,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             preexec_fn=_pdeathsig_for(os.getpid()), close_fds=True)
            finally:
                qlog.close()
            try:
                self._attach()
                break
            except VMLaunchFailure as e:
                if HOSTFWD_RE.search(e.output) and attempt < 4:
                    self._teardown()   # the port was taken between probe and bind: try another
                    continue
                if accel == "kvm" and not isinstance(e, KVMBroken):
                    k = KVMBroken(f"QEMU failed under KVM: {e}", e.argv)  # e's text has the detail already
                    k.exitcode, k.output, k.console_tail = e.exitcode, e.output, e.console_tail
                    raise k from e
                raise
        self.qmp.execute("cont")
        self.times["cont"] = time.monotonic()
        if accel == "kvm":
            self._wait_first_output_kvm()
        if self.ready_marker:
            self.wait_ready()
        return self

    def _attach(self) -> None:
        deadline = time.monotonic() + 15
        while not (self.runtime.qmp_socket.exists() and self.runtime.console_socket.exists()):
            if self.proc.poll() is not None:
                self._raise_exited("QEMU exited before it opened its sockets")
            if time.monotonic() > deadline:
                raise VMLaunchFailure("QEMU did not create its QMP/console sockets within 15 s",
                                      self.argv, None, self.qemu_output())
            time.sleep(0.01)
        self.qmp = QMP(self.runtime.qmp_socket, self.log_dir / "qmp.jsonl")
        try:
            self.qmp.connect(timeout=10, alive=lambda: self.proc.poll() is None)
        except InfraError:
            if self.proc.poll() is not None:
                self._raise_exited("QEMU exited during QMP negotiation")
            raise
        self.console = Console(self.runtime.console_socket, self.log_dir / "console.log").connect(10)

    def _raise_exited(self, msg: str) -> None:
        self.exitcode = self.proc.wait()
        raise VMLaunchFailure(msg, self.argv, self.exitcode, self.qemu_output(),
                              self.console.tail() if self.console else "")

    def _wait_first_output_kvm(self) -> None:
        deadline = time.monotonic() + KVM_FIRST_OUTPUT_S
        while time.monotonic() < deadline:
            if FIRST_OUTPUT_RE.search(self.console.text):
                self.times["first_output"] = time.monotonic()
                return
            out = self.qemu_output()
            if KVM_FAILURE_RE.search(out):
                raise KVMBroken("KVM reported an emulation failure", self.argv, self.proc.poll(), out)
            if self.proc.poll() is not None:
                raise KVMBroken("QEMU exited under KVM before the kernel printed anything",
                                self.argv, self.proc.poll(), out)
            time.sleep(0.05)
        raise KVMBroken(f"no kernel output within {KVM_FIRST_OUTPUT_S:.0f} s under KVM "
                        f"(console: {self.console.tail(1)!r})", self.argv, None, self.qemu_output())

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Wait for the init's ready marker, failing fast if QEMU exits, the kernel panics or
        resets, or the init prints a line matching fatal_re (e.g. dropbear failed)."""
        timeout = self.boot_timeout if timeout is None else timeout
        ready = r"^" + re.escape(self.ready_marker) + r"\s*$"
        if self.fatal_re is not None:
            ready = rf"(?:{ready})|(?P<fatal>{self.fatal_re.pattern})"
        try:
            m = self.console.wait_for(FIRST_OUTPUT_RE, timeout, what="the kernel banner")
            self.times.setdefault("first_output", time.monotonic())
            m = self.console.wait_for(re.compile(ready, re.M),
                                      max(1.0, timeout - (time.monotonic() - self.times["launch"])),
                                      since=m.start(), what=f"the guest's ready marker {self.ready_marker}")
        except InfraError:
            if self.proc.poll() is not None:
                fault = self.guest_shutdown()
                if fault is not None:
                    raise fault from None
                self._raise_exited("QEMU exited during boot")
            raise
        if m.groupdict().get("fatal"):
            raise GuestInitFailed(f"the guest's init failed: {m.group('fatal').strip()}",
                                  console_tail=self.console.tail(10))
        self.times["ready"] = time.monotonic()

    def shutdown(self) -> None:
        """Idempotent: quit politely, kill after a deadline, remove the run folder."""
        asked = False
        try:
            if self.proc is not None and self.proc.poll() is None and self.qmp is not None \
                    and not self.qmp.disconnected:
                try:
                    self.qmp.execute("quit", timeout=QUIT_GRACE_S)
                    asked = True
                except Exception:
                    pass
        finally:
            self._teardown(grace=QUIT_GRACE_S if asked else 0.2)

    def _teardown(self, grace: float = 0.2) -> None:
        try:
            if self.proc is not None:
                try:
                    self.exitcode = self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.exitcode = self.proc.wait(timeout=10)
        finally:
            if self.qmp is not None:
                self.qmp.close()
                self.qmp = None
            if self.console is not None:
                self.console.close()
                self.console = None
            if self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self.run_dir = None
            _live.discard(self)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Fault injection: signal QEMU without any cleanup."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    # ---------------------------------------------------------------- queries
    def guest_crash(self, settle: float = 2.0) -> Optional[GuestCrash]:
        """A GuestCrash if the guest kernel panicked: QEMU's GUEST_PANICKED event (pvpanic,
        which pauses the guest) or the panic line on the console. After the event, wait up to
        `settle` seconds for the console's panic line so the splat can be quoted."""
        crash = self.console.panic() if self.console else None
        if crash is not None or self.qmp is None:
            return crash
        ev = next((e for e in self.qmp.events() if e.get("event") == "GUEST_PANICKED"), None)
        if ev is None:
            return None
        deadline = time.monotonic() + settle
        while crash is None and time.monotonic() < deadline:
            time.sleep(0.05)
            crash = self.console.panic() if self.console else None
        return crash or GuestCrash("panic", f"QEMU reported GUEST_PANICKED {json.dumps(ev.get('data', {}))}"
                                            f"\n--- console tail ---\n{self.console.tail() if self.console else ''}")

    def guest_shutdown(self) -> Optional[GuestCrash]:
        """A GuestCrash if the guest itself reset or powered off (a triple fault is a reset):
        QEMU's SHUTDOWN event with guest=true. With -no-reboot QEMU then exits 0, which is
        the kernel's doing, not QEMU's."""
        if self.qmp is None:
            return None
        ev = next((e for e in self.qmp.events() if e.get("event") == "SHUTDOWN"
                   and (e.get("data") or {}).get("guest")), None)
        if ev is None:
            return None
        reason = (ev.get("data") or {}).get("reason", "unknown")
        kind, what = {"guest-reset": ("reset", "reset the machine (a reboot or a triple fault)"),
                      "guest-shutdown": ("power-off", "powered the machine off"),
                      "guest-panic": ("panic", "panicked")}.get(reason, (reason, f"shut down ({reason})"))
        tail = self.console.tail() if self.console else ""
        return GuestCrash(kind, f"QEMU reported SHUTDOWN {json.dumps(ev.get('data', {}))}: the guest kernel "
                                f"{what}; with -no-reboot QEMU exits\n--- console tail ---\n{tail}")

    def fault(self) -> Optional[Exception]:
        """Why the guest cannot answer, if known: GuestCrash (it panicked, reset or powered
        off) or InfraError (QEMU exited on its own). Cheap; polled while a guest command runs,
        so a panic does not wait out a timeout."""
        crash = self.guest_crash() or self.guest_shutdown()
        if crash is not None:
            return crash
        if self.proc is not None and self.proc.poll() is not None:
            out = self.qemu_output().strip().splitlines()
            return InfraError(f"QEMU exited with status {self.proc.returncode}"
                              + (f": {out[-1]}" if out else ""))
        return None

    def paused(self) -> bool:
        """QMP's last run-state event is STOP (a `stop`, or pvpanic's pause), no round trip."""
        if self.qmp is None:
            return False
        last = next((e for e in reversed(self.qmp.events()) if e.get("event") in ("STOP", "RESUME")), None)
        return bool(last and last.get("event") == "STOP")

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to `timeout` s for QEMU to exit (no signal sent); True if it has."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def guest_running(self) -> bool:
        """QEMU is alive and QMP says the guest runs (not paused by `stop` or by a panic)."""
        if not self.alive or self.qmp is None or self.qmp.disconnected:
            return False
        try:
            return bool(self.qmp.execute("query-status", timeout=3).get("running"))
        except Exception:
            return False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def qemu_output(self) -> str:
        try:
            return (self.log_dir / "qemu.log").read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def describe(self) -> str:
        return format_argv(self.argv)

