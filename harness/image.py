"""guest-images/ recipe -> GuestImage (gzip cpio initramfs + SSH key), cached by input hash.

The image is busybox-static + dropbear + the virtio/pvpanic modules the kernel lacks built in.
See guest-images/README.md for what is inside and why.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from harness.cache import cache_root, hash_inputs
from harness.errors import HostToolMissing, KernelError

READY_MARKER = "MEMHP-GUEST-READY"
GUEST_IP = "10.0.2.15"

IMAGE_FORMAT = "memhp-image-1"   # bump when build() changes what it puts in the image
BUSYBOX = Path("/bin/busybox")
DROPBEAR = Path("/usr/sbin/dropbear")
DROPBEARKEY = Path("/usr/bin/dropbearkey")
HOSTKEY_PATH = "etc/dropbear/dropbear_ed25519_host_key"
RECIPE = Path(__file__).resolve().parent.parent / "guest-images"


@dataclass(frozen=True)
class GuestImage:
    initramfs: Path          # gzip'd newc cpio
    ssh_key: Path            # ed25519 private key (OpenSSH format), mode 0600
    host_key_pub: str        # the guest dropbear's "ssh-ed25519 AAAA..." (pinned by SSH)
    modules: Tuple[str, ...] = ()   # module names init loads, in order
    ready_marker: str = READY_MARKER


# ---------------------------------------------------------------- newc cpio (pure)

@dataclass(frozen=True)
class CpioEntry:
    name: str            # path inside the archive, no leading "/"
    mode: int            # full st_mode (type bits included)
    data: bytes = b""    # file contents, or a symlink's target
    rdev: Tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A newc ("070701") archive, every member owned by 0:0 with mtime 0 (reproducible)."""
    out = bytearray()

    def member(ino: int, e: CpioEntry) -> None:
        name = e.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.extend(hdr + name + _pad4(len(hdr) + len(name)))
        out.extend(e.data + _pad4(len(e.data)))

    for ino, e in enumerate(entries, start=1):
        member(ino, e)
    member(0, CpioEntry("TRAILER!!!", 0))
    return bytes(out)


def read_newc(data: bytes) -> List[CpioEntry]:
    """Parse a newc archive (gzip'd or not) back into entries; stops at the trailer or bad data."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    out: List[CpioEntry] = []
    pos = 0
    while pos + 110 <= len(data) and data[pos:pos + 6] == b"070701":
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            break
        out.append(CpioEntry(name, mode, body, (rmaj, rmin)))
    return out


class _Tree:
    """The image's members, keyed by path; parents are created as 0755 folders."""

    def __init__(self) -> None:
        self.entries: Dict[str, CpioEntry] = {}

    def dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        if not path:
            return
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent and parent not in self.entries:
            self.dir(parent)
        self.entries[path] = CpioEntry(path, stat.S_IFDIR | mode)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        if "/" in path and path.rsplit("/", 1)[0] not in self.entries:
            self.dir(path.rsplit("/", 1)[0])
        self.entries[path] = CpioEntry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        if path in self.entries:
            return
        if "/" in path and path.rsplit("/", 1)[0] not in self.entries:
            self.dir(path.rsplit("/", 1)[0])
        self.entries[path] = CpioEntry(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int) -> None:
        self.entries[path.strip("/")] = CpioEntry(path.strip("/"), stat.S_IFCHR | mode, b"", (major, minor))

    def sorted(self) -> List[CpioEntry]:
        return [self.entries[k] for k in sorted(self.entries)]


# ---------------------------------------------------------------- host inputs

def _need(path: Path, package: str) -> Path:
    if not path.exists():
        raise HostToolMissing(f"{path} not found; install the Debian package {package}")
    return path


