"""The accelerator: is /dev/kvm usable, did KVM work on this host before, and which to use.

Whether KVM *works* needs a boot (nested KVM can open /dev/kvm and still fail), so Machine
tries it once and the verdict is remembered per (host kernel, QEMU binary) in the cache.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from harness.errors import HostToolMissing
from harness.log import warn

_accel_memo: dict = {}
_warned_remembered_kvm = False


def kvm_usable() -> bool:
    """/dev/kvm exists and opens read-write. (Whether it *works* needs a boot.)"""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def check_qemu(binary: str) -> str:
    path = shutil.which(binary)
    if not path:
        raise HostToolMissing(f"{binary} not found: install the Debian package qemu-system-x86 "
                              f"(apt-get install qemu-system-x86)")
    return path


def _accel_probe_file() -> Optional[Path]:
    try:
        from harness.cache import cache_root   # lazy: cache_root() checks and creates the cache
        return cache_root() / "accel-probe.json"
    except Exception:
        return None


def _accel_key(qemu_path: str) -> str:
    st = os.stat(qemu_path)
    return f"{os.uname().release}|{qemu_path}|{st.st_size}|{int(st.st_mtime)}"


def remembered_kvm_verdict(qemu_path: str) -> Optional[bool]:
    key = _accel_key(qemu_path)
    if key in _accel_memo:
        return _accel_memo[key]
    f = _accel_probe_file()
    if f and f.exists():
        try:
            data = json.loads(f.read_text())
            if data.get("key") == key:
                return bool(data["kvm_works"])
        except (ValueError, KeyError, OSError):
            pass
    return None


def remember_kvm_verdict(qemu_path: str, works: bool) -> None:
    key = _accel_key(qemu_path)
    _accel_memo[key] = works
    f = _accel_probe_file()
    if f:
        try:
            f.write_text(json.dumps({"key": key, "kvm_works": works, "when": time.time()}))
        except OSError:
            pass


def _warn_remembered_kvm() -> None:
    global _warned_remembered_kvm
    if not _warned_remembered_kvm:
        _warned_remembered_kvm = True
        warn(f"KVM is present but was found broken before (remembered in {_accel_probe_file()}; "
             f"delete it to probe again); using TCG")


def choose(requested: str, qemu_path: str) -> Optional[str]:
    """The accelerator to launch with: "tcg" or "kvm", or None when KVM must be tried (and the
    verdict remembered). `requested` is "auto", "tcg" or "kvm"; "kvm" is checked by the caller."""
    if requested != "auto":
        return requested
    if not kvm_usable():
        return "tcg"
    verdict = remembered_kvm_verdict(qemu_path)
    if verdict is False:
        _warn_remembered_kvm()
        return "tcg"
    return "kvm" if verdict is True else None
