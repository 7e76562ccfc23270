"""The VM layer's pure parts: how VM builds its GuestConfig (nothing is started), and
VM.shell()'s escape rule: ssh's `~.` after a newline leaves, `~~` sends one `~`."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.vm.guest import VM, _Escape
from harness.vm.qemu_argv import GuestConfig, GuestConfigError

KERNEL = SimpleNamespace(image=Path("/k/bzImage"))
IMAGE = SimpleNamespace(initramfs=Path("/i/initramfs.cpio.gz"), ready_marker="READY")


def test_vm_builds_its_config_from_keywords_or_takes_one(tmp_path):
    vm = VM(KERNEL, IMAGE, tmp_path, memmap_on_memory="0", slots=2)
    assert vm.config == GuestConfig(memmap_on_memory="0", slots=2)
    assert not hasattr(vm, "spec")        # the compatibility view is gone: vm.config, vm.machine.runtime
    assert (vm.dirty, vm.facts) == (False, None)
    assert vm.machine.config is vm.config and vm.machine.runtime is None   # nothing launched
    c = GuestConfig(numa_nodes=2)
    assert VM(KERNEL, IMAGE, tmp_path, config=c).config is c
    with pytest.raises(TypeError, match="not both"):
        VM(KERNEL, IMAGE, tmp_path, config=c, slots=2)
    with pytest.raises(GuestConfigError, match="memmap_on_memory"):
        VM(KERNEL, IMAGE, tmp_path, memmap_on_memory="1 init=/bin/sh")
    with pytest.raises(ValueError, match="accel"):
        VM(KERNEL, IMAGE, tmp_path, accel="hvf")


def feed_all(*chunks: bytes):
    e, sent = _Escape(), b""
    for c in chunks:
        out, leave = e.feed(c)
        sent += out
        if leave:
            return sent, True
    return sent, False


@pytest.mark.parametrize("chunks,sent,leave", [
    ((b"~.",), b"", True),                                   # first thing typed
    ((b"ls\r~.",), b"ls\r", True),                           # after Enter (raw mode sends \r)
    ((b"ls\n", b"~", b"."), b"ls\n", True),                  # split across reads
    ((b"a~.",), b"a~.", False),                              # not at the start of a line
    ((b"~~.",), b"~.", False),                               # ~~ is one literal ~, then text
    ((b"~x",), b"~x", False),                                # an unknown escape sends both
    ((b"\r~", b"~", b"\r~."), b"\r~\r", True),
    ((b"echo hi\r", b"exit\r"), b"echo hi\rexit\r", False),
    # the terminal answering busybox's cursor query (ESC[6n) after the prompt, then ~.
    ((b"ls\r", b"\x1b[50;14R", b"~."), b"ls\r\x1b[50;14R", True),
    ((b"\x1b[50;14R~.",), b"\x1b[50;14R", True),
    ((b"\x1bOA~.",), b"\x1bOA", True),                        # an SS3 arrow key
    ((b"~\x1b[A",), b"~\x1b[A", False),                       # ~ then an escape sequence: both sent
])
def test_escape(chunks, sent, leave):
    assert feed_all(*chunks) == (sent, leave)


def test_text_after_escape_is_not_sent():
    out, leave = _Escape().feed(b"~.rm -rf /\r")
    assert (out, leave) == (b"", True)
