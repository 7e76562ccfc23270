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


# Captured: debian:6.12 placement guest, 10x --jobs 2 run 5 (console.log); 6.1 form from net/sched/sch_generic.c.
CONSOLE_612 = """memhp-guest# \x1b[6n[   54.973823] virtio_net virtio0 eth0: NETDEV WATCHDOG: CPU: 1: transmit queue 0 timed out 5308 ms
[   54.974132] virtio_net virtio0 eth0: TX timeout on queue: 0, sq: output.0, vq: 0x1, name: output.0, 5308000 usecs ago
"""
CONSOLE_61 = """[   24.023405] ------------[ cut here ]------------
[   24.023405] NETDEV WATCHDOG: eth0 (virtio_net): transmit queue 0 timed out
[   24.023527] WARNING: CPU: 0 PID: 0 at net/sched/sch_generic.c:525 dev_watchdog+0x28e/0x2a0
"""


def test_net_stall_line_finds_the_tx_watchdog_in_both_forms_and_nothing_else():
    from harness.vm.guest import net_stall_line
    assert net_stall_line(CONSOLE_612).endswith("NETDEV WATCHDOG: CPU: 1: transmit queue 0 timed out 5308 ms")
    assert net_stall_line(CONSOLE_61) == "[   24.023405] NETDEV WATCHDOG: eth0 (virtio_net): transmit queue 0 timed out"
    assert net_stall_line("[    1.0] virtio_net virtio0 eth0: renamed\nMEMHP-GUEST-READY\n") is None
    assert net_stall_line("") is None


def test_a_boot_whose_network_stalled_is_retried_once_with_the_first_logs_kept(tmp_path, monkeypatch):
    from harness.vm import guest as g
    vm = VM(KERNEL, IMAGE, tmp_path)
    calls, machines = [], []

    class M:   # stands in for a launched Machine: only shutdown() is called between attempts
        def shutdown(self):
            machines.append("shutdown")

    def start_once(self, outcomes=[g.GuestNetStalled("stalled", "l1"), "ok"]):
        calls.append(1)
        (tmp_path / "console.log").write_text(f"attempt {len(calls)}\n")
        o = outcomes.pop(0)
        if isinstance(o, Exception):
            raise o
        return self

    monkeypatch.setattr(g.VM, "_start_once", start_once)
    monkeypatch.setattr(g.VM, "_new_machine", lambda self: M())
    vm.machine = M()
    assert vm.start() is vm
    assert (len(calls), machines, vm.boot_retries) == (2, ["shutdown"], ["stalled"])
    assert (tmp_path / "boot1-console.log").read_text() == "attempt 1\n"
    assert (tmp_path / "console.log").read_text() == "attempt 2\n"

    # a second stall is not retried again: it is the verdict (INFRA)
    vm2 = VM(KERNEL, IMAGE, tmp_path / "b")
    monkeypatch.setattr(g.VM, "_start_once", lambda self: (_ for _ in ()).throw(g.GuestNetStalled("again")))
    vm2.machine = M()
    with pytest.raises(g.GuestNetStalled):
        vm2.start()
    assert vm2.boot_retries == ["again"]
