"""guest-images/ recipe -> GuestImage (uncompressed cpio initramfs + SSH key), cached by input hash.

The image is busybox-static + dropbear + the virtio/pvpanic modules the kernel lacks built in.
See guest-images/README.md for what is inside and why.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from harness import host
from harness.kernels import modules as kmods
from harness.kernels.artifact import KernelArtifact
from harness.cache import cache_root, entry_lock, hash_inputs, is_complete, publish, scratch_dir
from harness.errors import HostToolMissing, KernelError

READY_MARKER = "MEMHP-GUEST-READY"

IMAGE_FORMAT = "memhp-image-2"   # bump when build() changes what it puts in the image
BUSYBOX = Path("/bin/busybox")
DROPBEAR = Path("/usr/sbin/dropbear")
DROPBEARKEY = Path("/usr/bin/dropbearkey")
HOSTKEY_PATH = "etc/dropbear/dropbear_ed25519_host_key"
RECIPE = Path(__file__).resolve().parents[2] / "guest-images"


@dataclass(frozen=True)
class GuestImage:
    initramfs: Path          # newc cpio, uncompressed (see _write_image)
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
    host.require({"ldd": "libc-bin"}, "building the guest image")
    r = host.run(["ldd", binary], timeout=host.QUICK_TIMEOUT)
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
    r = host.run([busybox, "--list-full"], timeout=host.QUICK_TIMEOUT)
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
    r = host.run([_need(DROPBEARKEY, "dropbear-bin"), "-t", "ed25519", "-f", path], timeout=host.QUICK_TIMEOUT)
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
    return GuestImage(folder / "initramfs.cpio", folder / "id_ed25519", meta["host_key_pub"],
                      tuple(meta["modules"]))


@dataclass(frozen=True)
class _Inputs:
    """Everything the image is made of; their hash names its cache folder."""
    recipe: Path
    busybox: Path
    dropbear: Path
    libs: Tuple[Path, ...]                   # dropbear's shared libraries and loader
    release: str
    modules: Tuple[Tuple[str, Path], ...]    # (path under the kernel's modules folder, file), load order
    kernel_spec: str

    def digest(self) -> str:
        parts: List[object] = [IMAGE_FORMAT, self.recipe, self.busybox, self.dropbear, self.release]
        for lib in self.libs:
            parts += [str(lib), lib.resolve()]
        for rel, p in self.modules:
            parts += [rel, p]
        return hash_inputs(parts)


def build(kernel: KernelArtifact, cache: Optional[Path] = None, *, recipe: Optional[Path] = None) -> GuestImage:
    """Build (or reuse) the initramfs for `kernel`: gather the inputs, hash them, make the image once."""
    inputs = _gather(kernel, recipe)
    digest = inputs.digest()
    out = (Path(cache) if cache else cache_root()) / "images" / digest
    if is_complete(out):
        return _load(out)
    with entry_lock(out):
        if not is_complete(out):          # else another run made it while we waited
            with scratch_dir(out.parent, "image") as tmp:
                _write_image(inputs, digest, tmp)
                publish(tmp, out, digest)
    return _load(out)


def _gather(kernel: KernelArtifact, recipe: Optional[Path]) -> _Inputs:
    recipe = Path(recipe or os.environ.get("MEMHP_GUEST_IMAGES") or RECIPE)
    if not (recipe / "init").is_file():
        raise KernelError(f"guest image recipe {recipe} has no init script")
    busybox = _need(BUSYBOX, "busybox-static")
    dropbear = _need(DROPBEAR, "dropbear-bin")
    _need(DROPBEARKEY, "dropbear-bin")
    mod_files = kmods.closure(kernel.modules) if kernel.modules else []
    mods = tuple((str(p.relative_to(kernel.modules)), p) for p in mod_files)
    return _Inputs(recipe, busybox, dropbear, tuple(shared_libs(dropbear)), kernel.release or "", mods, kernel.spec)


def _write_image(inputs: _Inputs, digest: str, folder: Path) -> None:
    """initramfs.cpio, the client key pair and meta.json, written into folder."""
    tree = _base_tree(inputs)
    private, public = _make_client_key()
    tree.file("root/.ssh/authorized_keys", (public + "\n").encode(), 0o600)
    host_key_pub = _add_host_key(tree, folder)
    guest_paths = _add_modules(tree, inputs)
    # Uncompressed: under TCG the guest kernel's gunzip of the ~3 MB image took 0.8-1.7 s of its
    # time to /init, the plain 6.5 MB archive 0.4-0.9 s (memhp bench, same runs, loaded host).
    with open(folder / "initramfs.cpio", "wb") as f:
        f.write(write_newc(tree.sorted()))
    _write_private(folder / "id_ed25519", private)
    (folder / "id_ed25519.pub").write_text(public + "\n")
    (folder / "meta.json").write_text(json.dumps({
        "hash": digest, "release": inputs.release, "host_key_pub": host_key_pub,
        "modules": [kmods.normalise(p.name) for _, p in inputs.modules], "module_paths": guest_paths,
        "kernel_spec": inputs.kernel_spec,
    }, indent=1) + "\n")


def _base_tree(inputs: _Inputs) -> _Tree:
    """Folders, device nodes, /init, the recipe's rootfs files, busybox with its applets, dropbear."""
    tree = _Tree()
    for d in ("proc", "sys", "dev", "dev/pts", "tmp", "run", "var/log", "etc/memhp", "etc/dropbear",
              "lib", "lib64", "bin", "sbin", "usr/bin", "usr/sbin", "mnt"):
        tree.dir(d)
    tree.dir("tmp", 0o1777)
    tree.dir("root", 0o700)
    tree.dir("root/.ssh", 0o700)
    tree.chardev("dev/console", 5, 1, 0o600)
    tree.chardev("dev/null", 1, 3, 0o666)
    tree.file("init", (inputs.recipe / "init").read_bytes(), 0o755)
    rootfs = inputs.recipe / "rootfs"
    if rootfs.is_dir():
        for f in sorted(x for x in rootfs.rglob("*") if x.is_file()):
            rel = str(f.relative_to(rootfs))
            tree.file(rel, f.read_bytes(), 0o600 if rel == "etc/shadow" else 0o644)
    tree.file("bin/busybox", inputs.busybox.read_bytes(), 0o755)
    tree.file("usr/sbin/dropbear", inputs.dropbear.read_bytes(), 0o755)
    for lib in inputs.libs:
        tree.file(str(lib), lib.resolve().read_bytes(), 0o755)
    for applet in busybox_applets(inputs.busybox):
        if applet != "bin/busybox":
            tree.symlink(applet, "/bin/busybox")
    return tree


def _add_host_key(tree: _Tree, scratch: Path) -> str:
    """A fresh dropbear host key into the image; returns its public line (SSH pins it)."""
    key_file = scratch / "dropbear_ed25519_host_key"
    pub = _make_host_key(key_file)
    tree.file(HOSTKEY_PATH, key_file.read_bytes(), 0o600)
    key_file.unlink()
    return pub


def _add_modules(tree: _Tree, inputs: _Inputs) -> List[str]:
    """The kernel modules init loads, and /etc/memhp/modules listing them in load order."""
    guest_paths = []
    for rel, p in inputs.modules:
        guest = f"lib/modules/{inputs.release}/{rel}"
        tree.file(guest, p.read_bytes(), 0o644)
        guest_paths.append("/" + guest)
    tree.file("etc/memhp/modules", "".join(p + "\n" for p in guest_paths).encode())
    return guest_paths