def shared_libs(binary: Path) -> List[Path]:
    """The libraries `binary` loads (ldd), plus its ELF interpreter, as the paths the loader uses."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise HostToolMissing("ldd not found; install the Debian package libc-bin")
    r = subprocess.run([ldd, str(binary)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise HostToolMissing(f"ldd {binary} failed: {(r.stderr or r.stdout).strip()}")
    return parse_ldd(r.stdout)


def parse_ldd(text: str) -> List[Path]:
    libs: List[Path] = []
    for line in text.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(0x", line)
        if m and Path(m.group(1)) not in libs:
            libs.append(Path(m.group(1)))
    return libs


def busybox_applets(busybox: Path = BUSYBOX) -> List[str]:
    r = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, timeout=30)
    return [ln.strip().lstrip("/") for ln in r.stdout.splitlines() if ln.strip()]


def _make_client_key() -> Tuple[bytes, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, public + " memhp"


def _make_host_key(path: Path) -> str:
    r = subprocess.run([str(_need(DROPBEARKEY, "dropbear-bin")), "-t", "ed25519", "-f", str(path)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"^(ssh-ed25519 \S+)", r.stdout, re.M)
    if r.returncode != 0 or m is None:
        raise HostToolMissing(f"dropbearkey failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}")
    return m.group(1)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


# ---------------------------------------------------------------- build

def _load(folder: Path) -> GuestImage:
    meta = json.loads((folder / "meta.json").read_text())
    return GuestImage(folder / "initramfs.cpio.gz", folder / "id_ed25519", meta["host_key_pub"],
                      tuple(meta["modules"]))


def build(kernel, cache: Optional[Path] = None, *, recipe: Optional[Path] = None) -> GuestImage:
    """Build (or reuse) the initramfs for `kernel` (a KernelArtifact)."""
    from harness import modules as kmods
    recipe = Path(recipe or os.environ.get("MEMHP_GUEST_IMAGES") or RECIPE)
    if not (recipe / "init").is_file():
        raise KernelError(f"guest image recipe {recipe} has no init script")
    busybox = _need(BUSYBOX, "busybox-static")
    dropbear = _need(DROPBEAR, "dropbear-bin")
    _need(DROPBEARKEY, "dropbear-bin")
    libs = shared_libs(dropbear)
    release = kernel.release or ""
    mod_files = kmods.closure(kernel.modules) if kernel.modules else []
    mod_rel = [str(p.relative_to(kernel.modules)) for p in mod_files]

    parts: List[object] = [IMAGE_FORMAT, recipe, busybox, dropbear, release]
    for lib in libs:
        parts += [str(lib), lib.resolve()]
    for rel, p in zip(mod_rel, mod_files):
        parts += [rel, p]
    digest = hash_inputs(parts)
    root = Path(cache) if cache else cache_root()
    images = root / "images"
    out = images / digest
    if (out / ".complete").is_file():
        return _load(out)

    images.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=images))
    try:
        tree = _Tree()
        for d in ("proc", "sys", "dev", "dev/pts", "tmp", "run", "var/log", "etc/memhp", "etc/dropbear",
                  "lib", "lib64", "bin", "sbin", "usr/bin", "usr/sbin", "mnt"):
            tree.dir(d)
        tree.dir("tmp", 0o1777)
        tree.dir("root", 0o700)
        tree.dir("root/.ssh", 0o700)
        tree.chardev("dev/console", 5, 1, 0o600)
        tree.chardev("dev/null", 1, 3, 0o666)
        tree.file("init", (recipe / "init").read_bytes(), 0o755)
        rootfs = recipe / "rootfs"
        if rootfs.is_dir():
            for f in sorted(x for x in rootfs.rglob("*") if x.is_file()):
                rel = str(f.relative_to(rootfs))
                tree.file(rel, f.read_bytes(), 0o600 if rel == "etc/shadow" else 0o644)
        tree.file("bin/busybox", busybox.read_bytes(), 0o755)
        tree.file("usr/sbin/dropbear", dropbear.read_bytes(), 0o755)
        for lib in libs:
            tree.file(str(lib), lib.resolve().read_bytes(), 0o755)
        for applet in busybox_applets(busybox):
            if applet != "bin/busybox":
                tree.symlink(applet, "/bin/busybox")

        private, public = _make_client_key()
        tree.file("root/.ssh/authorized_keys", (public + "\n").encode(), 0o600)
        host_key_file = tmp / "dropbear_ed25519_host_key"
        host_key_pub = _make_host_key(host_key_file)
        tree.file(HOSTKEY_PATH, host_key_file.read_bytes(), 0o600)
        host_key_file.unlink()

        guest_paths = []
        for rel, p in zip(mod_rel, mod_files):
            guest = f"lib/modules/{release}/{rel}"
            tree.file(guest, p.read_bytes(), 0o644)
            guest_paths.append("/" + guest)
        tree.file("etc/memhp/modules", "".join(p + "\n" for p in guest_paths).encode())

        with open(tmp / "initramfs.cpio.gz", "wb") as f:
            f.write(gzip.compress(write_newc(tree.sorted()), compresslevel=6, mtime=0))
        _write_private(tmp / "id_ed25519", private)
        (tmp / "id_ed25519.pub").write_text(public + "\n")
        names = [kmods.normalise(p.name) for p in mod_files]
        (tmp / "meta.json").write_text(json.dumps({
            "hash": digest, "release": release, "host_key_pub": host_key_pub,
            "modules": names, "module_paths": guest_paths, "kernel_spec": kernel.spec,
        }, indent=1) + "\n")
        os.chmod(tmp, 0o700)
        (tmp / ".complete").write_text(digest + "\n")
        try:
            tmp.rename(out)
        except OSError:
            if (out / ".complete").is_file():     # another build won the race
                return _load(out)
            shutil.rmtree(out, ignore_errors=True)   # a leftover without .complete
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _load(out)
