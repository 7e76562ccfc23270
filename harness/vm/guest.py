"""Guest: the one command interface to a running guest, over two private transports (SSH
first, the serial shell as fallback), and VM, which composes kernel + image + GuestConfig +
Machine + Guest into one context manager.

Nothing outside the VM layer (qemu_argv, accel, machine, console, qmp, ssh, guest) names SSH
or the console's socket: callers use Guest.run / read / write / read_bytes /
read_file_bytes / dmesg, and VM.shell() for a human.
"""
from __future__ import annotations

import base64
import json
import os
import re
import select
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from harness.errors import GuestCommandError, Hang, InfraError
from harness.vm.image import GuestImage
from harness.kernels.kernel import KernelArtifact
from harness.log import warn
from harness.vm.machine import Machine
from harness.vm.qemu_argv import GuestConfig
from harness.vm.ssh import SSH, SSHTransportError

SSH_READY_S = 60.0
SAVE_DMESG_S = 15.0
# An init line after which the guest can never be ready for SSH (guest-images/init prints
# "memhp-init: <step> failed"): reported at once instead of waiting out the boot deadline.
INIT_FATAL_RE = re.compile(r"^memhp-init: (?:dropbear|eth0|ip )[^\n]* failed\s*$", re.M)
# The guest's virtio-net transmit queue stalled (its TX watchdog fired: 6.12 prints
# "virtio_net virtio0 eth0: NETDEV WATCHDOG: CPU: 1: transmit queue 0 timed out 5308 ms", 6.1
# "NETDEV WATCHDOG: eth0 (virtio_net): transmit queue 0 timed out"). Seen at boot, before memhp
# did anything, in 2 of ~500 boots with -smp 2 under single-threaded TCG on a host at load 8-17:
# the queue never recovered, so SSH never answered. That is the transport, not memory hotplug.
NET_STALL_RE = re.compile(r"NETDEV WATCHDOG: .*transmit queue \d+ timed out")
BOOT_ATTEMPTS = 2         # a boot whose network stalled is retried once, in a fresh QEMU
SERIAL_STDIN_MAX = 3000   # base64 characters that fit on one serial command line
LOG_STDOUT_MAX = 256 << 10  # characters of a command's output kept in commands.jsonl
SHELL_POLL_S = 0.5        # how often the interactive shell checks for a paused or crashed guest


@dataclass(frozen=True)
class CommandResult:
    cmd: str
    status: int
    stdout: str
    stderr: str
    transport: str = "ssh"

    @property
    def ok(self) -> bool:
        return self.status == 0

    def check(self) -> "CommandResult":
        if self.status != 0:
            raise GuestCommandError(self.cmd, self.status, self.stdout, self.stderr)
        return self


