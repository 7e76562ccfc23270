"""The uncompressed vmlinux inside a bzImage, for QEMU's PVH entry (`-kernel vmlinux`).

A vmlinux with the Xen PHYS32_ENTRY ELF note (CONFIG_PVH) is started by QEMU's pvh.bin in
32-bit protected mode: no real-mode setup, no decompressor. This extracts it as the kernel's
scripts/extract-vmlinux does, but from the setup header's payload_offset/payload_length
instead of a magic-byte scan, and caches it under <cache>/pvh/<hash of the bzImage>/.
"""
from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Optional

from harness.cache import cache_root, ensure_dir, entry_lock, hash_inputs, is_complete, publish, scratch_dir
from harness.errors import KernelError

XEN_ELFNOTE_PHYS32_ENTRY = 18
# Payload magic -> a host decompressor reading stdin (None: Python's own).
_FORMATS = ((b"\x1f\x8b", "gzip", None), (b"\xfd7zXZ\x00", "xz", None), (b"\x5d\x00", "lzma", None),
            (b"\x28\xb5\x2f\xfd", "zstd", ["zstd", "-dcq"]), (b"\x02\x21\x4c\x18", "lz4", ["lz4", "-dcq"]),
            (b"BZh", "bzip2", ["bzip2", "-dc"]), (b"\x89LZO", "lzo", ["lzop", "-dc"]))


def payload(bzimage: bytes) -> bytes:
    """The compressed kernel inside a bzImage, without the 4-byte size the build appends."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise KernelError("not a bzImage (no HdrS setup header)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    data = bzimage[start:start + length]
    if len(data) != length or length < 8:
        raise KernelError("bzImage payload runs past the end of the file")
    return data


def decompress(data: bytes) -> bytes:
    """The payload unpacked. The last 4 bytes are the uncompressed length: the build's size_append
    after the stream, except for gzip, whose own trailer (ISIZE) ends with it and which the build
    leaves as gzip wrote it (scripts/Makefile.lib cmd_gzip)."""
    size = struct.unpack("<I", data[-4:])[0]
    fmt = next((f for f in _FORMATS if data.startswith(f[0])), None)
    if fmt is None:
        raise KernelError(f"unknown bzImage payload compression (magic {data[:6].hex()})")
    _, name, argv = fmt
    body = data if name == "gzip" else data[:-4]
    try:
        if name == "gzip":
            out = gzip.decompress(body)
        elif name in ("xz", "lzma"):
            out = lzma.decompress(body, format=lzma.FORMAT_XZ if name == "xz" else lzma.FORMAT_ALONE)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise KernelError(f"the bzImage's {name} payload does not unpack: {e}") from None
    if name not in ("gzip", "xz", "lzma"):
        if shutil.which(argv[0]) is None:
            raise KernelError(f"{argv[0]} not found: needed to unpack a {name} bzImage for the PVH entry")
        r = subprocess.run(argv, input=body, capture_output=True, timeout=300)
        out = r.stdout
    if len(out) != size:
        raise KernelError(f"{name} payload unpacked to {len(out)} bytes, the bzImage says {size}")
    return out


def has_pvh_note(elf: bytes) -> bool:
    """True if the ELF64 image carries XEN_ELFNOTE_PHYS32_ENTRY in a PT_NOTE segment."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:   # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def pvh_vmlinux(bzimage: Path, cache: Optional[Path] = None) -> Optional[Path]:
    """The cached PVH-bootable vmlinux of `bzimage`, or None when the kernel has no PVH entry."""
    digest = hash_inputs(["pvh-1", Path(bzimage)])
    out = (Path(cache) if cache else cache_root()) / "pvh" / digest
    if not is_complete(out):
        ensure_dir(out.parent)
        with entry_lock(out):
            if not is_complete(out):
                elf = decompress(payload(Path(bzimage).read_bytes()))
                with scratch_dir(out.parent, "pvh") as tmp:
                    if has_pvh_note(elf):
                        (tmp / "vmlinux").write_bytes(elf)
                    publish(tmp, out, digest)
    vmlinux = out / "vmlinux"
    return vmlinux if vmlinux.is_file() else None
