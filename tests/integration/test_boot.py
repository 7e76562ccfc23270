"""Real guests: `memhp boot`, the per-test artifacts, and each layer (Machine, QMP, Console, SSH, hotplug).

Every test here boots a real Debian kernel under QEMU. The `vm` fixture uses the session's
kernel (--kernel, default debian:6.12); tests that must hold on both kernels resolve them
directly with harness.kernels.kernel.resolve and harness.vm.image.build.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness.memory import expect, parsers
from harness.errors import GuestCommandError, Hang, InfraError
from harness.vm.guest import VM, CommandResult
from harness.memory.blocks import dimm_blocks, wait_blocks
from harness.memory.dimm import OST_IN_PROGRESS, OST_SUCCESS, add_dimm, memory_devices, remove_dimm
from harness.vm.image import build
from harness.kernels.kernel import resolve
from harness.vm.machine import Machine
from harness.vm.qemu_argv import GuestConfig
from harness.vm.qmp import LOOP_GRACE_S, QMPNoReply
from harness.vm.ssh import WATCHDOG_GRACE_S

from memhp_helpers import leftover_qemu, pid_alive, qemu_processes, run_memhp, show

pytestmark = pytest.mark.guest

KERNELS = ["debian:6.1", "debian:6.12"]
MiB = 1 << 20
BOOT_TIMEOUT = 600          # a CLI boot on a busy 2-core TCG host; a hang bound, not a speed claim
PARAM = "/sys/module/memory_hotplug/parameters/memmap_on_memory"


@pytest.fixture(scope="module", params=KERNELS)
def kernel_image(request):
    kernel = resolve(request.param)
    return kernel, build(kernel)


def _no_leftovers(folder: Path) -> None:
    left = leftover_qemu(folder)
    assert not left, f"QEMU still running for a VM of {folder}: {left}"


# ---------------------------------------------------------------- memhp boot (the CLI)
@pytest.mark.parametrize("spec", KERNELS)
@pytest.mark.parametrize("flag,written", [("on", "1"), ("off", "0"), ("force", "force")])
def test_cli_boot_reads_memmap_on_memory(spec, flag, written, artifacts):
    """on -> Y and off -> N on both kernels; force -> N on 6.1 (a bool there) and force on 6.12."""
    args = ["boot", "--kernel", spec, "--logs", str(artifacts)]
    if flag != "on":                      # "on" is the default: test that too
        args += ["--memmap-on-memory", flag]
    p = run_memhp(args + ["--", "cat", PARAM], timeout=BOOT_TIMEOUT)
    version = resolve(spec).version
    want = expect.expected_param_readback(version, written)
    assert p.returncode == 0, show(p)
    assert p.stdout.strip() == want, (f"{spec} --memmap-on-memory {flag}: expected {want!r} "
                                      f"(expect.expected_param_readback for {version})" + show(p))
    if flag in ("on", "off"):
        assert want == {"on": "Y", "off": "N"}[flag]
    (append,) = re.findall(r"-append '([^']*)'", (artifacts / "argv.txt").read_text())
    assert f"memory_hotplug.memmap_on_memory={written}" in append.split()
    _no_leftovers(artifacts)


def test_cli_boot_propagates_the_command_status(artifacts):
    p = run_memhp(["boot", "--kernel", "debian:6.1", "--logs", str(artifacts), "--", "sh", "-c", "exit 7"],
                  timeout=BOOT_TIMEOUT)
    assert p.returncode == 7, show(p)
    p = run_memhp(["boot", "--kernel", "debian:6.1", "--logs", str(artifacts / "2"), "--",
                   "sh", "-c", "echo out; echo err >&2; exit 0"], timeout=BOOT_TIMEOUT)
    assert (p.returncode, p.stdout, p.stderr.splitlines()[-1:]) == (0, "out\n", ["err"]), show(p)
    _no_leftovers(artifacts)


def test_cli_boot_dry_run_prints_argv_and_starts_nothing(tmp_path):
    # A tripwire first on PATH: if anything ran QEMU, the marker file would appear.
    trip = tmp_path / "bin"
    trip.mkdir()
    marker = tmp_path / "qemu-was-started"
    fake = trip / "qemu-system-x86_64"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    import subprocess
    from memhp_helpers import MEMHP
    env = dict(os.environ, PATH=f"{trip}:{os.environ.get('PATH', '')}")
    p = subprocess.run([MEMHP, "boot", "--kernel", "debian:6.1", "--dimm", "128M", "--dry-run", "--",
                        "cat", PARAM], capture_output=True, text=True, timeout=BOOT_TIMEOUT, env=env,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, show(p)
    import shlex
    argv = shlex.split(p.stdout.strip())
    assert len(p.stdout.strip().splitlines()) == 1, show(p)
    assert argv[0] == "qemu-system-x86_64"
    for opt in ("-kernel", "-initrd", "-append"):
        assert opt in argv, f"{opt} missing" + show(p)
    kernel = resolve("debian:6.1")
    # The file a real boot gets: the PVH vmlinux by default (a debian kernel has the note), the
    # bzImage with MEMHP_ENTRY=bzimage.
    from harness.vm.guest import entry_image
    assert argv[argv.index("-kernel") + 1] == str(entry_image(kernel))
    if os.environ.get("MEMHP_ENTRY", "pvh").lower() != "bzimage":
        assert argv[argv.index("-kernel") + 1] != str(kernel.image)
    assert Path(argv[argv.index("-initrd") + 1]).is_file()
    assert "memory_hotplug.memmap_on_memory=1" in argv[argv.index("-append") + 1].split()
    assert not marker.exists(), "dry run started QEMU"
    assert not qemu_processes("memhp-RUNDIR"), "a QEMU with the dry run's placeholder run folder is running"


# ---------------------------------------------------------------- the vm fixture's artifacts
def test_vm_fixture_writes_artifacts_and_leaves_no_qemu(vm, artifacts, memhp_image):
    pid, run_dir = vm.machine.pid, str(vm.machine.runtime.run_dir)
    assert vm.run("true").ok
    vm.close()                                  # what the fixture does at teardown; idempotent
    assert not pid_alive(pid), f"QEMU pid {pid} survived close()"
    assert not qemu_processes(run_dir + "/")
    assert not Path(run_dir).exists(), "the private run folder (sockets) was not removed"

    names = {p.name for p in artifacts.iterdir()}
    assert {"console.log", "qmp.jsonl", "dmesg.txt", "argv.txt"} <= names, names
    console = (artifacts / "console.log").read_text(errors="replace")
    assert re.search(r"Linux version \d", console), "no kernel banner in console.log"
    assert re.search(r"^" + re.escape(memhp_image.ready_marker) + r"\s*$", console.replace("\r", ""), re.M), \
        f"no ready marker {memhp_image.ready_marker!r} in console.log"
    msgs = [json.loads(line) for line in (artifacts / "qmp.jsonl").read_text().splitlines()]
    assert all({"t", "dir", "msg"} <= set(m) for m in msgs)
    assert "QMP" in msgs[0]["msg"] and msgs[0]["dir"] == "recv", "the greeting comes first"
    sent = [m["msg"].get("execute") for m in msgs if m["dir"] == "send"]
    assert "cont" in sent and "quit" in sent, sent
    dmesg = (artifacts / "dmesg.txt").read_text()
    assert "Run /init as init process" in dmesg and parsers.parse_dmesg_boot_time(dmesg)
    argv = (artifacts / "argv.txt").read_text()
    assert argv.startswith("qemu-system-x86_64 ") and run_dir in argv


# ---------------------------------------------------------------- the layers, one by one
def test_machine_and_qmp(memhp_kernel, memhp_image, artifacts, pytestconfig):
    assert_runtime_unset = Machine(GuestConfig(), memhp_kernel.image, memhp_image.initramfs).runtime
    assert assert_runtime_unset is None     # run folder, port and accel exist only once launched
    with Machine(GuestConfig(), memhp_kernel.image, memhp_image.initramfs, accel=pytestconfig.getoption("accel"),
                 log_dir=artifacts, ready_marker=memhp_image.ready_marker) as m:
        rt = m.runtime
        assert rt.accel in ("tcg", "kvm") and 0 < rt.ssh_port < 65536 and rt.run_dir.is_dir()
        assert oct(os.stat(rt.run_dir).st_mode & 0o777) == "0o700"
        st = m.qmp.execute("query-status")
        assert st["status"] == "running" and st["running"] is True, st
        assert m.qmp.greeting and "QMP" in m.qmp.greeting
        assert {"launch", "cont", "first_output", "ready"} <= set(m.times)
        assert m.times["launch"] <= m.times["cont"] <= m.times["ready"]
        pid, run_dir = m.pid, rt.run_dir
        assert pid_alive(pid)
        # Who stopped answering decides the class. The guest not doing what was asked: Hang.
        with pytest.raises(Hang, match="DEVICE_DELETED"):
            m.qmp.wait_event("DEVICE_DELETED", timeout=1)
        # QEMU itself not answering (stopped): QMPNoReply, INFRA, within the deadline; a console
        # write QEMU never reads: Hang within its deadline, not a blocked sendall.
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(QMPNoReply, match="query-status") as e:
                m.qmp.execute("query-status", timeout=2)
            assert isinstance(e.value, InfraError) and time.monotonic() - t0 < 2 + LOOP_GRACE_S
            t0 = time.monotonic()
            with pytest.raises(Hang, match="serial console to accept input"):
                m.console.send(b"#" * (16 << 20), timeout=2)
            assert time.monotonic() - t0 < 4
        finally:
            os.kill(pid, signal.SIGCONT)
    assert not pid_alive(pid) and not run_dir.exists()
    assert m.exitcode is not None and m.qmp is None and m.console is None


def test_console_run_and_ssh_run_return_the_same_type(vm):
    cmd = "cat /proc/sys/kernel/osrelease; exit 3"
    over_serial = vm.guest.run(cmd, timeout=60, transport="serial")
    over_ssh = vm.guest.run(cmd, timeout=60, transport="ssh")
    assert type(over_serial) is type(over_ssh) is CommandResult
    assert (over_serial.transport, over_ssh.transport) == ("serial", "ssh")
    assert over_serial.status == over_ssh.status == 3
    assert over_serial.stdout.strip().splitlines()[-1] == over_ssh.stdout.strip() == vm.kernel.release
    assert not over_serial.ok and not over_ssh.ok
    with pytest.raises(GuestCommandError) as e:
        over_serial.check()
    assert e.value.status == 3


@pytest.mark.parametrize("status", [0, 1, 2, 7, 127, 255])
def test_ssh_run_exit_codes(vm, status):
    r = vm.guest.run(f"echo out; echo err >&2; exit {status}", timeout=60)
    assert (r.status, r.stdout, r.stderr, r.ok) == (status, "out\n", "err\n", status == 0)


def test_ssh_run_command_not_found_and_stdin(vm):
    r = vm.guest.run("no-such-command-memhp", timeout=60)
    assert r.status == 127 and "not found" in r.stderr and r.transport == "ssh"
    for via in ("ssh", "serial"):
        r = vm.guest.run("cat; echo status", timeout=60, stdin=b"fed through stdin\n", transport=via)
        assert (r.stdout, r.transport) == ("fed through stdin\nstatus\n", via), r
    assert vm.guest.run("exit 4").status == 4
    # A command that never reads its stdin: the send blocks on SSH's window, and the deadline
    # still holds (Hang, not a stuck memhp nor a transport error); the next command works.
    t0 = time.monotonic()
    with pytest.raises(Hang, match="over SSH"):
        vm.guest.run("sleep 600", timeout=5, stdin=b"x" * (32 << 20))
    assert time.monotonic() - t0 < 5 + 10, time.monotonic() - t0
    assert vm.guest.run("echo again", timeout=60).stdout == "again\n"


def test_guest_binary_reads(vm):
    """read_file_bytes and read_bytes give the same bytes as the guest's own od(1) shows."""
    want = vm.guest.run("od -An -v -tx1 /sys/kernel/btf/vmlinux | head -c 4000", check=True).stdout
    data = vm.guest.read_file_bytes("/sys/kernel/btf/vmlinux")
    size = int(vm.guest.run("wc -c < /sys/kernel/btf/vmlinux", check=True).stdout)
    assert len(data) == size and size > 1 << 20, (len(data), size)
    assert data[:len(want.split())] == bytes(int(x, 16) for x in want.split())
    assert data[:2] == b"\x9f\xeb"                      # BTF magic 0xeB9F, little-endian
    kpf = vm.guest.read_bytes("/proc/kpageflags", 8 * 4096, 64)
    od = vm.guest.run("dd if=/proc/kpageflags bs=8 skip=4096 count=8 2>/dev/null | od -An -v -tx1",
                      check=True).stdout
    assert kpf == bytes(int(x, 16) for x in od.split()) and len(kpf) == 64


