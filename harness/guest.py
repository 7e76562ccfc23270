"""Guest: one command interface over two transports (SSH first, the serial shell as fallback),
and VM, which composes kernel + image + Machine + SSH into one context manager.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from harness.errors import GuestCommandError, Hang, InfraError
from harness.image import GUEST_IP, GuestImage
from harness.kernel import KernelArtifact
from harness.machine import Machine, warn
from harness.qemu_argv import VMSpec
from harness.ssh import SSH, CommandResult, SSHTransportError

SSH_READY_S = 60.0


class Guest:
    def __init__(self, machine: Machine, ssh: Optional[SSH]):
        self.machine = machine
        self.ssh = ssh
        self.transport = "ssh" if ssh else "serial"

    def _serial(self, cmd: str, timeout: float) -> CommandResult:
        if self.machine.console is None:
            raise InfraError("no console to fall back to")
        return self.machine.console.run(cmd, timeout=timeout)

    def run(self, cmd: str, timeout: float = 60.0, check: bool = False) -> CommandResult:
        try:
            if self.transport == "ssh":
                try:
                    res = self.ssh.run(cmd, timeout=timeout, abort=self.machine.fault)
                except SSHTransportError as e:
                    res = self._fallback(cmd, timeout, e)
            else:
                res = self._serial(cmd, timeout)
        except (Hang, InfraError) as e:
            # Report the cause, not the symptom: a panic (CRASH), or QEMU's exit (INFRA).
            if isinstance(e, InfraError):
                self.machine.wait_exit(1.0)  # a dead transport: let QEMU's exit show first
            fault = self.machine.fault()
            if fault is not None:
                raise fault from e
            raise
        return res.check() if check else res

    def _fallback(self, cmd: str, timeout: float, err: Exception) -> CommandResult:
        fault = self.machine.fault()
        if fault is not None:
            raise fault from err
        try:  # one quick reconnect: dropbear may only have dropped this connection
            self.ssh.close()
            self.ssh.connect(timeout=5, alive=lambda: self.machine.alive)
            return self.ssh.run(cmd, timeout=timeout, abort=self.machine.fault)
        except (Hang, SSHTransportError, InfraError):
            pass
        warn(f"SSH to the guest failed ({err}); falling back to the serial console")
        self.transport = "serial"
        return self._serial(cmd, timeout)

    def read(self, path: str, timeout: float = 30.0) -> str:
        return self.run(f"cat {shlex.quote(path)}", timeout=timeout, check=True).stdout

    def write(self, path: str, value: str, timeout: float = 60.0) -> CommandResult:
        """echo value > path; the result carries the kernel's errno text on failure (e.g. EINVAL)."""
        return self.run(f"echo {shlex.quote(value)} > {shlex.quote(path)}", timeout=timeout)

    def read_bytes(self, path: str, offset: int, length: int, timeout: float = 30.0) -> bytes:
        """Binary read (e.g. /proc/kpageflags) via dd; SSH only, since the console is text."""
        cmd = (f"dd if={shlex.quote(path)} bs=8 skip={offset // 8} count={max(1, length // 8)} "
               f"2>/dev/null")
        if offset % 8 or length % 8:
            raise ValueError("read_bytes takes 8-byte aligned offsets and lengths")
        if self.transport != "ssh":
            out = self.run(cmd + " | od -An -v -tx1", timeout=timeout, check=True).stdout
            return bytes(int(x, 16) for x in out.split())
        status, out, err = self.ssh.run_bytes(cmd, timeout=timeout, abort=self.machine.fault)
        if status:
            raise GuestCommandError(cmd, status, "", err.decode(errors="replace"))
        return out

    def dmesg(self) -> str:
        return self.run("dmesg", timeout=30).stdout


class VM:
    """kernel + image + spec -> a booted guest with QMP, console and SSH; always cleaned up."""

    def __init__(self, kernel: KernelArtifact, image: GuestImage, log_dir: Path, accel: str = "auto",
                 ssh: bool = True, boot_timeout: float = 120.0, **spec_kw):
        self.kernel, self.image, self.log_dir = kernel, image, Path(log_dir)
        self.want_ssh = ssh
        spec = VMSpec(kernel=kernel.image, initrd=image.initramfs, run_dir=Path("/nonexistent"),
                      ssh_port=1, accel=accel, **spec_kw)
        self.machine = Machine(spec, log_dir=self.log_dir, ready_marker=image.ready_marker,
                               boot_timeout=boot_timeout)
        self.ssh: Optional[SSH] = None
        self.guest: Optional[Guest] = None

    @property
    def qmp(self):
        return self.machine.qmp

    @property
    def console(self):
        return self.machine.console

    @property
    def spec(self) -> VMSpec:
        return self.machine.spec

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
        self.machine.launch()
        if self.want_ssh:
            self.ssh = SSH("127.0.0.1", self.machine.spec.ssh_port, self.image.ssh_key, self.image.host_key_pub)
            self.ssh.connect(timeout=SSH_READY_S, alive=lambda: self.machine.alive)
            self.machine.times["ssh"] = time.monotonic()
        self.guest = Guest(self.machine, self.ssh)
        return self

    def close(self) -> None:
        try:
            if self.guest is not None and self.machine.alive:
                self.save_dmesg()
        except Exception:
            pass
        try:
            if self.ssh is not None:
                self.ssh.close()
        finally:
            self.machine.shutdown()

    def save_dmesg(self) -> None:
        try:
            if not self.machine.guest_running():  # paused or panicked: it cannot answer
                raise InfraError("the guest is not running (paused or panicked)")
            text = self.guest.run("dmesg", timeout=15).stdout
        except Exception as e:  # a dead or wedged guest: say so in the artifact
            text = f"(dmesg unavailable: {e})\n"
        (self.log_dir / "dmesg.txt").write_text(text)

    def run(self, cmd: str, timeout: float = 60.0, check: bool = False) -> CommandResult:
        return self.guest.run(cmd, timeout=timeout, check=check)
