"""The QEMU command line: one pure function from a frozen VMSpec to argv.

Nothing here touches the host. `memhp boot --dry-run` prints build_argv(spec), and every
run saves it as argv.txt, so anyone can reproduce a run by hand.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple

MiB = 1024 * 1024
GiB = 1024 * MiB

ACCELS = ("tcg", "kvm")
DEFAULT_STATES = ("offline", "online", "online_kernel", "online_movable")
MEMMAP_VALUES = ("1", "0", "y", "n", "Y", "N", "on", "off", "force")


@dataclass(frozen=True)
class VMSpec:
    """Everything that decides the QEMU command line. Sizes are in MiB."""

    kernel: Path
    initrd: Path
    run_dir: Path                         # private 0700 folder holding the sockets
    ssh_port: int                          # host port forwarded to guest :22 on 127.0.0.1
    accel: str = "tcg"                     # resolved: "tcg" or "kvm" ("auto" is resolved by machine.py)
    mem_mb: int = 1024
    slots: int = 4
    maxmem_mb: int = 8192
    cpus: int = 2
    numa_nodes: int = 1                    # >1: node 0 holds boot RAM, the others start memory-less
    memmap_on_memory: Optional[str] = "1"  # memory_hotplug.memmap_on_memory=...; None omits it
    default_state: Optional[str] = "offline"  # memhp_default_state=...; None omits it
    extra_cmdline: Tuple[str, ...] = ()
    pvpanic: bool = True
    qemu: str = "qemu-system-x86_64"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"

    def validate(self) -> None:
        """Raise ValueError on a spec QEMU would reject or that cannot make sense."""
        if self.accel not in ACCELS:
            raise ValueError(f"accel must be one of {', '.join(ACCELS)}, not {self.accel!r}")
        if self.mem_mb <= 0 or self.mem_mb % 2:
            raise ValueError(f"base memory must be a positive even number of MiB, not {self.mem_mb}")
        if self.maxmem_mb < self.mem_mb:
            raise ValueError(f"maxmem ({self.maxmem_mb} MiB) is below the base memory ({self.mem_mb} MiB)")
        if not 0 <= self.slots <= 256:
            raise ValueError(f"slots must be 0..256, not {self.slots}")
        if self.cpus < 1:
            raise ValueError("cpus must be at least 1")
        if self.numa_nodes < 1:
            raise ValueError("numa_nodes must be at least 1")
        if self.default_state is not None and self.default_state not in DEFAULT_STATES:
            raise ValueError(f"memhp_default_state must be one of {', '.join(DEFAULT_STATES)}, "
                             f"not {self.default_state!r}")
        if not 0 < self.ssh_port < 65536:
            raise ValueError(f"ssh_port must be 1..65535, not {self.ssh_port}")

    def cmdline(self) -> str:
        # panic=-1: reboot at once, which -no-reboot turns into a QEMU exit; pvpanic pauses first.
        parts = ["console=ttyS0", "panic=-1", "printk.time=1"]
        if self.default_state is not None:
            parts.append(f"memhp_default_state={self.default_state}")
        if self.memmap_on_memory is not None:
            parts.append(f"memory_hotplug.memmap_on_memory={self.memmap_on_memory}")
        parts.extend(self.extra_cmdline)
        return " ".join(p for p in parts if p)


def build_argv(spec: VMSpec) -> list:
    """Turn a VMSpec into QEMU's argv. Pure: same spec, same argv."""
    spec.validate()
    argv = [spec.qemu,
            "-M", "pc",
            # Multi-threaded TCG races the kernel's int3-based text patching (static keys):
            # seen as "Oops: int3" at sched_clock_cpu on 6.12. One TCG thread avoids it.
            "-accel", "tcg,thread=single" if spec.accel == "tcg" else spec.accel,
            "-cpu", "max" if spec.accel == "tcg" else "host",
            "-smp", str(spec.cpus),
            "-m", f"{spec.mem_mb}M,slots={spec.slots},maxmem={spec.maxmem_mb}M",
            "-kernel", str(spec.kernel),
            "-initrd", str(spec.initrd),
            "-append", spec.cmdline(),
            "-display", "none",
            "-vga", "none",
            "-nodefaults",
            "-no-reboot",
            # Start paused: console and QMP attach before the first instruction, so no byte is lost.
            "-S",
            "-chardev", f"socket,id=con0,path={spec.console_socket},server=on,wait=off",
            "-serial", "chardev:con0",
            "-chardev", f"socket,id=qmp0,path={spec.qmp_socket},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            # Loopback only, and restrict=on keeps the guest off every host network.
            "-nic", f"user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22",
            ]
    if spec.numa_nodes > 1:
        argv += ["-object", f"memory-backend-ram,id=ram-node0,size={spec.mem_mb}M",
                 "-numa", "node,nodeid=0,memdev=ram-node0"]
        for n in range(1, spec.numa_nodes):
            argv += ["-numa", f"node,nodeid={n}"]
    if spec.pvpanic:
        argv += ["-device", "pvpanic", "-action", "panic=pause"]
    return argv


def format_argv(argv: Sequence[str]) -> str:
    """A shell-pasteable rendering of argv."""
    return " ".join(shlex.quote(a) for a in argv)
