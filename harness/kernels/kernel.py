"""Kernel specs -> KernelArtifact (image, config, modules, release).

Specs:
  debian:6.1, debian:6.12     newest linux-image-<ver>*-cloud-amd64-unsigned from Debian's archive
  debian-src:6.1, :6.12       Debian's linux-source-<ver>, built with kconfigs/ (see kbuild.py)
  PATH                        a bzImage, or a folder with bzImage|vmlinuz* and config (a build output)
"""
from __future__ import annotations

import gzip
import hashlib
import lzma
import re
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from harness import host
from harness.kernels import kbuild
from harness.kernels.artifact import KernelArtifact
from harness.cache import cache_root, ensure_dir, entry_lock, is_complete, publish, scratch_dir, scratch_name
from harness.errors import HostCommandError, KernelError, PackageError

# KernelArtifact lives in harness.kernels.artifact (below kbuild); it is re-exported here for callers.
__all__ = ["KernelArtifact", "DEFAULT_SPEC", "VALID_SPECS", "resolve", "resolve_path"]

DEFAULT_SPEC = "debian:6.12"

# apt-cache search patterns (anchored regexes on package names) for each Debian spec.
DEBIAN_PACKAGES: Dict[str, str] = {
    "6.1": r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$",
    "6.12": r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$",
}
VALID_SPECS = tuple(f"debian:{v}" for v in DEBIAN_PACKAGES) + tuple(
    f"debian-src:{v}" for v in DEBIAN_PACKAGES)


# ---------------------------------------------------------------- entry points

def resolve(spec: str, cache: Optional[Path] = None, *, fragments: Sequence = (),
            patches: Sequence = (), refresh: bool = False) -> KernelArtifact:
    """Turn a spec into a KernelArtifact, downloading/extracting into the cache if needed.

    refresh=True asks apt for a newer Debian package even when one is already extracted.
    """
    spec = str(spec).strip()
    scheme, sep, rest = spec.partition(":")
    if sep and scheme == "debian":
        return _resolve_debian(spec, rest, cache, refresh=refresh)
    if sep and scheme == "debian-src":
        if rest not in DEBIAN_PACKAGES:
            raise KernelError(f"unknown kernel spec {spec!r}; valid specs: {', '.join(VALID_SPECS)}, or a path")
        return kbuild.resolve_debian_src(rest, cache, fragments=fragments, patches=patches)
    p = Path(spec).expanduser()
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) and not p.exists() and "/" not in scheme:
        raise KernelError(f"unknown kernel spec scheme {scheme!r} in {spec!r}; valid forms: "
                          f"{', '.join(VALID_SPECS)}, or a path to a bzImage or a build folder")
    return resolve_path(p, spec=spec, cache=cache)


# ---------------------------------------------------------------- pure helpers

def version_key(text: str) -> Tuple[int, ...]:
    """Numeric parts of a package name or version: '6.1.0-9' < '6.1.0-56'."""
    return tuple(int(x) for x in re.findall(r"\d+", text))


def newest(names: Iterable[str]) -> Optional[str]:
    names = list(names)
    return max(names, key=lambda n: (version_key(n), n)) if names else None


@dataclass(frozen=True)
class BzImageHeader:
    protocol: Tuple[int, int]
    setup_sects: int
    kernel_version: str        # the whole string, e.g. "6.1.0-56-cloud-amd64 (debian-kernel@...) #1 SMP ..."
    payload_offset: int        # absolute file offset of the compressed vmlinux (0 if unknown)
    payload_length: int

    @property
    def release(self) -> str:
        return self.kernel_version.split()[0] if self.kernel_version.split() else ""