class Guest:
    """Commands in the guest. SSH when it works; the serial shell when dropbear is gone.

    Every command is appended to commands.jsonl in the machine's log folder, one JSON object
    a line: {"t": start, "t_end": end, "cmd", "status" (None when it raised), "transport",
    "stdin" (base64, when given), "stdout" (text commands, the first LOG_STDOUT_MAX characters)};
    `memhp replay` and the standalone reproducer run them again in this order, between the QMP
    commands of qmp.jsonl, and compare what the guest answers."""

    def __init__(self, machine: Machine, ssh: Optional[SSH]):
        self.machine = machine
        self._ssh = ssh
        self.transport = "ssh" if ssh else "serial"

    def _log_command(self, cmd: str, t0: float, status: Optional[int], stdin: Optional[bytes] = None,
                     stdout: Optional[str] = None) -> None:
        log_dir = getattr(self.machine, "log_dir", None)
        if log_dir is None:
            return
        rec = {"t": round(t0, 6), "t_end": round(time.time(), 6), "cmd": cmd, "status": status,
               "transport": self.transport}
        if stdin:
            rec["stdin"] = base64.b64encode(stdin).decode()
        if stdout is not None:
            rec["stdout"] = stdout[:LOG_STDOUT_MAX]
        try:
            with open(Path(log_dir) / "commands.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError:
            pass   # the record helps a replay; losing it must not fail the command

    # ---------------------------------------------------------------- transports
    def _serial(self, cmd: str, timeout: float) -> CommandResult:
        if self.machine.console is None:
            raise InfraError("no console to fall back to")
        status, out = self.machine.console.run(cmd, timeout=timeout)
        return CommandResult(cmd=cmd, status=status, stdout=out, stderr="", transport="serial")

    def _over_ssh(self, cmd: str, timeout: float, stdin: Optional[bytes]) -> CommandResult:
        status, out, err = self._ssh.run_bytes(cmd, timeout=timeout, stdin=stdin, abort=self.machine.fault)
        return CommandResult(cmd, status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def _fault_or(self, e: BaseException) -> BaseException:
        """Report the cause, not the symptom: a panic or reset (CRASH), or QEMU's exit (INFRA)."""
        if isinstance(e, InfraError):
            self.machine.wait_exit(1.0)  # a dead transport: let QEMU's exit show first
        return self.machine.fault() or e

    def run(self, cmd: str, timeout: float = 60.0, check: bool = False, stdin: Optional[bytes] = None,
            transport: Optional[str] = None) -> CommandResult:
        """Run a shell command; stdin (bytes) is fed to it. `transport` ("ssh" or "serial")
        forces one; by default SSH, falling back to the serial shell if SSH is lost."""
        t0, res = time.time(), None
        try:
            res = self._run(cmd, timeout, stdin, transport)
        finally:
            self._log_command(cmd, t0, res.status if res else None, stdin, res.stdout if res else None)
        return res.check() if check else res

    def _run(self, cmd: str, timeout: float, stdin: Optional[bytes], transport: Optional[str]) -> CommandResult:
        via = transport or self.transport
        try:
            if via == "ssh":
                if self._ssh is None:
                    raise InfraError("the guest has no SSH transport")
                try:
                    res = self._over_ssh(cmd, timeout, stdin)
                except SSHTransportError as e:
                    if transport == "ssh":
                        raise
                    res = self._fallback(cmd, timeout, stdin, e)
            else:
                res = self._serial(self._serial_stdin(cmd, stdin), timeout)
                res = CommandResult(cmd, res.status, res.stdout, res.stderr, "serial")
        except (Hang, InfraError) as e:
            fault = self._fault_or(e)
            if fault is e:
                raise
            raise fault from e
        return res

    @staticmethod
    def _serial_stdin(cmd: str, stdin: Optional[bytes]) -> str:
        if not stdin:
            return cmd if stdin is None else f"( {cmd} ) </dev/null"
        b64 = base64.b64encode(stdin).decode()
        if len(b64) > SERIAL_STDIN_MAX:
            raise InfraError(f"{len(stdin)} bytes of stdin do not fit the serial console's command "
                             f"line; they need SSH")
        return f"echo {b64} | base64 -d | ( {cmd} )"

    def _fallback(self, cmd: str, timeout: float, stdin: Optional[bytes], err: Exception) -> CommandResult:
        fault = self.machine.fault()
        if fault is not None:
            raise fault from err
        if self.machine.paused():   # stopped vCPUs answer on no transport: no reconnect, no fallback
            raise Hang(f"guest command {cmd!r}", last_seen=f"the guest is paused (QMP STOP); SSH: {err}",
                       timeout=timeout) from err
        try:  # one quick reconnect: dropbear may only have dropped this connection
            self._ssh.close()
            self._ssh.connect(timeout=5, alive=lambda: self.machine.alive)
            return self._over_ssh(cmd, timeout, stdin)
        except (Hang, SSHTransportError, InfraError):
            pass
        warn(f"SSH to the guest failed ({err}); falling back to the serial console")
        self.transport = "serial"
        res = self._serial(self._serial_stdin(cmd, stdin), timeout)
        return CommandResult(cmd, res.status, res.stdout, res.stderr, "serial")

    # ---------------------------------------------------------------- files
    def read(self, path: str, timeout: float = 30.0) -> str:
        return self.run(f"cat {shlex.quote(path)}", timeout=timeout, check=True).stdout

    def write(self, path: str, value: str, timeout: float = 60.0) -> CommandResult:
        """echo value > path; the result carries the kernel's errno text on failure (e.g. EINVAL)."""
        return self.run(f"echo {shlex.quote(value)} > {shlex.quote(path)}", timeout=timeout)

    def _bytes(self, argv: Tuple[str, ...], timeout: float) -> bytes:
        """The stdout of the program argv (stderr dropped) as bytes: raw over SSH, base64 over
        the (text) serial line."""
        cmd = shlex.join(argv) + " 2>/dev/null"
        try:
            if self.transport == "ssh":
                try:
                    t0 = time.time()
                    status = None
                    try:
                        status, out, err = self._ssh.run_bytes(cmd, timeout=timeout, abort=self.machine.fault)
                    finally:
                        self._log_command(cmd, t0, status)
                    if status:
                        raise GuestCommandError(cmd, status, "", err.decode(errors="replace"))
                    return out
                except SSHTransportError:
                    self.run("true", timeout=min(timeout, 60.0))   # reconnect, or fall back to serial
                    if self.transport == "ssh":
                        return self._bytes(argv, timeout)
            out = self.run(cmd + " | base64", timeout=timeout, check=True).stdout
            return base64.b64decode("".join(out.split()))
        except (Hang, InfraError) as e:
            fault = self._fault_or(e)
            if fault is e:
                raise
            raise fault from e

    def read_bytes(self, path: str, offset: int, length: int, timeout: float = 30.0) -> bytes:
        """Binary read of `length` bytes at `offset` (e.g. /proc/kpageflags), via dd."""
        if offset % 8 or length % 8:
            raise ValueError("read_bytes takes 8-byte aligned offsets and lengths")
        return self._bytes(("dd", f"if={path}", "bs=8", f"skip={offset // 8}", f"count={max(1, length // 8)}"),
                           timeout)

    def read_file_bytes(self, path: str, timeout: float = 120.0) -> bytes:
        """A whole file, binary (e.g. /sys/kernel/btf/vmlinux)."""
        return self._bytes(("cat", "--", path), timeout)

    def dmesg(self) -> str:
        return self.run("dmesg", timeout=30).stdout


def entry_image(kernel: KernelArtifact):
    """The file QEMU's -kernel gets. By default the bzImage's uncompressed vmlinux, booted through
    its PVH note: no real-mode firmware boot, no decompressor (memhp bench: firmware -> kernel entry
    1.3 s -> 0.2 s on 6.12). The bzImage when the kernel has no PVH entry (CONFIG_PVH unset), when
    the vmlinux cannot be extracted (with a warning), or with MEMHP_ENTRY=bzimage (the opt-out)."""
    if kernel.image is None or os.environ.get("MEMHP_ENTRY", "pvh").lower() == "bzimage" \
            or not Path(kernel.image).is_file():    # a missing image is QEMU's error to report, as before
        return kernel.image
    from harness.errors import KernelError
    from harness.kernels.pvh import pvh_vmlinux
    try:
        return pvh_vmlinux(Path(kernel.image)) or kernel.image
    except KernelError as e:
        warn(f"booting the bzImage: no PVH vmlinux from {kernel.image} ({e})")
        return kernel.image


class GuestNetStalled(InfraError):
    """SSH never answered because the guest's virtio-net TX queue stalled (NET_STALL_RE on the
    console): an infrastructure failure of the boot, not a verdict on the kernel's hotplug."""

    def __init__(self, msg: str, console_line: str = ""):
        super().__init__(msg)
        self.console_line = console_line


def net_stall_line(console_text: str) -> Optional[str]:
    """The first virtio-net TX watchdog line on the console, if any."""
    m = NET_STALL_RE.search(console_text)
    if m is None:
        return None
    start = console_text.rfind("\n", 0, m.start()) + 1
    end = console_text.find("\n", m.end())
    return console_text[start:end if end >= 0 else None].strip()


class VM:
    """kernel + image + GuestConfig -> a booted guest with QMP, console and a Guest; always
    cleaned up. `VM(kernel, image, log_dir, **config_fields)` builds the GuestConfig from the
    keywords; `VM(kernel, image, log_dir, config=GuestConfig(...))` takes one."""

    def __init__(self, kernel: KernelArtifact, image: GuestImage, log_dir: Path, accel: str = "auto",
                 ssh: bool = True, boot_timeout: float = 120.0, config: Optional[GuestConfig] = None,
                 **config_kw):
        if config is not None and config_kw:
            raise TypeError(f"VM takes config= or config keywords, not both ({', '.join(config_kw)})")
        self.kernel, self.image, self.log_dir = kernel, image, Path(log_dir)
        self.config: GuestConfig = config if config is not None else GuestConfig(**config_kw)
        self.want_ssh = ssh
        self.dirty: bool = False   # set by a scenario that leaves state behind: never reuse the guest
        self.facts = None          # the KernelFacts gathered on this guest, once
        self._accel, self._boot_timeout = accel, boot_timeout
        self.machine = self._new_machine()
        self.guest: Optional[Guest] = None
        self.boot_retries: list = []   # why each earlier boot attempt of this VM was thrown away

    def _new_machine(self) -> Machine:
        return Machine(self.config, entry_image(self.kernel), self.image.initramfs, accel=self._accel,
                       log_dir=self.log_dir, ready_marker=self.image.ready_marker, boot_timeout=self._boot_timeout,
                       fatal_re=INIT_FATAL_RE if self.want_ssh else None)

    @property
    def qmp(self):
        return self.machine.qmp

    @property
    def console(self):
        return self.machine.console

    def __enter__(self) -> "VM":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "VM":
        """Boot. A boot whose network stalled (GuestNetStalled) is retried once in a fresh QEMU;
        the first attempt's logs are kept as boot1-<name> beside the new ones."""
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            try:
                return self._start_once()
            except GuestNetStalled as e:
                if attempt == BOOT_ATTEMPTS:
                    raise
                warn(f"{self.log_dir.name}: {e}; booting a fresh guest")
                self.boot_retries.append(str(e))
                self.machine.shutdown()
                for name in ("console.log", "qemu.log", "qmp.jsonl", "argv.txt"):
                    f = self.log_dir / name
                    if f.exists():
                        f.replace(self.log_dir / f"boot{attempt}-{name}")
                self.machine = self._new_machine()
        raise AssertionError("unreachable")

    def _start_once(self) -> "VM":
        self.machine.launch()
        ssh = None
        if self.want_ssh:
            ssh = SSH("127.0.0.1", self.machine.runtime.ssh_port, self.image.ssh_key, self.image.host_key_pub)
            try:
                ssh.connect(timeout=SSH_READY_S, alive=lambda: self.machine.alive)
            except Hang as e:
                line = net_stall_line(self.machine.console.text if self.machine.console is not None else "")
                if line is None:
                    raise
                raise GuestNetStalled(f"SSH did not answer in {SSH_READY_S:g} s: the guest's virtio-net transmit "
                                      f"queue stalled (console: {line!r})", line) from e
            self.machine.times["ssh"] = time.monotonic()
        self.guest = Guest(self.machine, ssh)
        return self

    def close(self) -> None:
        try:
            if self.guest is not None and self.machine.alive:
                self.save_dmesg()
        except Exception:
            pass
        try:
            if self.guest is not None and self.guest._ssh is not None:
                self.guest._ssh.close()
        finally:
            self.machine.shutdown()

    def save_dmesg(self) -> None:
        try:
            if not self.machine.guest_running():  # paused or panicked: it cannot answer
                raise InfraError("the guest is not running (paused or panicked)")
            text = self.guest.run("dmesg", timeout=SAVE_DMESG_S).stdout
        except Exception as e:  # a dead or wedged guest: say so in the artifact
            text = f"(dmesg unavailable: {e})\n"
        (self.log_dir / "dmesg.txt").write_text(text)

    def run(self, cmd: str, timeout: float = 60.0, check: bool = False,
            stdin: Optional[bytes] = None) -> CommandResult:
        return self.guest.run(cmd, timeout=timeout, check=check, stdin=stdin)

    def shell(self, stdin_fd: int = 0, stdout_fd: int = 1, term: Optional[str] = None) -> str:
        """An interactive shell in the guest over SSH, until the shell exits, stdin ends, the
        user types `~.` at the start of a line (`~~` sends one `~`), or the guest is paused.
        Returns why it ended; a crashed guest or a dead QEMU raises its fault (GuestCrash,
        InfraError). A terminal on stdin_fd is put in raw mode and always restored."""
        if self.guest is None or self.guest._ssh is None:
            raise InfraError("the interactive shell needs the guest's SSH")
        try:
            cols, rows = os.get_terminal_size(stdout_fd)
        except OSError:
            cols, rows = 80, 24
        chan = self.guest._ssh.open_shell(term or os.environ.get("TERM", "vt100"), cols, rows)
        old = None
        if os.isatty(stdin_fd):
            import termios
            import tty
            old = termios.tcgetattr(stdin_fd)
            tty.setraw(stdin_fd, termios.TCSANOW)   # keep what was typed ahead
        esc = _Escape()
        try:
            while True:
                r, _, _ = select.select([chan, stdin_fd], [], [], SHELL_POLL_S)
                fault = self.machine.fault()
                if fault is not None:
                    raise fault
                if self.machine.paused():
                    return "the guest is paused (QMP STOP)"
                if chan in r:
                    data = chan.recv(65536)
                    if not data:
                        return "the guest's shell exited"
                    _write_all(stdout_fd, data)
                if stdin_fd in r:
                    data = os.read(stdin_fd, 4096)
                    if not data:
                        return "end of input"
                    out, leave = esc.feed(data)
                    if out:
                        chan.sendall(out)
                    if leave:
                        return "escape ~. typed"
        except OSError as e:   # socket.timeout from a wedged channel included
            raise self.guest._fault_or(Hang("the interactive shell's SSH channel", last_seen=repr(e))) from e
        finally:
            if old is not None:
                import termios
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, old)
            chan.close()


class _Escape:
    """ssh's escape rule: `~` right after a newline (or first) starts an escape; `~.` leaves,
    `~~` sends one `~`, `~` and anything else sends both. Escape sequences on stdin (the
    terminal's answers to the guest shell's cursor queries, ESC[row;colR, which busybox asks
    at every prompt; arrow keys) pass through without ending the start of a line."""

    def __init__(self) -> None:
        self.line_start, self.tilde = True, False
        self.seq = ""   # "" outside an escape sequence; "esc", "csi" or "ss3" inside one

    def _in_sequence(self, b: int) -> bool:
        if self.seq == "esc":
            self.seq = {ord("["): "csi", ord("O"): "ss3"}.get(b, "")
        elif self.seq == "csi":
            if 0x40 <= b <= 0x7E:
                self.seq = ""
        elif self.seq == "ss3":
            self.seq = ""
        elif b == 0x1B:
            self.seq = "esc"
        else:
            return False
        return True

    def feed(self, data: bytes):
        out = bytearray()
        for b in data:
            c = bytes((b,))
            if self.tilde:
                self.tilde = False
                if c == b".":
                    return bytes(out), True
                out += c if c == b"~" else b"~"
                if c == b"~":
                    self.line_start = False
                    continue
            if self._in_sequence(b):
                out += c
                continue
            if self.line_start and c == b"~":
                self.tilde = True
                continue
            out += c
            self.line_start = c in (b"\r", b"\n")
        return bytes(out), False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
