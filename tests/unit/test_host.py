"""harness.host: deadlines and process-group kills on real processes, apt record parsing, .deb checks."""
from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import List, Tuple

import pytest

from harness import host
from harness.errors import HostCommandError, HostCommandTimeout, HostToolMissing

APT_SHOW = """Package: linux-image-6.1.0-56-cloud-amd64-unsigned
Source: linux
Version: 6.1.192-2
Installed-Size: 61062
Architecture: amd64
Filename: pool/updates/main/l/linux/linux-image-6.1.0-56-cloud-amd64-unsigned_6.1.192-2_amd64.deb
Size: 26714428
MD5sum: 0123456789abcdef0123456789abcdef
SHA256: 7FF7FC8DA85D313242C20698C6B34542AEA447673C7C1975B0D38BD6005100B5
Description-en: Linux 6.1 for x86-64 cloud
 Size: 1 (a continuation line must not count)

Package: other
Version: 1
Size: 2
SHA256: ab
"""


def _alive_with(marker: str) -> List[int]:
    """PIDs of live, non-zombie processes whose argv contains marker."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker.encode() not in (d / "cmdline").read_bytes():
                continue
            state = next(ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if "Z" not in state.split()[1]:
            out.append(int(d.name))
    return out


def _sleepers() -> Tuple[List[str], str]:
    """A shell with two sleeps (a background one, like make's compilers); a unique duration marks them."""
    secs = f"300.{uuid.uuid4().int % 10**9:09d}"
    return ["bash", "-c", f"sleep {secs} & sleep {secs}; wait"], secs


def test_timeout_kills_the_whole_group():
    argv, marker = _sleepers()
    with pytest.raises(HostCommandTimeout, match="timed out after 1s"):
        host.run(argv, timeout=1)
    assert _alive_with(marker) == []


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace(monkeypatch):
    monkeypatch.setattr(host, "KILL_GRACE", 0.5)
    argv, marker = _sleepers()
    argv[2] = "trap '' TERM; " + argv[2]        # SIG_IGN is inherited by the sleeps, across exec
    with pytest.raises(HostCommandTimeout):
        host.run(argv, timeout=1)
    assert _alive_with(marker) == []


def test_keyboard_interrupt_while_waiting_kills_the_whole_group():
    """The CLI's SIGTERM/SIGINT handler raises KeyboardInterrupt: run() must take the group down."""
    argv, marker = _sleepers()

    def interrupt(signum, frame):
        assert len(_alive_with(marker)) == 3, "the shell and its two sleeps are not all running"
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            host.run(argv, timeout=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert _alive_with(marker) == []


def test_run_returns_status_and_check_raises_with_output():
    r = host.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    with pytest.raises(HostCommandError, match=r"failing thing failed \(exit 3\): err") as e:
        host.check(["sh", "-c", "echo err >&2; exit 3"], timeout=10, what="failing thing")
    assert e.value.exitcode == 3 and e.value.argv[0] == "sh"


def test_run_log_and_bytes(tmp_path):
    with open(tmp_path / "log", "w") as fh:
        r = host.run(["sh", "-c", "echo a; echo b >&2"], timeout=10, log=fh)
    assert r.returncode == 0 and (tmp_path / "log").read_text() == "a\nb\n"
    assert host.run(["cat"], input=b"\xff\x00", text=False, timeout=10).stdout == b"\xff\x00"


def test_missing_program_and_tools_name_the_package():
    with pytest.raises(HostToolMissing, match="memhp-no-such-program not found"):
        host.run(["memhp-no-such-program"], timeout=5)
    with pytest.raises(HostToolMissing, match="doing x needs memhp-no-such-tool, /nonexistent/x.h: apt-get install "
                                              "libnothing-dev memhp-pkg"):
        host.require({"memhp-no-such-tool": "memhp-pkg", "sh": "dash"}, "doing x", {"/nonexistent/x.h": "libnothing-dev"})


def test_parse_apt_record_and_candidate():
    rec = host.parse_apt_record(APT_SHOW)
    assert rec == host.AptRecord("linux-image-6.1.0-56-cloud-amd64-unsigned", "6.1.192-2", 26714428,
                                 "7ff7fc8da85d313242c20698c6b34542aea447673c7c1975b0d38bd6005100b5")
    assert host.parse_apt_record("") is None
    assert host.parse_apt_record("Package: x\nVersion: 1\nSize: big\nSHA256: ab\n") is None
    assert host.parse_apt_candidate("x:\n  Installed: (none)\n  Candidate: 6.1.192-2\n") == "6.1.192-2"
    assert host.parse_apt_candidate("x:\n  Candidate: (none)\n") is None
    assert host.deb_version(Path("p_1%3a2.0-1_amd64.deb")) == "1:2.0-1"
    assert host.deb_version(Path("odd.deb")) == ""


@pytest.fixture(scope="module")
def real_deb(tmp_path_factory) -> Path:
    """A small real .deb made by dpkg-deb --build."""
    root = tmp_path_factory.mktemp("deb")
    pkg = root / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text("Package: memhp-test\nVersion: 1.0\nArchitecture: all\n"
                                            "Maintainer: memhp <memhp@localhost>\nDescription: test\n")
    (pkg / "usr/share/memhp-test").mkdir(parents=True)
    (pkg / "usr/share/memhp-test/data").write_bytes(os.urandom(20000))
    subprocess.run(["dpkg-deb", "--build", "-Zxz", str(pkg), str(root / "memhp-test_1.0_all.deb")], check=True,
                   capture_output=True)
    return root / "memhp-test_1.0_all.deb"


def _record(p: Path) -> host.AptRecord:
    data = p.read_bytes()
    return host.AptRecord("memhp-test", "1.0", len(data), hashlib.sha256(data).hexdigest())


def test_deb_problem_on_real_debs(real_deb, tmp_path):
    rec = _record(real_deb)
    assert host.deb_problem(real_deb, rec) is None
    cut = tmp_path / "cut.deb"
    cut.write_bytes(real_deb.read_bytes()[:1000])
    assert host.deb_problem(cut, rec) == f"1000 bytes, apt says {rec.size}"
    flipped = bytearray(real_deb.read_bytes())
    flipped[-100] ^= 0xFF
    bad = tmp_path / "flipped.deb"
    bad.write_bytes(bytes(flipped))
    assert host.deb_problem(bad, rec).startswith("SHA256 ")
    # size and hash as announced but not a .deb: only dpkg-deb can tell
    junk = tmp_path / "junk.deb"
    junk.write_bytes(b"x" * 300)
    assert host.deb_problem(junk, _record(junk)).startswith("dpkg-deb --info: ")
    assert host.deb_problem(tmp_path / "missing.deb", rec).startswith("cannot read it")


def test_kill_9_of_memhp_kills_the_program_and_its_heirs_keep_the_lock(tmp_path):
    """memhp SIGKILLed (no cleanup): the program it ran dies with it (pdeathsig), and what that
    program started keeps the cache lock it inherited until it exits, so no second build starts
    in a folder an orphaned compiler still writes."""
    argv, marker = _sleepers()
    lock = tmp_path / "lock"
    code = ("import sys\nsys.path.insert(0, sys.argv[1])\nfrom pathlib import Path\nfrom harness import cache, host\n"
            "with cache.locked(Path(sys.argv[2])) as fd:\n"
            f"    host.run({argv!r}, timeout=300, die_with_parent=True, pass_fds=(fd,))\n")
    memhp = subprocess.Popen([sys.executable, "-c", code, str(Path(host.__file__).parents[1]), str(lock)])

    def started() -> List[int]:
        return [p for p in _alive_with(marker) if p != memhp.pid]     # memhp's own argv names the marker
    try:
        deadline = time.monotonic() + 30
        while len(started()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        procs = started()
        assert len(procs) == 3, "bash and its two sleeps did not start"
        shell = next(p for p in procs if Path(f"/proc/{p}/comm").read_text().strip() == "bash")
        memhp.kill()
        memhp.wait()
        deadline = time.monotonic() + 10
        while shell in _alive_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shell not in _alive_with(marker), "the program outlived memhp's kill -9"
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # the orphaned sleeps hold it
            os.killpg(shell, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _alive_with(marker) and time.monotonic() < deadline:
                time.sleep(0.05)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)          # free once the last one exited
        finally:
            os.close(fd)
    finally:
        memhp.kill()
        memhp.wait()
        for pid in _alive_with(marker):
            os.kill(pid, signal.SIGKILL)