def test_hotplug_add_remove_event_order(kernel_image, artifacts, pytestconfig):
    """128 MiB pc-dimm add and remove: OST 132 -> DEVICE_DELETED -> OST 0, on both kernels."""
    kernel, image = kernel_image
    with VM(kernel, image, artifacts, accel=pytestconfig.getoption("accel"),
            memmap_on_memory="1", default_state="offline") as vm:
        bs = parsers.parse_block_size(vm.guest.read("/sys/devices/system/memory/block_size_bytes"))
        assert bs and bs > 0
        size = 128 * MiB
        dimm = add_dimm(vm.qmp, size)
        ids = dimm_blocks(dimm, bs)
        assert dimm.size == size and len(ids) == size // bs
        wait_blocks(vm.guest, ids, present=True, timeout=60)
        for b in ids:
            d = f"/sys/devices/system/memory/memory{b}"
            assert vm.guest.read(f"{d}/state").strip() == "offline"      # memhp_default_state=offline
            assert int(vm.guest.read(f"{d}/phys_index"), 16) == b
        assert [d["id"] for d in memory_devices(vm.qmp)] == [dimm.id]

        res = remove_dimm(vm.qmp, dimm, timeout=120)
        assert res.deleted and not res.refused, res
        assert res.event_names == (f"ACPI_DEVICE_OST:{OST_IN_PROGRESS}", "DEVICE_DELETED",
                                   f"ACPI_DEVICE_OST:{OST_SUCCESS}"), res
        assert res.ost_statuses == (OST_IN_PROGRESS, OST_SUCCESS) and res.object_deleted
        wait_blocks(vm.guest, ids, present=False, timeout=60)
        assert memory_devices(vm.qmp) == []
        run_dir = str(vm.machine.runtime.run_dir)
    assert not qemu_processes(run_dir + "/")
    splats = parsers.find_splats((artifacts / "console.log").read_text(errors="replace"))
    assert not splats, f"{kernel.release}: {splats[0].kind}: {splats[0].text}"


