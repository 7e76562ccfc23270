"""The QEMU command line: one pure function from (GuestConfig, Runtime) to argv.

GuestConfig is what a scenario asks for (memory geometry, the memmap_on_memory value, NUMA,
cpus, kernel arguments): frozen, validated when built, hashable, so shared guests are keyed
by it. Runtime is what Machine supplies when it launches QEMU (the kernel and initrd files,
the private run folder and its sockets, the SSH port, the resolved accelerator).

Nothing here touches the host. `memhp boot --dry-run` prints the argv, and every run saves
it as argv.txt, so anyone can reproduce a run by hand.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from harness.errors import UsageError

MiB = 1024 * 1024
GiB = 1024 * MiB

ACCELS = ("tcg", "kvm")
DEFAULT_STATES = ("offline", "online", "online_kernel", "online_movable")
QEMU_MAX_CPUS = 255      # -M pc (i440fx)
QEMU_MAX_SLOTS = 256     # ACPI_MAX_RAM_SLOTS
QEMU_MAX_NODES = 128     # MAX_NODES
CMDLINE_MAX = 2048       # x86 COMMAND_LINE_SIZE; QEMU refuses a longer -append for bzImages
# virtio-mem (QEMU 7.2 hw/virtio/virtio-mem.c): virtio_mem_set_block_size() refuses a block-size
# below VIRTIO_MEM_MIN_BLOCK_SIZE (1 MiB) or not a power of two; realize refuses one below the
# backend's page size (4 KiB for memory-backend-ram, so the 1 MiB floor decides) and a backend
# size or requested-size that is not a multiple of it. The default block size is the host's THP
# size (2 MiB on x86_64); a smaller one only warns.
VIRTIO_MEM_MIN_BLOCK_KB = 1024
BACKEND_PAGE_KB = 4
VIRTIO_MEM_ID = "vmem0"
VIRTIO_MEM_MEMDEV = "vmem0m"
# kstrtobool (y/Y/1/t/T, n/N/0/f/F, on/off, by first letters) plus "force"; one word, so it can
# never bring a second parameter onto the kernel command line.
_MEMMAP_RE = re.compile(r"^(force|[yYnN01tTfF][A-Za-z0-9]*|[oO][nNfF][A-Za-z0-9]*)$")
# The kernel splits its command line on whitespace and treats '"' as quoting; NUL and other
# control characters end or corrupt it.
_BAD_ARG_RE = re.compile(r'[\s"\x00-\x1f\x7f]')


class GuestConfigError(UsageError, ValueError):
    """A guest configuration QEMU or the kernel would refuse, or that cannot make sense."""


@dataclass(frozen=True)
class GuestConfig:
    """The boot-time configuration of one guest. Sizes are in MiB. Valid once constructed."""

    mem_mb: int = 1024
    slots: int = 4
    maxmem_mb: int = 8192
    cpus: int = 2
    numa_nodes: int = 1                    # >1: node 0 holds boot RAM, the others start memory-less
    memmap_on_memory: Optional[str] = "1"  # memory_hotplug.memmap_on_memory=...; None omits it
    default_state: Optional[str] = "offline"  # memhp_default_state=...; None omits it
    extra_cmdline: Tuple[str, ...] = ()
    pvpanic: bool = True
    # One virtio-mem-pci device when virtio_mem_mb > 0: a memory-backend-ram of that size, plugged
    # into the guest up to virtio_mem_requested_mb, in virtio_mem_block_kb units, on node virtio_mem_node.
    virtio_mem_mb: int = 0
    virtio_mem_node: int = 0
    virtio_mem_block_kb: int = 2048
    virtio_mem_requested_mb: int = 0

    def __post_init__(self) -> None:
        # Accept any sequence of strings for extra_cmdline but store a tuple: the config is hashed.
        object.__setattr__(self, "extra_cmdline", tuple(self.extra_cmdline))
        self._validate()

    def _validate(self) -> None:
        for name in ("mem_mb", "slots", "maxmem_mb", "cpus", "numa_nodes", "virtio_mem_mb", "virtio_mem_node",
                     "virtio_mem_block_kb", "virtio_mem_requested_mb"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise GuestConfigError(f"{name} must be an integer, not {v!r}")
        if self.mem_mb <= 0 or self.mem_mb % 2:
            raise GuestConfigError(f"base memory must be a positive even number of MiB, not {self.mem_mb}")
        if self.maxmem_mb < self.mem_mb:
            raise GuestConfigError(f"maxmem ({self.maxmem_mb} MiB) is below the base memory ({self.mem_mb} MiB)")
        if not 0 <= self.slots <= QEMU_MAX_SLOTS:
            raise GuestConfigError(f"slots must be 0..{QEMU_MAX_SLOTS}, not {self.slots}")
        if self.slots and self.maxmem_mb == self.mem_mb:
            # QEMU: "memory slots were specified but maximum memory size ... is equal to the initial"
            raise GuestConfigError(f"maxmem ({self.maxmem_mb} MiB) must exceed the base memory when there "
                                   f"are hotplug slots ({self.slots})")
        if not 1 <= self.cpus <= QEMU_MAX_CPUS:
            raise GuestConfigError(f"cpus must be 1..{QEMU_MAX_CPUS}, not {self.cpus}")
        if not 1 <= self.numa_nodes <= QEMU_MAX_NODES:
            raise GuestConfigError(f"numa_nodes must be 1..{QEMU_MAX_NODES}, not {self.numa_nodes}")
        self._validate_virtio_mem()
        if self.default_state is not None and self.default_state not in DEFAULT_STATES:
            raise GuestConfigError(f"memhp_default_state must be one of {', '.join(DEFAULT_STATES)}, "
                                   f"not {self.default_state!r}")
        if self.memmap_on_memory is not None and (not isinstance(self.memmap_on_memory, str)
                                                  or not _MEMMAP_RE.match(self.memmap_on_memory)):
            raise GuestConfigError(f"memmap_on_memory must be a value the kernel parses (1/0, y/n, "
                                   f"on/off, force), not {self.memmap_on_memory!r}")
        for a in self.extra_cmdline:
            if not isinstance(a, str) or _BAD_ARG_RE.search(a):
                raise GuestConfigError(f"kernel argument {a!r} must be one word without quotes or "
                                       f"control characters")
        if len(self.cmdline()) >= CMDLINE_MAX:
            raise GuestConfigError(f"kernel command line is {len(self.cmdline())} bytes; "
                                   f"the limit is {CMDLINE_MAX - 1}")

    def _validate_virtio_mem(self) -> None:
        size, bkb, req = self.virtio_mem_mb, self.virtio_mem_block_kb, self.virtio_mem_requested_mb
        if size < 0 or req < 0:
            raise GuestConfigError(f"virtio-mem sizes must not be negative, not {size} / {req} MiB")
        if size == 0:
            if req:
                raise GuestConfigError(f"virtio-mem requested-size {req} MiB without a virtio-mem device")
            return
        if bkb < BACKEND_PAGE_KB or bkb < VIRTIO_MEM_MIN_BLOCK_KB:
            raise GuestConfigError(f"virtio-mem block-size {bkb} KiB is below QEMU's minimum of 1 MiB "
                                   f"(VIRTIO_MEM_MIN_BLOCK_SIZE; the backend page size is {BACKEND_PAGE_KB} KiB)")
        if bkb & (bkb - 1):
            raise GuestConfigError(f"virtio-mem block-size {bkb} KiB is not a power of two (QEMU refuses it)")
        if (size * 1024) % bkb:
            raise GuestConfigError(f"virtio-mem size {size} MiB is not a multiple of its block-size {bkb} KiB "
                                   f"(QEMU: backend memory size must be a multiple of the block size)")
        if req > size or (req * 1024) % bkb:
            raise GuestConfigError(f"virtio-mem requested-size {req} MiB must be a multiple of the block-size "
                                   f"{bkb} KiB and at most the device size {size} MiB")
        if size > self.maxmem_mb - self.mem_mb:
            raise GuestConfigError(f"virtio-mem size {size} MiB does not fit under maxmem {self.maxmem_mb} MiB "
                                   f"with {self.mem_mb} MiB of base memory ({self.maxmem_mb - self.mem_mb} MiB free)")
        if not 0 <= self.virtio_mem_node < self.numa_nodes:
            raise GuestConfigError(f"virtio-mem node {self.virtio_mem_node}: the machine has nodes "
                                   f"0..{self.numa_nodes - 1}")

    def cmdline(self) -> str:
        # panic=-1: reboot at once, which -no-reboot turns into a QEMU exit; pvpanic pauses first.
        parts = ["console=ttyS0", "panic=-1", "printk.time=1"]
        if self.default_state is not None:
            parts.append(f"memhp_default_state={self.default_state}")
        if self.memmap_on_memory is not None:
            parts.append(f"memory_hotplug.memmap_on_memory={self.memmap_on_memory}")
        parts.extend(self.extra_cmdline)
        return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class Runtime:
    """What Machine supplies at launch: files, the private run folder, ports, the accelerator."""

    kernel: Path
    initrd: Path
    run_dir: Path                          # private 0700 folder holding the sockets
    ssh_port: int                          # host port forwarded to guest :22 on 127.0.0.1
    accel: str = "tcg"                     # resolved: "tcg" or "kvm" (machine.py resolves "auto")
    qemu: str = "qemu-system-x86_64"
    bios: Optional[Path] = None            # firmware other than QEMU's default SeaBIOS (e.g. qboot.rom)
    debugcon: Optional[Path] = None        # file for the firmware's debug port 0x402 (memhp bench)
    cpu: Optional[str] = None              # -cpu model; None: the accelerator's default (cpu_model)

    def __post_init__(self) -> None:
        if self.accel not in ACCELS:
            raise ValueError(f"accel must be one of {', '.join(ACCELS)}, not {self.accel!r}")
        if not 0 < self.ssh_port < 65536:
            raise ValueError(f"ssh_port must be 1..65535, not {self.ssh_port}")

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"


def cpu_model(accel: str) -> str:
    """The default -cpu: the host's CPU under KVM; under TCG "max", every feature TCG emulates."""
    return "max" if accel == "tcg" else "host"


