"""A kernel's vmlinux with debug info, and its tree's scripts/decode_stacktrace.sh.

The regression email decodes the console's splat (function+offset -> file:line) when a vmlinux
with DWARF is at hand, as the kernel's own reporting guides ask. Where one comes from:

  - beside the booted image or in the tree above it (a build folder, a kernel tree);
  - the distribution's usual places (/usr/lib/debug/boot/vmlinux-<release>, ...);
  - for Debian's kernels, linux-image-<release>-dbg (about 280 MB): fetch_debian() downloads it
    once (verified like every .deb), keeps only usr/lib/debug/boot/vmlinux-<release> in
    <cache>/debug/<release>/ and drops the .deb.

has_debug_info() reads the ELF section table itself (a .debug_info section), so a stripped
vmlinux (kbuild's, the PVH one extracted from a bzImage) is never taken.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from harness import host
from harness.cache import cache_root, ensure_dir, entry_lock, is_complete, publish, scratch_dir
from harness.errors import KernelError, PackageError

DECODE_SCRIPT = "scripts/decode_stacktrace.sh"
DECODE_TIMEOUT = 600.0          # nm and addr2line over a 600 MB vmlinux on a loaded host
_RELEASE = re.compile(r"^[\w.+~-]+$")


def has_debug_info(path: Path) -> bool:
    """True when path is a 64-bit little-endian ELF file with a non-empty .debug_info section."""
    try:
        with open(path, "rb") as f:
            ehdr = f.read(64)
            if len(ehdr) < 64 or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
                return False
            shoff, = struct.unpack_from("<Q", ehdr, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ehdr, 0x3A)
            if not shoff or shentsize < 64 or not 0 < shnum < 1 << 16 or shstrndx >= shnum:
                return False
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            if len(table) < shentsize * shnum:
                return False
            heads = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
            _, _, _, _, stroff, strsize = heads[shstrndx]
            f.seek(stroff)
            names = f.read(min(strsize, 1 << 20))
    except OSError:
        return False
    for name_off, _type, _flags, _addr, _off, size in heads:
        end = names.find(b"\0", name_off)
        if names[name_off:end if end >= 0 else None] == b".debug_info" and size > 0:
            return True
    return False


def debug_dir(release: str, cache: Optional[Path] = None) -> Path:
    return cache_root(cache) / "debug" / release


def candidates(image: Optional[Path], release: str, cache: Optional[Path] = None) -> List[Path]:
    """Where a vmlinux for this image may be, most specific first."""
    out: List[Path] = []
    if image is not None:
        d = Path(image).parent
        for up in [d, *list(d.parents)[:3]]:      # arch/x86/boot/bzImage -> the tree's vmlinux
            out += [up / "vmlinux"] + ([up / f"vmlinux-{release}"] if release else [])
    if release and _RELEASE.match(release):
        out += [debug_dir(release, cache) / f"vmlinux-{release}",
                Path(f"/usr/lib/debug/boot/vmlinux-{release}"), Path(f"/usr/lib/debug/lib/modules/{release}/vmlinux"),
                Path(f"/boot/vmlinux-{release}"), Path(f"/lib/modules/{release}/build/vmlinux")]
    return out


def find_vmlinux(image: Optional[Path], release: str, cache: Optional[Path] = None) -> Optional[Path]:
    """The first candidate that is a vmlinux with debug info; None when there is none."""
    return next((p for p in candidates(image, release, cache) if p.is_file() and has_debug_info(p)), None)


def debian_dbg_package(release: str) -> str:
    """Debian's debug package of a kernel release: linux-image-<release>-dbg."""
    if not _RELEASE.match(release or ""):
        raise KernelError(f"no Debian debug package for kernel release {release!r}")
    return f"linux-image-{release}-dbg"


def fetch_debian(release: str, cache: Optional[Path] = None) -> Path:
    """The vmlinux with debug info of Debian's kernel `release`, from linux-image-<release>-dbg
    (downloaded and verified once; only the vmlinux is kept)."""
    pkg = debian_dbg_package(release)
    dest = debug_dir(release, cache)
    target = dest / f"vmlinux-{release}"
    if is_complete(dest) and target.is_file():
        return target
    host.require_tools(f"extracting {pkg}", "apt-get", "apt-cache", "dpkg-deb", "tar")
    ver = host.apt_candidate(pkg)
    if ver is None:
        raise PackageError(f"apt has no candidate for {pkg}; run apt-get update (Debian ships it in main, "
                           f"and in bookworm-security for security updates)")
    debs = ensure_dir(cache_root(cache) / "debs")
    deb = host.fetch_deb(pkg, ver, debs)
    with entry_lock(dest):
        if not (is_complete(dest) and target.is_file()):
            with scratch_dir(dest.parent, "dbg") as tmp:
                member = f"./usr/lib/debug/boot/vmlinux-{release}"
                host.check(["bash", "-o", "pipefail", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" "$3"',
                            "_", deb, tmp, member], timeout=host.UNPACK_TIMEOUT, what=f"extracting {member} of {deb.name}")
                got = tmp / member
                if not (got.is_file() and has_debug_info(got)):
                    raise PackageError(f"{deb.name} holds no vmlinux with debug info at {member[1:]}")
                os.replace(got, tmp / target.name)
                shutil.rmtree(tmp / "usr")
                publish(tmp, dest, stamp=f"{pkg}={ver}")
    deb.unlink(missing_ok=True)          # 280 MB; the vmlinux is what is kept
    return target


def decode_script(sources: Iterable[Optional[Path]], release: str = "", cache: Optional[Path] = None) -> Optional[Path]:
    """The tree's scripts/decode_stacktrace.sh: from the first given source tree that has one, else
    from Debian's linux-source of the same major.minor that memhp unpacked into the cache."""
    for s in sources:
        if s is not None and (Path(s) / DECODE_SCRIPT).is_file():
            return Path(s) / DECODE_SCRIPT
    m = re.match(r"(\d+\.\d+)", release or "")
    if m:
        for tree in sorted((cache_root(cache) / "src").glob(f"linux-source-{m.group(1)}_*/linux-source-{m.group(1)}"),
                           reverse=True):
            if (tree / DECODE_SCRIPT).is_file():
                return tree / DECODE_SCRIPT
    return None


def decode(text: str, vmlinux: Path, script: Path, timeout: float = DECODE_TIMEOUT) -> str:
    """text (console lines) through `decode_stacktrace.sh vmlinux`; HostCommandError if it fails."""
    host.require_tools("decoding a stack trace", "bash", "addr2line", "nm", "readelf")
    r = host.check(["bash", script, vmlinux], input=text, timeout=timeout, what=f"{DECODE_SCRIPT}",
                   cwd=script.parent.parent)
    return r.stdout


def decoded_frames(text: str) -> List[str]:
    """The frames decode_stacktrace.sh resolved: "func (path/file.c:123)" lines."""
    return [ln for ln in text.splitlines() if re.search(r"\(\S+\.[chS]:\d+", ln)]


__all__: Sequence[str] = ("has_debug_info", "find_vmlinux", "fetch_debian", "decode_script", "decode",
                          "decoded_frames", "debian_dbg_package")
