"""harness.kernels.kernel: bzImage header and its validity, IKCONFIG, spec resolution (one real apt run)."""
from __future__ import annotations

import gzip
import lzma
import struct
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import host
from harness.kernels import kernel
from harness.errors import HostToolMissing, KernelError, PackageError

BADINPUT = Path(__file__).resolve().parent.parent / "data" / "badinput"

KV = b"6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2\0"


def fake_bzimage(kv: bytes = KV, payload: bytes = b"\0" * 64, kv_at: int = 0x4000) -> bytes:
    """A file with just enough of a valid x86_64 bzImage header (boot protocol 2.15): boot flag,
    HdrS, loaded high, 64-bit entry, kernel_version, and a protected-mode part holding the payload."""
    setup_sects = (kv_at + 0x200 + len(kv)) // 512 + 1      # the version string lives in the setup code
    pm_start = (setup_sects + 1) * 512
    body = bytearray(pm_start + 16)
    body[0x1F1] = setup_sects
    struct.pack_into("<H", body, 0x1FE, 0xAA55)
    body[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", body, 0x206, 0x020F)
    struct.pack_into("<H", body, 0x20E, kv_at)
    body[0x211] = 0x01                                        # LOADED_HIGH
    struct.pack_into("<H", body, 0x236, 0x7F)                 # XLF_KERNEL_64 and friends, as Debian's
    body[kv_at + 0x200:kv_at + 0x200 + len(kv)] = kv
    struct.pack_into("<II", body, 0x248, 16, len(payload))    # payload right after 16 bytes of pm code
    struct.pack_into("<I", body, 0x1F4, (16 + len(payload) + 15) // 16)
    return bytes(body) + payload


def test_header_release_is_first_word_of_kernel_version():
    hdr = kernel.parse_bzimage_header(fake_bzimage())
    assert hdr is not None
    assert hdr.protocol == (2, 15)
    assert hdr.release == "6.1.0-56-cloud-amd64"
    assert hdr.kernel_version.startswith("6.1.0-56-cloud-amd64 (debian-kernel@")


def test_header_rejects_non_kernels_and_odd_input():
    assert kernel.parse_bzimage_header(b"\x7fELF" + b"\0" * 0x1000) is None
    assert kernel.parse_bzimage_header(b"") is None
    assert kernel.parse_bzimage_header(b"HdrS") is None
    odd = bytearray(fake_bzimage())
    struct.pack_into("<H", odd, 0x20E, 0xFFFF)          # version string beyond the end
    hdr = kernel.parse_bzimage_header(bytes(odd[:0x1000]))
    assert hdr is not None and hdr.release == ""


def test_package_ordering_is_numeric_not_lexical():
    names = ["linux-image-6.1.0-9-cloud-amd64-unsigned", "linux-image-6.1.0-56-cloud-amd64-unsigned",
             "linux-image-6.1.0-47-cloud-amd64-unsigned"]
    assert kernel.newest(names) == "linux-image-6.1.0-56-cloud-amd64-unsigned"
    assert kernel.newest(["linux-image-6.12.99+deb12-cloud-amd64-unsigned",
                          "linux-image-6.12.117+deb12-cloud-amd64-unsigned"]).startswith("linux-image-6.12.117")
    assert kernel.newest([]) is None


def test_fake_bzimage_is_valid():
    data = fake_bzimage()
    assert kernel.setup_header_problem(data, len(data)) is None


def _broken(offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(fake_bzimage())
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


@pytest.mark.parametrize("data,size_delta,why", [
    (_broken(0x1FE, "<H", 0), 0, "boot flag 0x0000, not 0xaa55"),
    (_broken(0x206, "<H", 0x0300), 0, "boot protocol 3.00 is not 2.x"),
    (_broken(0x211, "<B", 0), 0, "a zImage (loaded low)"),
    (_broken(0x236, "<H", 0x7E), 0, "a 32-bit kernel"),
    (_broken(0x1F4, "<I", 0), 0, "no protected-mode kernel"),
    (_broken(0x1F4, "<I", 1 << 20), 0, "truncated: the header says"),
    (_broken(0x24C, "<I", 1 << 20), 0, "payload (0x10+0x100000) outside"),
    (_broken(0x24C, "<I", 0), 0, "payload (0x10+0x0) outside"),
    (fake_bzimage(), -40, "truncated"),
])
def test_setup_header_problems(data, size_delta, why):
    problem = kernel.setup_header_problem(data, len(data) + size_delta)
    assert problem is not None and why in problem, problem


def test_hdrs_without_setup_header_is_not_a_kernel(tmp_path):
    """badinput/hdrs-no-setup.bin: "HdrS" at 0x202 in 4 KiB of zeros (no boot flag, no protocol)."""
    f = BADINPUT / "hdrs-no-setup.bin"
    assert f.read_bytes()[0x202:0x206] == b"HdrS" and kernel.parse_bzimage_header(f.read_bytes()) is not None
    with pytest.raises(KernelError, match=r"hdrs-no-setup\.bin is not a Linux kernel image \(boot flag 0x0000"):
        kernel.resolve(str(f), tmp_path / "cache")
    # the same bytes as a build folder's bzImage
    (tmp_path / "tree").mkdir()
    shutil.copy(f, tmp_path / "tree" / "bzImage")
    with pytest.raises(KernelError, match="boot flag"):
        kernel.resolve(str(tmp_path / "tree"), tmp_path / "cache")


def test_unknown_specs_name_the_valid_ones():
    with pytest.raises(KernelError, match=r"debian:6\.1, debian:6\.12"):
        kernel.resolve("debian:5.10")
    with pytest.raises(KernelError, match=r"scheme 'foo'.*debian:6\.12.*path"):
        kernel.resolve("foo:bar")


def test_missing_and_non_kernel_paths(tmp_path):
    with pytest.raises(KernelError, match=r"kernel not found: .*nope"):
        kernel.resolve(str(tmp_path / "nope"))
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel" * 100)
    with pytest.raises(KernelError, match="is not a Linux kernel image \\(no bzImage header\\)"):
        kernel.resolve(str(junk))
    for name in ("not-a-kernel.bin", "zeros-4k.bin"):
        with pytest.raises(KernelError, match="no bzImage header"):
            kernel.resolve(str(BADINPUT / name), tmp_path / "cache")


def test_file_spec_with_config_beside(tmp_path):
    img = tmp_path / "vmlinuz-6.1.0-56-cloud-amd64"
    img.write_bytes(fake_bzimage())
    (tmp_path / "config-6.1.0-56-cloud-amd64").write_text("CONFIG_MEMCG=y\n")
    art = kernel.resolve(str(img), tmp_path / "cache")
    assert art.release == "6.1.0-56-cloud-amd64"
    assert art.config == tmp_path / "config-6.1.0-56-cloud-amd64"
    assert art.modules is None


def test_build_folder_layout(tmp_path):
    (tmp_path / "arch/x86/boot").mkdir(parents=True)
    (tmp_path / "arch/x86/boot/bzImage").write_bytes(fake_bzimage())
    (tmp_path / ".config").write_text("CONFIG_MEMORY_HOTPLUG=y\n")
    (tmp_path / "lib/modules/6.1.0-56-cloud-amd64").mkdir(parents=True)
    art = kernel.resolve(str(tmp_path), tmp_path / "cache")
    assert art.image == (tmp_path / "arch/x86/boot/bzImage").resolve()
    assert art.config == (tmp_path / ".config").resolve()
    assert art.modules == (tmp_path / "lib/modules/6.1.0-56-cloud-amd64").resolve()


def _ikconfig_vmlinux(text: str) -> bytes:
    return b"\0" * 1000 + b"IKCFG_ST" + gzip.compress(text.encode()) + b"IKCFG_ED" + b"\0" * 1000


def test_read_ikconfig_from_xz_payload(tmp_path):
    text = "CONFIG_IKCONFIG=y\nCONFIG_MEMORY_HOTPLUG=y\n"
    img = tmp_path / "bzImage"
    img.write_bytes(fake_bzimage(payload=lzma.compress(_ikconfig_vmlinux(text), format=lzma.FORMAT_XZ)))
    assert kernel.read_ikconfig(img) == text
    # found by magic scan too, when the header's payload fields are zero
    good = img.read_bytes()
    raw = bytearray(good)
    struct.pack_into("<II", raw, 0x248, 0, 0)
    img.write_bytes(bytes(raw))
    assert kernel.read_ikconfig(img) == text
    img.write_bytes(good)
    # the embedded config becomes the artifact's config, written into the cache
    art = kernel.resolve(str(img), tmp_path / "cache")
    assert art.config is not None and art.config.read_text() == text
    assert tmp_path / "cache" in art.config.parents


def test_read_ikconfig_absent_or_garbage_is_none(tmp_path):
    img = tmp_path / "bzImage"
    junk = (b"\x1f\x8b\x08" + b"\xff" * 50 + b"\xfd7zXZ\x00" + b"\x00" * 50) * 200
    img.write_bytes(fake_bzimage(payload=junk))
    assert kernel.read_ikconfig(img) is None
    assert kernel.read_ikconfig(tmp_path / "missing") is None


def test_decompress_modules(tmp_path):
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel/a.ko.xz").write_bytes(lzma.compress(b"\x7fELF-module", format=lzma.FORMAT_XZ))
    assert kernel.decompress_modules(tmp_path) == 1
    assert (tmp_path / "kernel/a.ko").read_bytes() == b"\x7fELF-module"
    assert not (tmp_path / "kernel/a.ko.xz").exists()


def test_debian_src_delegates_to_kbuild(monkeypatch, tmp_path):
    seen = {}

    def fake(ver, cache, fragments=(), patches=()):
        seen.update(ver=ver, cache=cache, fragments=fragments, patches=patches)
        return "built"
    monkeypatch.setattr(kernel.kbuild, "resolve_debian_src", fake)
    assert kernel.resolve("debian-src:6.1", tmp_path, fragments=("f",), patches=("p",)) == "built"
    assert seen == {"ver": "6.1", "cache": tmp_path, "fragments": ("f",), "patches": ("p",)}


def test_no_apt_candidates_says_apt_get_update(monkeypatch, tmp_path):
    monkeypatch.setattr(host, "apt_search", lambda pattern: [])
    with pytest.raises(PackageError, match="apt-get update"):
        kernel.resolve("debian:6.12", tmp_path)


def test_missing_host_tool_names_package(monkeypatch, tmp_path):
    monkeypatch.setattr(host.shutil, "which", lambda name: None)
    with pytest.raises(HostToolMissing, match="apt-get install apt dpkg"):
        kernel.resolve("debian:6.1", tmp_path)


def test_incomplete_extraction_is_not_reused(tmp_path, monkeypatch):
    stale = tmp_path / "kernels" / "linux-image-6.1.0-99-cloud-amd64-unsigned_6.1.999-1"
    (stale / "boot").mkdir(parents=True)
    monkeypatch.setattr(host, "apt_search", lambda pattern: [])
    with pytest.raises(PackageError, match="apt-get update"):   # i.e. it went to apt, not to `stale`
        kernel.resolve("debian:6.1", tmp_path)


def test_real_debian_61_then_cache_hit_without_apt(monkeypatch, tmp_path):
    """Real: apt-get download + dpkg-deb -x into the user's cache (kept between runs)."""
    art = kernel.resolve("debian:6.1")
    assert art.release.startswith("6.1.0-") and art.release.endswith("-cloud-amd64")
    assert kernel.image_release(art.image) == art.release
    assert art.config is not None and "CONFIG_MEMORY_HOTPLUG=y" in art.config.read_text()
    assert (art.modules / "kernel/drivers/virtio/virtio_pci.ko").is_file()
    assert not list(art.modules.rglob("*.ko.xz"))
    data = art.image.read_bytes()
    assert kernel.setup_header_problem(data[:0x10000], len(data)) is None

    # the real image cut short is refused, with the sizes
    cut = tmp_path / "vmlinuz-cut"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(KernelError, match=f"truncated: the header says {len(data)} bytes, the file has {len(data) // 2}"):
        kernel.resolve(str(cut), tmp_path / "cache")

    def no_subprocess(*a, **k):
        raise AssertionError(f"cache hit must not run {a}")
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    again = kernel.resolve("debian:6.1")
    assert again == art


def test_kernel_artifact_is_reexported():
    """KernelArtifact lives in harness.kernels.artifact (below kernel and kbuild); kernel re-exports it."""
    from harness.kernels import artifact
    assert kernel.KernelArtifact is artifact.KernelArtifact