# ---------------------------------------------------------------- the interactive shell, in a real terminal
def _tmux(sock: str, *args: str) -> str:
    return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, timeout=20,
                          check=True, stdin=subprocess.DEVNULL).stdout


def _wait_pane(sock: str, pattern: str, timeout: float) -> str:
    """Poll the pane (with its history) until `pattern` shows; fail with the pane at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        text = _tmux(sock, "capture-pane", "-p", "-J", "-S", "-500", "-t", "memhp")
        if re.search(pattern, text, re.M):
            return text
        assert time.monotonic() < deadline, f"{pattern!r} not on the terminal within {timeout:.0f} s:\n{text}"
        time.sleep(0.2)


def _boot_in_tmux(sock: str, tmp: Path, name: str) -> Path:
    """`memhp boot` with no command, in a fresh tmux terminal; the pane keeps its output after
    memhp exits, with the exit status and whether the terminal settings came back."""
    from memhp_helpers import MEMHP
    logs = tmp / name
    script = (f"stty -g > {tmp}/{name}.before; TMPDIR={shlex.quote(tempfile.gettempdir())} "
              f"{MEMHP} boot --kernel debian:6.12 --logs {logs}; echo MEMHP-EXIT=$?; "
              f"stty -g > {tmp}/{name}.after; sleep 600")
    _tmux(sock, "new-session", "-d", "-s", "memhp", "-x", "160", "-y", "50", "sh", "-c", script)
    _wait_pane(sock, r"escape: ~\. at the start of a line", BOOT_TIMEOUT)
    _wait_pane(sock, r"^memhp-guest# ", 60)        # the guest's prompt, over SSH
    return logs


def test_cli_boot_interactive_shell_in_a_terminal(tmp_path):
    """`memhp boot` without a command, driven through a real terminal (tmux): a typed command
    runs in the guest; `~.` after a newline leaves at once with exit 0, QEMU gone, terminal
    restored; a guest that panics under the shell ends it with CRASH (exit 1), not a hang."""
    assert shutil.which("tmux"), "tmux is missing: `make deps` installs it (Makefile DEBS)"
    sock = f"memhp-it-{os.getpid()}"
    try:
        logs = _boot_in_tmux(sock, tmp_path, "escape")
        _tmux(sock, "send-keys", "-t", "memhp", "-l", "echo $((6*7))-from-the-guest; uname -r")
        _tmux(sock, "send-keys", "-t", "memhp", "Enter")
        _wait_pane(sock, r"^42-from-the-guest\s*$", 60)
        _tmux(sock, "send-keys", "-t", "memhp", "-l", "~.")      # right after the Enter above
        t0 = time.monotonic()
        text = _wait_pane(sock, r"MEMHP-EXIT=\d+", 30)
        left_after = time.monotonic() - t0
        assert "MEMHP-EXIT=0" in text and "shell ended: escape ~. typed" in text, text
        assert re.search(r"^6\.12\.\S+\s*$", text, re.M), text
        assert not leftover_qemu(logs), leftover_qemu(logs)
        assert (tmp_path / "escape.before").read_text() == (tmp_path / "escape.after").read_text(), \
            "the terminal was left in raw mode"
        print(f"~. left the shell and memhp in {left_after:.1f}s")
        _tmux(sock, "kill-session", "-t", "memhp")

        logs = _boot_in_tmux(sock, tmp_path, "panic")
        _tmux(sock, "send-keys", "-t", "memhp", "-l", "echo c > /proc/sysrq-trigger")
        _tmux(sock, "send-keys", "-t", "memhp", "Enter")
        t0 = time.monotonic()
        text = _wait_pane(sock, r"MEMHP-EXIT=\d+", 60)
        assert "MEMHP-EXIT=1" in text, text
        assert re.search(r"memhp: error: .*(panic|sysrq)", text), text
        assert not leftover_qemu(logs), leftover_qemu(logs)
        assert (tmp_path / "panic.before").read_text() == (tmp_path / "panic.after").read_text()
        print(f"panic under the shell reported in {time.monotonic() - t0:.1f}s")
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True, timeout=20)


def test_paused_guest_ends_the_shell_and_a_wedged_exec_is_bounded(vm):
    """VM.shell() on a real pseudo-terminal: a typed command runs in the guest; when the guest
    is paused (QMP stop) the shell returns by itself, and the terminal is put back.
    Then the guest is paused right after an SSH channel opened, so paramiko's exec_command
    waits for a reply that cannot come (it has no timeout of its own): the watchdog closes
    the transport and the command gives HANG within its deadline plus the grace."""
    import pty
    import termios
    import threading
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    ended: dict = {}
    t = threading.Thread(target=lambda: ended.setdefault("why", vm.shell(slave, slave, term="vt100")), daemon=True)
    try:
        t.start()
        seen, deadline = b"", time.monotonic() + 60
        os.set_blocking(master, False)
        sent = False
        while b"7-from-the-shell" not in seen:
            assert time.monotonic() < deadline, f"no answer from the guest's shell: {seen[-500:]!r}"
            try:
                seen += os.read(master, 65536)
            except BlockingIOError:
                time.sleep(0.1)
            if not sent and b"memhp-guest# " in seen:
                os.write(master, b"echo $((3+4))-from-the-shell\r")
                sent = True
        vm.qmp.execute("stop")
        t0 = time.monotonic()
        t.join(10)
        assert not t.is_alive(), "the shell did not notice the paused guest within 10 s"
        assert ended["why"] == "the guest is paused (QMP STOP)", ended
        print(f"paused guest noticed in {time.monotonic() - t0:.1f}s")
        assert termios.tcgetattr(slave) == before, "the terminal was left in raw mode"
        vm.qmp.execute("cont")

        ssh = vm.guest._ssh
        opened = ssh._open_channel

        def open_then_pause(timeout):   # the fault, injected between channel open and exec
            chan = opened(timeout)
            vm.qmp.execute("stop")
            return chan
        ssh._open_channel = open_then_pause
        t0 = time.monotonic()
        with pytest.raises(Hang, match="over SSH"):
            ssh.run_bytes("true", timeout=3)
        took = time.monotonic() - t0
        del ssh._open_channel
        assert 3 <= took < 3 + WATCHDOG_GRACE_S + 5, f"wedged exec ended after {took:.1f}s"
        print(f"wedged exec_command: HANG after {took:.1f}s (deadline 3 s + {WATCHDOG_GRACE_S} s grace)")
        vm.qmp.execute("cont")
        assert vm.guest.run("echo back", timeout=60).stdout == "back\n"   # reconnects
    finally:
        if vm.machine.paused():
            vm.qmp.execute("cont")
        os.close(master)
        os.close(slave)