def build_argv(config: GuestConfig, rt: Runtime) -> list:
    """QEMU's argv for this guest configuration and runtime. Pure: same inputs, same argv."""
    argv = [rt.qemu,
            "-M", "pc",
            # Multi-threaded TCG races the kernel's int3-based text patching (static keys):
            # seen as "Oops: int3" at sched_clock_cpu on 6.12. One TCG thread avoids it.
            "-accel", "tcg,thread=single" if rt.accel == "tcg" else rt.accel,
            "-cpu", rt.cpu or cpu_model(rt.accel),
            "-smp", str(config.cpus),
            "-m", f"{config.mem_mb}M,slots={config.slots},maxmem={config.maxmem_mb}M",
            "-kernel", str(rt.kernel),
            "-initrd", str(rt.initrd),
            "-append", config.cmdline(),
            "-display", "none",
            "-vga", "none",
            "-nodefaults",
            "-no-reboot",
            # Start paused: console and QMP attach before the first instruction, so no byte is lost.
            "-S",
            "-chardev", f"socket,id=con0,path={rt.console_socket},server=on,wait=off",
            "-serial", "chardev:con0",
            "-chardev", f"socket,id=qmp0,path={rt.qmp_socket},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            # Loopback only, and restrict=on keeps the guest off every host network.
            "-nic", f"user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{rt.ssh_port}-:22",
            ]
    if rt.bios is not None:
        argv += ["-bios", str(rt.bios)]
    if rt.debugcon is not None:
        # SeaBIOS writes its log to port 0x402 under QEMU (the debugcon default is 0xe9).
        argv += ["-debugcon", f"file:{rt.debugcon}", "-global", "isa-debugcon.iobase=0x402"]
    if config.numa_nodes > 1:
        argv += ["-object", f"memory-backend-ram,id=ram-node0,size={config.mem_mb}M",
                 "-numa", "node,nodeid=0,memdev=ram-node0"]
        for n in range(1, config.numa_nodes):
            argv += ["-numa", f"node,nodeid={n}"]
    if config.virtio_mem_mb:
        # No prealloc and no share: the device discards unplugged blocks itself (FORMATS.md).
        argv += ["-object", f"memory-backend-ram,id={VIRTIO_MEM_MEMDEV},size={config.virtio_mem_mb}M",
                 "-device", f"virtio-mem-pci,id={VIRTIO_MEM_ID},memdev={VIRTIO_MEM_MEMDEV},"
                            f"node={config.virtio_mem_node},block-size={config.virtio_mem_block_kb}K,"
                            f"requested-size={config.virtio_mem_requested_mb}M"]
    if config.pvpanic:
        argv += ["-device", "pvpanic", "-action", "panic=pause"]
    return argv


def format_argv(argv: Sequence[str]) -> str:
    """A shell-pasteable rendering of argv."""
    return " ".join(shlex.quote(a) for a in argv)
