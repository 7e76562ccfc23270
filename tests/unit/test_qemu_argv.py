"""(GuestConfig, Runtime) -> argv: frozen golden files plus the properties that must hold for
any configuration, and GuestConfig's validation (one-line ValueErrors naming the field).

Golden files live in tests/data/argv/<name>.golden, one argv element per line. After an
intended change to the command line, regenerate them and review the diff:

    MEMHP_REGEN_GOLDEN=1 .venv/bin/pytest tests/unit/test_qemu_argv.py
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path

import pytest

from harness.vm.qemu_argv import GuestConfig, GuestConfigError, Runtime, build_argv, format_argv

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "argv"
REGEN = os.environ.get("MEMHP_REGEN_GOLDEN") == "1"


RUNTIME_FIELDS = ("kernel", "initrd", "run_dir", "ssh_port", "accel", "qemu")


def spec(**kw):
    """(GuestConfig, Runtime) from one set of keywords, split by field."""
    base = dict(kernel=Path("/memhp/kernel/bzImage"), initrd=Path("/memhp/image/initramfs.cpio.gz"),
                run_dir=Path("/tmp/memhp-golden"), ssh_port=10022)
    base.update(kw)
    rt = Runtime(**{k: v for k, v in base.items() if k in RUNTIME_FIELDS})
    return GuestConfig(**{k: v for k, v in base.items() if k not in RUNTIME_FIELDS}), rt


CASES = {
    "default": spec(),
    "memmap-off-online-movable": spec(memmap_on_memory="0", default_state="online_movable"),
    "numa3-force-extra": spec(numa_nodes=3, memmap_on_memory="force", mem_mb=2048, maxmem_mb=16384,
                              slots=8, cpus=1, extra_cmdline=("loglevel=8", "memhp.debug=1")),
    "kvm-no-params-no-pvpanic": spec(accel="kvm", memmap_on_memory=None, default_state=None, pvpanic=False),
    "virtio-mem-1G-2M": spec(virtio_mem_mb=1024, virtio_mem_requested_mb=256, default_state="online_movable"),
    "virtio-mem-numa2-node1-128M": spec(numa_nodes=2, virtio_mem_mb=512, virtio_mem_node=1,
                                        virtio_mem_block_kb=128 * 1024, slots=0),
}


def argv_of(name: str) -> list:
    return build_argv(*CASES[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    path = GOLDEN / f"{name}.golden"
    got = "\n".join(argv_of(name)) + "\n"
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"{path} is missing: run MEMHP_REGEN_GOLDEN=1 pytest {__file__}"
    want = path.read_text()
    assert got == want, (f"argv for {name!r} differs from {path}; if the change is intended, "
                         f"regenerate with MEMHP_REGEN_GOLDEN=1 and review the diff")


def test_every_golden_file_has_a_case():
    stale = sorted(p.stem for p in GOLDEN.glob("*.golden") if p.stem not in CASES)
    assert not stale, f"golden files without a case (delete them): {stale}"


def test_pure_and_deterministic():
    c, rt = spec(numa_nodes=2)
    assert build_argv(c, rt) == build_argv(c, rt)
    assert build_argv(c, rt) == build_argv(dataclasses.replace(c), dataclasses.replace(rt))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.mem_mb = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rt.ssh_port = 1  # type: ignore[misc]


def test_config_is_hashable_and_equal_by_value():
    """Shared guests are keyed by the configuration itself."""
    a = GuestConfig(memmap_on_memory="0", extra_cmdline=["a=1"])   # a list is stored as a tuple
    b = GuestConfig(memmap_on_memory="0", extra_cmdline=("a=1",))
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a.extra_cmdline == ("a=1",)
    assert GuestConfig() != GuestConfig(memmap_on_memory="0")


def _opt_values(argv, opt):
    return [argv[i + 1] for i, a in enumerate(argv) if a == opt]


def test_nic_is_loopback_only_and_restricted():
    argv = build_argv(*spec(ssh_port=45678))
    (nic,) = _opt_values(argv, "-nic")
    fields = nic.split(",")
    assert "restrict=on" in fields
    fwd = [f for f in fields if f.startswith("hostfwd=")]
    assert fwd == ["hostfwd=tcp:127.0.0.1:45678-:22"], nic
    assert "-netdev" not in argv and "-net" not in argv   # no second, unrestricted network


def test_no_reboot_paused_start_and_sockets_in_run_dir():
    c, s = spec(run_dir=Path("/tmp/memhp-xyz"))
    argv = build_argv(c, s)
    assert "-no-reboot" in argv and "-S" in argv and "-nodefaults" in argv
    chardevs = _opt_values(argv, "-chardev")
    assert any(f"path={s.console_socket}," in c for c in chardevs)
    assert any(f"path={s.qmp_socket}," in c for c in chardevs)
    assert all(c.startswith("socket,") and "path=/tmp/memhp-xyz/" in c for c in chardevs)
    assert _opt_values(argv, "-mon") == ["chardev=qmp0,mode=control"]


def test_kernel_initrd_and_memory_geometry():
    c, s = spec(mem_mb=1536, slots=6, maxmem_mb=4096)
    argv = build_argv(c, s)
    assert _opt_values(argv, "-kernel") == [str(s.kernel)]
    assert _opt_values(argv, "-initrd") == [str(s.initrd)]
    assert _opt_values(argv, "-m") == ["1536M,slots=6,maxmem=4096M"]
    assert argv[0] == "qemu-system-x86_64"


@pytest.mark.parametrize("mom,state", [("1", "offline"), ("0", "online_movable"), ("force", "online"),
                                       ("1", "online_kernel")])
def test_cmdline_carries_hotplug_parameters(mom, state):
    argv = build_argv(*spec(memmap_on_memory=mom, default_state=state))
    (append,) = _opt_values(argv, "-append")
    words = append.split()
    assert f"memhp_default_state={state}" in words
    assert f"memory_hotplug.memmap_on_memory={mom}" in words
    assert "console=ttyS0" in words and "panic=-1" in words


def test_cmdline_omits_parameters_set_to_none_and_keeps_extras_in_order():
    append = _opt_values(build_argv(*spec(memmap_on_memory=None, default_state=None,
                                          extra_cmdline=("a=1", "", "b=2"))), "-append")[0]
    assert "memhp_default_state" not in append and "memmap_on_memory" not in append
    assert append.endswith(" a=1 b=2")


def test_numa_only_when_more_than_one_node():
    assert "-numa" not in build_argv(*spec(numa_nodes=1))
    argv = build_argv(*spec(numa_nodes=3, mem_mb=2048))
    assert _opt_values(argv, "-numa") == ["node,nodeid=0,memdev=ram-node0", "node,nodeid=1", "node,nodeid=2"]
    # Boot RAM moves to node 0's backend, sized like -m.
    assert "memory-backend-ram,id=ram-node0,size=2048M" in _opt_values(argv, "-object")


def test_pvpanic_pauses_on_panic():
    argv = build_argv(*spec())
    assert "pvpanic" in _opt_values(argv, "-device")
    assert "panic=pause" in _opt_values(argv, "-action")
    off = build_argv(*spec(pvpanic=False))
    assert "pvpanic" not in _opt_values(off, "-device") and "-action" not in off


def test_accel_and_cpu_model():
    assert _opt_values(build_argv(*spec(accel="tcg")), "-cpu") == ["max"]
    assert _opt_values(build_argv(*spec(accel="kvm")), "-cpu") == ["host"]
    # single-threaded TCG: MTTCG races the kernel's int3 text patching (Oops at sched_clock_cpu)
    assert _opt_values(build_argv(*spec(accel="tcg")), "-accel") == ["tcg,thread=single"]
    assert _opt_values(build_argv(*spec(accel="kvm")), "-accel") == ["kvm"]


@pytest.mark.parametrize("kw,words", [
    (dict(accel="auto"), "accel"), (dict(accel="hvf"), "accel"),
    (dict(mem_mb=0), "base memory"), (dict(mem_mb=1023), "base memory"), (dict(mem_mb="1024"), "mem_mb"),
    (dict(maxmem_mb=512), "maxmem"), (dict(maxmem_mb=1024), "maxmem"), (dict(slots=257), "slots"), (dict(slots=-1), "slots"),
    (dict(cpus=0), "cpus"), (dict(cpus=256), "cpus"), (dict(cpus=True), "cpus"),
    (dict(numa_nodes=0), "numa_nodes"), (dict(numa_nodes=129), "numa_nodes"),
    (dict(default_state="movable"), "memhp_default_state"),
    (dict(memmap_on_memory="1 init=/bin/sh"), "memmap_on_memory"), (dict(memmap_on_memory=""), "memmap_on_memory"),
    (dict(memmap_on_memory="maybe"), "memmap_on_memory"), (dict(memmap_on_memory=1), "memmap_on_memory"),
    (dict(extra_cmdline=("a b",)), "kernel argument"), (dict(extra_cmdline=('x="y',)), "kernel argument"),
    (dict(extra_cmdline=("a\nb",)), "kernel argument"), (dict(extra_cmdline=("x" * 2100,)), "command line"),
    (dict(ssh_port=0), "ssh_port"), (dict(ssh_port=70000), "ssh_port"),
    (dict(virtio_mem_mb=1023), "not a multiple of its block-size"),
    (dict(virtio_mem_mb=1024, virtio_mem_block_kb=3072), "not a power of two"),
    (dict(virtio_mem_mb=1024, virtio_mem_block_kb=512), "below QEMU's minimum of 1 MiB"),
    (dict(virtio_mem_mb=1024, virtio_mem_block_kb=2), "below QEMU's minimum of 1 MiB"),
    (dict(virtio_mem_mb=8192), "does not fit under maxmem"),
    (dict(virtio_mem_mb=1024, virtio_mem_requested_mb=2048), "requested-size"),
    (dict(virtio_mem_mb=1024, virtio_mem_requested_mb=3, virtio_mem_block_kb=2048), "requested-size"),
    (dict(virtio_mem_requested_mb=2), "without a virtio-mem device"),
    (dict(virtio_mem_mb=1024, virtio_mem_node=1), "virtio-mem node 1"),
    (dict(virtio_mem_mb=-2), "must not be negative"),
])
def test_invalid_specs_are_refused_with_the_field_named(kw, words):
    with pytest.raises(ValueError, match=words) as e:
        spec(**kw)
    assert "\n" not in str(e.value), "one-line messages"
    if set(kw) & {"accel", "ssh_port"}:
        return
    assert isinstance(e.value, GuestConfigError)   # ValueError and UsageError: the CLI's exit 2


@pytest.mark.parametrize("value", ["1", "0", "y", "n", "Y", "N", "on", "off", "force", "yes", "true", "false"])
def test_memmap_values_the_kernel_parses_are_accepted(value):
    assert f"memory_hotplug.memmap_on_memory={value}" in GuestConfig(memmap_on_memory=value).cmdline().split()


def test_no_slots_no_hotplug_space_needed():
    """QEMU takes -m 1024M,slots=0,maxmem=1024M (no hotplug at all); only slots>0 needs room."""
    assert "1024M,slots=0,maxmem=1024M" in build_argv(*spec(slots=0, maxmem_mb=1024))


def test_format_argv_round_trips_through_the_shell():
    c, s = spec(kernel=Path("/a dir/vmlinuz-6.12.117+deb12"), extra_cmdline=("x='y'", "a=$HOME"))
    argv = build_argv(c, s)
    assert shlex.split(format_argv(argv)) == argv


def test_virtio_mem_device_and_backend():
    """One backend (RAM, no prealloc) and one virtio-mem-pci naming it; maxmem stays as given."""
    argv = build_argv(*spec(virtio_mem_mb=1024, virtio_mem_requested_mb=256))
    assert "memory-backend-ram,id=vmem0m,size=1024M" in _opt_values(argv, "-object")
    assert ("virtio-mem-pci,id=vmem0,memdev=vmem0m,node=0,block-size=2048K,requested-size=256M"
            in _opt_values(argv, "-device"))
    assert not any("virtio-mem" in d for d in _opt_values(build_argv(*spec()), "-device"))


@pytest.mark.parametrize("mb,bkb", [(1024, 1024), (1024, 2048), (1024, 131072), (7168, 2048), (2, 2048)])
def test_virtio_mem_sizes_qemu_takes_are_accepted(mb, bkb):
    GuestConfig(virtio_mem_mb=mb, virtio_mem_block_kb=bkb, virtio_mem_requested_mb=0)
