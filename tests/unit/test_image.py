"""harness.vm.image: newc writer, image contents, keys, cache behaviour."""
from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from harness.vm import image
from harness.kernels import kernel
from harness.kernels.kernel import KernelArtifact
from test_modules import make_ko

REPO = Path(__file__).resolve().parents[2]

LDD = """\tlinux-vdso.so.1 (0x00007ffd)
\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f01)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f03)
"""


def test_parse_ldd_includes_interpreter():
    assert image.parse_ldd(LDD) == [Path("/lib/x86_64-linux-gnu/libz.so.1"), Path("/lib/x86_64-linux-gnu/libc.so.6"),
                                    Path("/lib64/ld-linux-x86-64.so.2")]


def test_newc_roundtrip_and_host_cpio_agrees(tmp_path):
    entries = [image.CpioEntry("bin", stat.S_IFDIR | 0o755),
               image.CpioEntry("bin/x", stat.S_IFREG | 0o755, b"abc"),
               image.CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"/bin/busybox"),
               image.CpioEntry("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1))]
    blob = image.write_newc(entries)
    assert blob.endswith(b"\0") and len(blob) % 4 == 0
    assert image.read_newc(gzip.compress(blob)) == entries
    if shutil.which("cpio"):
        r = subprocess.run(["cpio", "-t", "--quiet"], input=blob, capture_output=True, check=True)
        assert r.stdout.decode().split() == ["bin", "bin/x", "bin/sh", "dev/console"]


def _fake_kernel(tmp_path: Path) -> KernelArtifact:
    mods = tmp_path / "k/lib/modules/6.1.0-test"
    (mods / "kernel/drivers/net").mkdir(parents=True)
    (mods / "kernel/drivers/net/failover.ko").write_bytes(make_ko({"name": ["failover"], "depends": [""]}))
    (mods / "kernel/drivers/net/virtio_net.ko").write_bytes(make_ko({"name": ["virtio_net"], "depends": ["failover"]}))
    (mods / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    return KernelArtifact("test", tmp_path / "bzImage", None, mods, "6.1.0-test")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("img")
    k = _fake_kernel(tmp)
    t = time.monotonic()
    img = image.build(k, tmp / "cache")
    return tmp, k, img, time.monotonic() - t


def test_image_members(built):
    _, _, img, _ = built
    members = {e.name: e for e in image.read_newc(img.initramfs.read_bytes())}
    for name in ("init", "bin/busybox", "usr/sbin/dropbear", "lib64/ld-linux-x86-64.so.2",
                 "lib/x86_64-linux-gnu/libc.so.6", "etc/passwd", "etc/group", "etc/shadow",
                 "etc/dropbear/dropbear_ed25519_host_key", "root/.ssh/authorized_keys", "dev/console"):
        assert name in members, name
    assert members["init"].data == (REPO / "guest-images/init").read_bytes()
    assert stat.S_IMODE(members["init"].mode) == 0o755
    assert members["bin/sh"].data == b"/bin/busybox" and stat.S_ISLNK(members["bin/sh"].mode)
    assert stat.S_ISLNK(members["sbin/insmod"].mode)
    assert members["etc/passwd"].data.startswith(b"root:x:0:0:root:/root:/bin/sh\n")
    assert members["etc/shadow"].data.startswith(b"root:*:")
    assert stat.S_IMODE(members["root/.ssh"].mode) == 0o700
    assert stat.S_IMODE(members["root/.ssh/authorized_keys"].mode) == 0o600
    assert stat.S_IMODE(members["etc/dropbear/dropbear_ed25519_host_key"].mode) == 0o600
    assert members["dev/console"].rdev == (5, 1) and stat.S_ISCHR(members["dev/console"].mode)
    assert members["etc/memhp/modules"].data.decode().splitlines() == [
        "/lib/modules/6.1.0-test/kernel/drivers/net/failover.ko",
        "/lib/modules/6.1.0-test/kernel/drivers/net/virtio_net.ko"]
    assert "lib/modules/6.1.0-test/kernel/drivers/net/virtio_net.ko" in members
    assert img.modules == ("failover", "virtio_net")


def test_keys_and_modes(built):
    _, _, img, _ = built
    from cryptography.hazmat.primitives import serialization
    assert stat.S_IMODE(img.ssh_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(img.initramfs.parent.stat().st_mode) == 0o700
    key = serialization.load_ssh_private_key(img.ssh_key.read_bytes(), None)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    members = {e.name: e for e in image.read_newc(img.initramfs.read_bytes())}
    assert members["root/.ssh/authorized_keys"].data.startswith(pub + b" ")
    assert img.host_key_pub.startswith("ssh-ed25519 AAAA") and len(img.host_key_pub.split()) == 2
    r = subprocess.run(["dropbearkey", "-y", "-f", "/dev/stdin"], input=members[
        "etc/dropbear/dropbear_ed25519_host_key"].data, capture_output=True)
    assert img.host_key_pub.encode() in r.stdout


def test_second_build_is_a_cache_hit(built, monkeypatch):
    tmp, k, img, first = built
    monkeypatch.setattr(image, "_make_host_key", lambda p: pytest.fail("cache hit must not make keys"))
    again = image.build(k, tmp / "cache")
    assert again == img


def test_changed_recipe_or_module_gives_new_image(built, tmp_path):
    tmp, k, img, _ = built
    recipe = tmp_path / "recipe"
    shutil.copytree(REPO / "guest-images", recipe)
    with open(recipe / "init", "a") as f:
        f.write("# changed\n")
    other = image.build(k, tmp / "cache", recipe=recipe)
    assert other.initramfs.parent != img.initramfs.parent
    (k.modules / "kernel/drivers/net/failover.ko").write_bytes(make_ko({"name": ["failover"], "depends": [""],
                                                                        "version": ["2"]}))
    third = image.build(k, tmp / "cache")
    assert third.initramfs.parent not in (img.initramfs.parent, other.initramfs.parent)


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    k = _fake_kernel(tmp_path)

    def boom(path):
        raise RuntimeError("simulated crash mid-build")
    monkeypatch.setattr(image, "_make_host_key", boom)
    with pytest.raises(RuntimeError):
        image.build(k, tmp_path / "cache")
    # only the entry's lock file stays (locks are kept): no scratch folder, no half-made image
    left = [p.name for p in (tmp_path / "cache/images").iterdir()]
    assert len(left) == 1 and left[0].startswith(".") and left[0].endswith(".lock"), left
    monkeypatch.undo()
    assert image.build(k, tmp_path / "cache").initramfs.is_file()


def test_init_script_is_valid_sh_and_marks_ready_after_listen():
    init = (REPO / "guest-images/init").read_text()
    subprocess.run(["/bin/busybox", "sh", "-n", str(REPO / "guest-images/init")], check=True)
    assert image.READY_MARKER in init
    assert init.index("listening()") < init.index('echo "$READY_MARKER"')
    assert "dropbear -s -g" in init


def test_real_debian_61_image_has_virtio_stack(tmp_path):
    art = kernel.resolve("debian:6.1")
    img = image.build(art, tmp_path)
    assert img.modules[:5] == ("virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio",
                               "virtio_pci")
    assert img.initramfs.stat().st_size < 8 << 20
