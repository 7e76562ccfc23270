"""harness.kernel: bzImage header, version ordering, IKCONFIG, spec resolution (one real apt run)."""
from __future__ import annotations

import gzip
import lzma
import struct
import sys
import time
import types
from pathlib import Path

import pytest

from harness import kernel
from harness.errors import HostToolMissing, KernelError

KV = b"6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2\0"


def fake_bzimage(kv: bytes = KV, payload: bytes = b"", kv_at: int = 0x4000) -> bytes:
    """A file with just enough of the x86 boot header: HdrS, protocol 2.15, kernel_version, payload."""
    setup_sects = 3
    pm_start = (setup_sects + 1) * 512
    body = bytearray(max(kv_at + 0x200 + len(kv), pm_start) + 16)
    body[0x1F1] = setup_sects
    body[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", body, 0x206, 0x020F)
    struct.pack_into("<H", body, 0x20E, kv_at)
    body[kv_at + 0x200:kv_at + 0x200 + len(kv)] = kv
    payload_off = len(body) - pm_start
    struct.pack_into("<II", body, 0x248, payload_off, len(payload))
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


@pytest.mark.parametrize("a,b,want", [
    ("6.1.192-2", "6.1.76-1", 1),
    ("6.12.117-1~deb12u1", "6.12.117-1", -1),
    ("1:0.1", "9.9", 1),
    ("6.1.0-9", "6.1.0-56", -1),
    ("1.0", "1.0", 0),
    ("1.0a", "1.0", 1),
])
def test_debian_version_compare(a, b, want):
    assert kernel.compare_debian_versions(a, b) == want
    assert kernel.compare_debian_versions(b, a) == -want


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
    raw = bytearray(img.read_bytes())
    struct.pack_into("<II", raw, 0x248, 0, 0)
    img.write_bytes(bytes(raw))
    assert kernel.read_ikconfig(img) == text
    # the embedded config becomes the artifact's config, written into the cache
    art = kernel.resolve(str(img), tmp_path / "cache")
    assert art.config is not None and art.config.read_text() == text
    assert tmp_path / "cache" in art.config.parents


def test_read_ikconfig_absent_or_garbage_is_none_and_fast(tmp_path):
    img = tmp_path / "bzImage"
    junk = (b"\x1f\x8b\x08" + b"\xff" * 50 + b"\xfd7zXZ\x00" + b"\x00" * 50) * 200
    img.write_bytes(fake_bzimage(payload=junk))
    t = time.monotonic()
    assert kernel.read_ikconfig(img) is None
    assert time.monotonic() - t < 3
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
    monkeypatch.setitem(sys.modules, "harness.kbuild", types.SimpleNamespace(resolve_debian_src=fake))
    import harness
    monkeypatch.setattr(harness, "kbuild", sys.modules["harness.kbuild"], raising=False)
    assert kernel.resolve("debian-src:6.1", tmp_path, fragments=("f",), patches=("p",)) == "built"
    assert seen == {"ver": "6.1", "cache": tmp_path, "fragments": ("f",), "patches": ("p",)}


def test_no_apt_candidates_says_apt_get_update(monkeypatch, tmp_path):
    monkeypatch.setattr(kernel, "apt_candidates", lambda pattern: [])
    with pytest.raises(KernelError, match="apt-get update"):
        kernel.resolve("debian:6.12", tmp_path)


def test_missing_host_tool_names_package(monkeypatch, tmp_path):
    monkeypatch.setattr(kernel.shutil, "which", lambda name: None)
    with pytest.raises(HostToolMissing, match="dpkg"):
        kernel.resolve("debian:6.1", tmp_path)


def test_incomplete_extraction_is_not_reused(tmp_path, monkeypatch):
    stale = tmp_path / "kernels" / "linux-image-6.1.0-99-cloud-amd64-unsigned_6.1.999-1"
    (stale / "boot").mkdir(parents=True)
    monkeypatch.setattr(kernel, "apt_candidates", lambda pattern: [])
    with pytest.raises(KernelError, match="apt-get update"):   # i.e. it went to apt, not to `stale`
        kernel.resolve("debian:6.1", tmp_path)


def test_real_debian_61_then_cache_hit_without_apt(monkeypatch):
    """Real: apt-get download + dpkg-deb -x into the user's cache (kept between runs)."""
    art = kernel.resolve("debian:6.1")
    assert art.release.startswith("6.1.0-") and art.release.endswith("-cloud-amd64")
    assert kernel.image_release(art.image) == art.release
    assert art.config is not None and "CONFIG_MEMORY_HOTPLUG=y" in art.config.read_text()
    assert (art.modules / "kernel/drivers/virtio/virtio_pci.ko").is_file()
    assert not list(art.modules.rglob("*.ko.xz"))

    def no_subprocess(*a, **k):
        raise AssertionError(f"cache hit must not run {a}")
    monkeypatch.setattr(kernel.subprocess, "run", no_subprocess)
    t = time.monotonic()
    again = kernel.resolve("debian:6.1")
    assert again == art
    assert time.monotonic() - t < 0.5