def parse_bzimage_header(data: bytes) -> Optional[BzImageHeader]:
    """Parse the x86 boot protocol header; None if `data` is not a bzImage."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    setup_sects = data[0x1F1] or 4
    proto = struct.unpack_from("<H", data, 0x206)[0]
    kv = ""
    (kv_off,) = struct.unpack_from("<H", data, 0x20E)
    if kv_off:
        start = kv_off + 0x200
        if start < len(data):
            end = data.find(b"\0", start, start + 512)
            raw = data[start:end if end != -1 else start + 512]
            kv = raw.decode("ascii", "replace").strip()
    p_off = p_len = 0
    if proto >= 0x208:
        p_off, p_len = struct.unpack_from("<II", data, 0x248)
        p_off += (setup_sects + 1) * 512
    return BzImageHeader((proto >> 8, proto & 0xFF), setup_sects, kv, p_off, p_len)


# x86 boot protocol (Documentation/arch/x86/boot.rst): offsets in the setup header
_BOOT_FLAG, _LOADFLAGS, _SYSSIZE, _XLOADFLAGS = 0x1FE, 0x211, 0x1F4, 0x236
_LOADED_HIGH, _XLF_KERNEL_64 = 0x01, 0x01


def setup_header_problem(data: bytes, file_size: int) -> Optional[str]:
    """Why data (a file's first bytes) is not a bootable x86_64 bzImage, or None if it is one.

    Past the "HdrS" magic: the 0xAA55 boot flag, protocol 2.x, a kernel loaded high
    (bzImage), a 64-bit entry point (protocol 2.12+), and a protected-mode part that fits in
    the file (a truncated image fails here) and holds the compressed payload.
    """
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return "no bzImage header"
    (flag,) = struct.unpack_from("<H", data, _BOOT_FLAG)
    if flag != 0xAA55:
        return f"boot flag {flag:#06x}, not 0xaa55: the setup header is not valid"
    (proto,) = struct.unpack_from("<H", data, 0x206)
    if proto >> 8 != 2:
        return f"boot protocol {proto >> 8}.{proto & 0xFF:02d} is not 2.x: the setup header is not valid"
    if not data[_LOADFLAGS] & _LOADED_HIGH:
        return "a zImage (loaded low), not a bzImage"
    if proto >= 0x020C and not struct.unpack_from("<H", data, _XLOADFLAGS)[0] & _XLF_KERNEL_64:
        return "a 32-bit kernel (no 64-bit entry point); memhp boots x86_64 guests"
    setup_end = ((data[0x1F1] or 4) + 1) * 512
    (syssize,) = struct.unpack_from("<I", data, _SYSSIZE)
    if syssize == 0 or setup_end >= file_size:
        return "no protected-mode kernel after the setup code"
    if setup_end + syssize * 16 > file_size + 15:    # syssize is rounded up to 16 bytes
        return f"truncated: the header says {setup_end + syssize * 16} bytes, the file has {file_size}"
    if proto >= 0x0208:
        p_off, p_len = struct.unpack_from("<II", data, 0x248)
        if p_len == 0 or p_off + p_len > syssize * 16:
            return f"payload ({p_off:#x}+{p_len:#x}) outside the protected-mode kernel ({syssize * 16:#x} bytes)"
    return None


def _read_header_bytes(path: Path) -> bytes:
    # the kernel_version string lives in the setup code, up to 64 KiB in
    with open(path, "rb") as f:
        return f.read(0x10000)


def image_release(path: Path) -> str:
    hdr = parse_bzimage_header(_read_header_bytes(path))
    return hdr.release if hdr else ""


# ---------------------------------------------------------------- IKCONFIG

_MAGICS = (b"\x1f\x8b\x08", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
_IKCFG_ST, _IKCFG_ED = b"IKCFG_ST", b"IKCFG_ED"
_MAX_VMLINUX = 256 << 20


def _ikcfg_from_blob(blob: bytes) -> Optional[str]:
    st = blob.find(_IKCFG_ST)
    if st == -1:
        return None
    ed = blob.find(_IKCFG_ED, st)
    if ed == -1:
        return None
    try:
        return gzip.decompress(blob[st + len(_IKCFG_ST):ed]).decode("utf-8", "replace")
    except (OSError, EOFError, zlib.error):
        return None


def _decompress_at(data: bytes, off: int, deadline: float) -> bytes:
    magic = data[off:off + 6]
    try:
        if magic.startswith(b"\x1f\x8b\x08"):
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            return d.decompress(data[off:], _MAX_VMLINUX)
        if magic.startswith(b"\xfd7zXZ\x00"):
            d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            return d.decompress(data[off:], _MAX_VMLINUX)
        if magic.startswith(b"\x28\xb5\x2f\xfd") and shutil.which("zstd"):
            timeout = max(0.1, deadline - time.monotonic())
            r = host.run(["zstd", "-dcq"], input=data[off:], text=False, timeout=timeout)
            return r.stdout[:_MAX_VMLINUX]
    except (lzma.LZMAError, zlib.error, EOFError, HostCommandError, OSError):
        return b""
    return b""


def read_ikconfig(image: Path, time_budget: float = 3.0) -> Optional[str]:
    """The .config embedded with CONFIG_IKCONFIG, like scripts/extract-ikconfig; None if absent.

    Tries the boot header's payload first, then scans for compression magics until the budget runs out.
    """
    deadline = time.monotonic() + time_budget
    try:
        data = Path(image).read_bytes()
    except OSError:
        return None
    found = _ikcfg_from_blob(data)   # an uncompressed vmlinux
    if found is not None:
        return found
    candidates: List[int] = []
    hdr = parse_bzimage_header(data[:0x10000])
    if hdr and 0 < hdr.payload_offset < len(data):
        candidates.append(hdr.payload_offset)
    for magic in _MAGICS:
        pos = data.find(magic)
        while pos != -1 and len(candidates) < 64:
            if pos not in candidates:
                candidates.append(pos)
            pos = data.find(magic, pos + 1)
    for off in candidates:
        if time.monotonic() > deadline:
            break
        blob = _decompress_at(data, off, deadline)
        if blob:
            found = _ikcfg_from_blob(blob)
            if found is not None:
                return found
    return None


def find_config(image: Path) -> Optional[Path]:
    """A config file beside the image: config-<release suffix>, config, .config, config-*."""
    image = Path(image)
    folder = image.parent
    names: List[str] = []
    if image.name.startswith("vmlinuz-"):
        names.append("config-" + image.name[len("vmlinuz-"):])
    names += ["config", ".config"]
    for n in names:
        if (folder / n).is_file():
            return folder / n
    others = sorted(folder.glob("config-*"))
    return others[0] if others else None


# ---------------------------------------------------------------- paths

def _embedded_config(image: Path, cache: Optional[Path]) -> Optional[Path]:
    text = read_ikconfig(image)
    if text is None:
        return None
    root = Path(cache) if cache else cache_root()
    h = hashlib.sha256(text.encode()).hexdigest()[:16]
    out = root / "configs" / f"ikconfig-{h}"
    if not out.is_file():
        tmp = scratch_name(ensure_dir(out.parent), out.name)
        tmp.write_text(text)
        tmp.replace(out)     # same name, same content: a concurrent writer's copy is as good
    return out


def _check_bzimage(path: Path) -> str:
    """The image's release; KernelError unless it is a bootable x86_64 bzImage."""
    try:
        data = _read_header_bytes(path)
        size = path.stat().st_size
    except OSError as e:
        raise KernelError(f"{path}: cannot read: {e.strerror or e}") from None
    problem = setup_header_problem(data, size)
    hdr = parse_bzimage_header(data)
    if problem or hdr is None:
        raise KernelError(f"{path} is not a Linux kernel image ({problem or 'no bzImage header'})")
    return hdr.release


def resolve_path(path: Path, spec: Optional[str] = None, cache: Optional[Path] = None) -> KernelArtifact:
    path = Path(path)
    spec = spec or str(path)
    if not path.exists():
        raise KernelError(f"kernel not found: {path}")
    if path.is_file():
        release = _check_bzimage(path)
        config = find_config(path) or _embedded_config(path, cache)
        modules = None
        if (path.parent / "modules").is_dir():
            modules = path.parent / "modules"
        elif release and (path.parent / "lib" / "modules" / release).is_dir():
            modules = path.parent / "lib" / "modules" / release
        return KernelArtifact(spec, path.resolve(), config, modules, release)
    folder = path
    image = None
    for cand in (folder / "bzImage", folder / "arch" / "x86" / "boot" / "bzImage"):
        if cand.is_file():
            image = cand
            break
    if image is None:
        vml = sorted(folder.glob("vmlinuz*")) or sorted(folder.glob("boot/vmlinuz*"))
        image = vml[-1] if vml else None
    if image is None:
        raise KernelError(f"kernel not found: {folder} has no bzImage, arch/x86/boot/bzImage or vmlinuz*")
    release = _check_bzimage(image)
    config = find_config(image)
    if config is None and image.parent != folder:
        config = find_config(folder / "bzImage")
    if config is None:
        config = _embedded_config(image, cache)
    modules = None
    if (folder / "modules").is_dir():
        modules = folder / "modules"
    elif release and (folder / "lib" / "modules" / release).is_dir():
        modules = folder / "lib" / "modules" / release
    source = folder.resolve() if (folder / "Makefile").is_file() and (folder / "mm").is_dir() else None
    return KernelArtifact(spec, image.resolve(), config.resolve() if config else None,
                          modules.resolve() if modules else None, release, source)


# ---------------------------------------------------------------- Debian packages

def decompress_modules(folder: Path) -> int:
    """Replace every .ko.xz under folder by its .ko (the guest's insmod needs plain ELF)."""
    n = 0
    for xz in folder.rglob("*.ko.xz"):
        ko = xz.with_suffix("")
        ko.write_bytes(lzma.decompress(xz.read_bytes()))
        xz.unlink()
        n += 1
    return n


def _completed(kernels: Path, pattern: str) -> List[Path]:
    rx = re.compile(pattern.rstrip("$"))
    out = []
    if kernels.is_dir():
        for d in kernels.iterdir():
            name = d.name.split("_", 1)[0]
            if rx.match(name) and (d / ".complete").is_file():
                out.append(d)
    return out


def _artifact_from_extraction(spec: str, root: Path) -> KernelArtifact:
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if not images:
        raise KernelError(f"{root}: extracted package has no boot/vmlinuz-*")
    image = images[-1]
    release = image.name[len("vmlinuz-"):] or image_release(image)
    config = root / "boot" / f"config-{release}"
    modules = root / "lib" / "modules" / release
    return KernelArtifact(spec, image, config if config.is_file() else find_config(image),
                          modules if modules.is_dir() else None, release)


def _newest_extracted(kernels: Path, pattern: str) -> Optional[Path]:
    done = _completed(kernels, pattern)
    if not done:
        return None
    return max(done, key=lambda d: (version_key(d.name.split("_", 1)[0]), version_key(d.name)))


def _resolve_debian(spec: str, ver: str, cache: Optional[Path], refresh: bool) -> KernelArtifact:
    """debian:<ver>: the newest extracted package, else apt's newest: fetched, verified, extracted."""
    if ver not in DEBIAN_PACKAGES:
        raise KernelError(f"unknown kernel spec {spec!r}; valid specs: {', '.join(VALID_SPECS)}, or a path")
    pattern = DEBIAN_PACKAGES[ver]
    root = Path(cache) if cache else cache_root()
    kernels = root / "kernels"
    if not refresh:
        best = _newest_extracted(kernels, pattern)
        if best is not None:
            return _artifact_from_extraction(spec, best)
    host.require_tools(f"fetching {spec}", "apt-get", "apt-cache", "dpkg-deb")
    pkg = newest(host.apt_search(pattern))
    version = host.apt_candidate(pkg) if pkg else None
    if pkg is None or version is None:
        raise PackageError(f"no Debian package matches {pattern} in apt's lists; run `apt-get update` (as root)")
    dest = kernels / f"{pkg}_{version}"
    if not is_complete(dest):
        _extract_package(pkg, version, root / "debs", dest)
    return _artifact_from_extraction(spec, dest)


def _extract_package(pkg: str, version: str, debs: Path, dest: Path) -> None:
    """Fetch pkg=version (verified) and unpack it to dest: in a scratch folder, published under dest's lock."""
    deb = host.fetch_deb(pkg, version, ensure_dir(debs))
    with entry_lock(dest):
        if is_complete(dest):           # another run extracted it while we waited
            return
        with scratch_dir(dest.parent, "extract") as tmp:
            host.check(["dpkg-deb", "-x", deb, tmp], timeout=host.UNPACK_TIMEOUT, what=f"dpkg-deb -x {deb.name}")
            decompress_modules(tmp / "lib" / "modules")
            publish(tmp, dest, f"{pkg} {version}")
