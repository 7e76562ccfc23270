"""Kernel modules: .modinfo parsing, modules.builtin, and the load-order closure the guest needs."""
from __future__ import annotations

import lzma
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set

# What the guest image loads when a kernel has them as modules (absent or built-in ones are skipped).
GUEST_MODULES = ("virtio_pci", "virtio_net", "virtio_mem", "pvpanic_mmio")


def normalise(name: str) -> str:
    """Module name from a name or file name: 'kernel/x/virtio-pci.ko.xz' -> 'virtio_pci'."""
    base = name.rsplit("/", 1)[-1]
    for suffix in (".xz", ".zst", ".gz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if base.endswith(".ko"):
        base = base[:-3]
    return base.replace("-", "_")


def _modinfo_section(data: bytes) -> Optional[bytes]:
    """The raw .modinfo section, found through the ELF section headers; None if unreadable."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        return None
    is64 = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    try:
        if is64:
            shoff, = struct.unpack_from(end + "Q", data, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)
        else:
            shoff, = struct.unpack_from(end + "I", data, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x2E)
        if shentsize < (64 if is64 else 40) or shnum == 0 or shstrndx >= shnum:
            return None

        def section(i: int):
            off = shoff + i * shentsize
            if is64:
                name, _t, _f, _a, s_off, s_size = struct.unpack_from(end + "IIQQQQ", data, off)
            else:
                name, _t, _f, _a, s_off, s_size = struct.unpack_from(end + "IIIIII", data, off)
            return name, s_off, s_size

        _, str_off, str_size = section(shstrndx)
        names = data[str_off:str_off + str_size]
        for i in range(shnum):
            name_off, s_off, s_size = section(i)
            nend = names.find(b"\0", name_off)
            if names[name_off:nend if nend != -1 else None] == b".modinfo":
                return data[s_off:s_off + s_size]
    except struct.error:
        return None
    return None


def parse_modinfo(ko_bytes: bytes) -> Dict[str, List[str]]:
    """The key=value strings of a module's .modinfo, e.g. {'depends': ['failover'], 'name': [...]}.

    Accepts plain or xz-compressed .ko bytes. Never raises: unreadable input gives {}.
    """
    data = bytes(ko_bytes or b"")
    if data[:6] == b"\xfd7zXZ\x00":
        try:
            data = lzma.decompress(data)
        except lzma.LZMAError:
            return {}
    section = _modinfo_section(data)
    if section is None:
        return {}
    info: Dict[str, List[str]] = {}
    for raw in section.split(b"\0"):
        key, sep, value = raw.partition(b"=")
        if not sep or not key:
            continue
        info.setdefault(key.decode("ascii", "replace"), []).append(value.decode("utf-8", "replace"))
    return info


def depends(ko_bytes: bytes) -> List[str]:
    out: List[str] = []
    for v in parse_modinfo(ko_bytes).get("depends", []):
        out += [normalise(d) for d in v.split(",") if d.strip()]
    return out


def builtin_modules(modules_dir: Path) -> Set[str]:
    path = Path(modules_dir) / "modules.builtin"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return set()
    return {normalise(ln.strip()) for ln in text.splitlines() if ln.strip()}


def index(modules_dir: Path) -> Dict[str, Path]:
    """Normalised module name -> .ko path, for every .ko under modules_dir."""
    out: Dict[str, Path] = {}
    for ko in sorted(Path(modules_dir).rglob("*.ko")):
        out.setdefault(normalise(ko.name), ko)
    return out


def closure(modules_dir: Path, wanted: Sequence[str] = GUEST_MODULES) -> List[Path]:
    """The .ko files to insmod for `wanted`, dependencies first.

    Built-in and absent modules are skipped (a wanted module the kernel lacks is not an error here:
    the scenario that needs it says so).
    """
    if modules_dir is None or not Path(modules_dir).is_dir():
        return []
    builtin = builtin_modules(modules_dir)
    files = index(modules_dir)
    order: List[Path] = []
    done: Set[str] = set()

    def visit(name: str, stack: tuple) -> None:
        if name in done or name in stack or name in builtin or name not in files:
            return
        ko = files[name]
        try:
            deps = depends(ko.read_bytes())
        except OSError:
            deps = []
        for dep in deps:
            visit(dep, stack + (name,))
        done.add(name)
        order.append(ko)

    for w in wanted:
        visit(normalise(w), ())
    return order
