"""harness.kernels.modules: .modinfo parsing, modules.builtin, load-order closure."""
from __future__ import annotations

import lzma
import struct
from pathlib import Path
from typing import Dict, Sequence

import pytest

from harness.kernels import kernel, modules

DATA = Path(__file__).resolve().parent.parent / "data" / "kernel"


def make_ko(info: Dict[str, Sequence[str]]) -> bytes:
    """A minimal ELF64 relocatable with a .modinfo and a .shstrtab section."""
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, vs in info.items() for v in vs)
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    modinfo_off = 64
    shstr_off = modinfo_off + len(modinfo)
    shoff = (shstr_off + len(shstrtab) + 7) & ~7
    ehdr = bytearray(64)
    ehdr[:4] = b"\x7fELF"
    ehdr[4], ehdr[5], ehdr[6] = 2, 1, 1
    struct.pack_into("<HHI", ehdr, 16, 1, 62, 1)
    struct.pack_into("<Q", ehdr, 0x28, shoff)
    struct.pack_into("<HHHHHH", ehdr, 0x34, 64, 0, 0, 64, 3, 2)

    def sh(name, typ, off, size):
        return struct.pack("<IIQQQQIIQQ", name, typ, 0, 0, off, size, 0, 0, 1, 0)
    body = bytes(ehdr) + modinfo + shstrtab
    body += b"\0" * (shoff - len(body))
    return body + sh(0, 0, 0, 0) + sh(1, 1, modinfo_off, len(modinfo)) + sh(10, 3, shstr_off, len(shstrtab))


def test_parse_modinfo_real_debian_modules():
    fo = modules.parse_modinfo((DATA / "failover-6.1.0-56.ko").read_bytes())
    assert fo["name"] == ["failover"]
    assert fo["depends"] == [""]
    assert fo["vermagic"][0].startswith("6.1.0-56-cloud-amd64 ")
    nf = (DATA / "net_failover-6.1.0-56.ko").read_bytes()
    assert modules.parse_modinfo(nf)["name"] == ["net_failover"]
    assert modules.depends(nf) == ["failover"]
    assert modules.depends(lzma.compress(nf, format=lzma.FORMAT_XZ)) == ["failover"]


def test_parse_modinfo_synthetic_multi_values():
    ko = make_ko({"name": ["a"], "alias": ["pci:v1", "pci:v2"], "depends": ["b,c-d"]})
    info = modules.parse_modinfo(ko)
    assert info == {"name": ["a"], "alias": ["pci:v1", "pci:v2"], "depends": ["b,c-d"]}
    assert modules.depends(ko) == ["b", "c_d"]


@pytest.mark.parametrize("junk", [b"", b"\x7fELF", b"garbage" * 100, b"\xfd7zXZ\x00broken",
                                  None])
def test_parse_modinfo_never_crashes(junk):
    assert modules.parse_modinfo(junk) == {}


def test_parse_modinfo_truncated_real_module():
    data = (DATA / "net_failover-6.1.0-56.ko").read_bytes()
    for cut in (64, 200, len(data) // 2, len(data) - 10):
        assert isinstance(modules.parse_modinfo(data[:cut]), dict)


def test_builtin_names_are_normalised(tmp_path):
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio-pci.ko\nkernel/net/core/failover.ko\n")
    assert modules.builtin_modules(tmp_path) == {"virtio_pci", "failover"}
    assert modules.builtin_modules(tmp_path / "missing") == set()


def _moddir(tmp_path: Path) -> Path:
    d = tmp_path / "lib/modules/6.1.0-test"
    (d / "kernel/x").mkdir(parents=True)
    mods = {"top": "mid,base", "mid": "base", "base": "", "in-kernel": "", "leaf": "in_kernel", "cyc-a": "cyc_b",
            "cyc_b": "cyc_a"}
    for name, deps in mods.items():
        (d / "kernel/x" / f"{name}.ko").write_bytes(make_ko({"name": [name.replace("-", "_")], "depends": [deps]}))
    (d / "modules.builtin").write_text("kernel/x/in-kernel.ko\n")
    return d


def test_closure_orders_dependencies_first_and_skips_builtin_and_absent(tmp_path):
    d = _moddir(tmp_path)
    got = [p.name for p in modules.closure(d, ["top", "virtio_mem", "leaf", "in_kernel", "mid"])]
    assert got == ["base.ko", "mid.ko", "top.ko", "leaf.ko"]


def test_closure_survives_cycles_and_missing_dir(tmp_path):
    d = _moddir(tmp_path)
    assert sorted(p.name for p in modules.closure(d, ["cyc_a"])) == ["cyc-a.ko", "cyc_b.ko"]
    assert modules.closure(tmp_path / "nothing", ["top"]) == []


@pytest.mark.parametrize("spec,expect_first,builtin_pci", [
    ("debian:6.1", ["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio", "virtio_pci"], False),
    ("debian:6.12", [], True),
])
def test_closure_on_real_debian_kernels(spec, expect_first, builtin_pci):
    art = kernel.resolve(spec)
    names = [modules.normalise(p.name) for p in modules.closure(art.modules)]
    assert ("virtio_pci" in modules.builtin_modules(art.modules)) == builtin_pci
    assert names[:len(expect_first)] == expect_first
    assert names[len(expect_first):] == ["failover", "net_failover", "virtio_net", "virtio_mem", "pvpanic",
                                         "pvpanic_mmio"]
