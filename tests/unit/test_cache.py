"""harness.cache: folder modes, the root's owner and mode, publish, stale scratch and run folders."""
from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from harness import cache
from harness.errors import CacheError


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_root_and_new_folders_are_0700(tmp_path):
    root = cache.cache_root(tmp_path / "a" / "memhp")
    assert _mode(root) == 0o700
    made = cache.ensure_dir(root / "kernels" / "x" / "y")
    assert [_mode(p) for p in (root / "kernels", root / "kernels/x", made)] == [0o700] * 3
    with cache.scratch_dir(root / "images", "t") as tmp:
        assert _mode(tmp) == 0o700 and tmp.name.startswith(f".tmp.{os.getpid()}.t.")
    assert not tmp.exists()


def test_root_writable_by_others_is_refused(tmp_path):
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o777)
    with pytest.raises(CacheError, match=r"is group- or world-writable \(mode 0777\); run chmod go-w"):
        cache.cache_root(root)
    os.chmod(root, 0o775)
    with pytest.raises(CacheError, match="mode 0775"):
        cache.cache_root(root)
    os.chmod(root, 0o755)          # readable by others is fine
    assert cache.cache_root(root) == root


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_root_of_another_user_is_refused(tmp_path):
    root = tmp_path / "theirs"
    root.mkdir(mode=0o700)
    os.chown(root, 65534, 65534)
    with pytest.raises(CacheError, match=r"belongs to uid 65534, not to you \(uid 0\)"):
        cache.cache_root(root)


def test_check_root_owner_pure():
    cache.check_root_owner(Path("/x"), os.geteuid(), 0o40700)
    with pytest.raises(CacheError):
        cache.check_root_owner(Path("/x"), os.geteuid() + 1, 0o40700)
    with pytest.raises(CacheError):
        cache.check_root_owner(Path("/x"), os.geteuid(), 0o40720)


def test_publish_keeps_a_complete_entry_and_replaces_a_leftover(tmp_path):
    dest = tmp_path / "entry"
    with cache.scratch_dir(tmp_path, "a") as a:
        (a / "f").write_text("first")
        assert cache.publish(a, dest, "one") is True
    assert (dest / "f").read_text() == "first" and (dest / cache.COMPLETE).read_text() == "one\n"
    with cache.scratch_dir(tmp_path, "b") as b:
        (b / "f").write_text("second")
        assert cache.publish(b, dest) is False          # the finished entry wins
        assert not b.exists()
    assert (dest / "f").read_text() == "first"
    leftover = tmp_path / "half"
    leftover.mkdir()
    (leftover / "junk").write_text("")
    with cache.scratch_dir(tmp_path, "c") as c:
        (c / "f").write_text("third")
        assert cache.publish(c, leftover) is True
    assert sorted(p.name for p in leftover.iterdir()) == [cache.COMPLETE, "f"]


def test_stale_scratch_only_of_dead_pids(tmp_path):
    dead = _dead_pid()
    gone = [tmp_path / f".tmp.{dead}.extract.abc", tmp_path / "kernels" / f".tmp.{dead}.deb.x",
            tmp_path / "kbuild" / "k" / f".tmp.{dead}.copy.y", tmp_path / f".tmp.{dead}.write-probe"]
    live = [tmp_path / "images" / f".tmp.{os.getpid()}.image.z", tmp_path / "images" / "abc",
            tmp_path / "kernels" / ".tmp.notapid.x"]
    for p in gone[:3] + live:
        p.mkdir(parents=True)
    gone[3].write_text("")
    assert sorted(cache.stale_scratch(tmp_path)) == sorted(gone)
    removed = cache.clean_stale(tmp_path, tmp_path / "no-tmp")
    assert sorted(removed) == sorted(gone) and all(p.exists() for p in live)


def test_stale_run_dirs(tmp_path):
    old = time.time() - 2 * cache.RUN_DIR_MAX_AGE

    def run_dir(name: str, pid=None, age: float = 0.0) -> Path:
        d = tmp_path / name
        d.mkdir()
        if pid is not None:
            (d / cache.RUN_DIR_PID).write_text(f"{pid}\n")
        if age:
            os.utime(d, (age, age))
        return d
    dead_owner = run_dir("memhp-dead0001", pid=_dead_pid())
    live_owner = run_dir("memhp-live0001", pid=os.getpid(), age=old)
    old_unowned = run_dir("memhp-old00001", age=old)
    new_unowned = run_dir("memhp-new00001")
    in_use = run_dir("memhp-used0001", age=old)
    other_name = run_dir("memhp-it-abcdefgh", age=old)       # the integration tests' session folder
    user = subprocess.Popen(["sh", "-c", "sleep 60", str(in_use / "console.sock")],   # like QEMU's argv
                            start_new_session=True)
    try:
        assert sorted(cache.stale_run_dirs(tmp_path)) == sorted([dead_owner, old_unowned])
    finally:
        os.killpg(user.pid, 9)
        user.wait()
    assert live_owner.exists() and new_unowned.exists() and other_name.exists()


def test_make_run_dir_is_recognised(tmp_path, monkeypatch):
    monkeypatch.setattr(cache.tempfile, "tempdir", str(tmp_path))
    d = cache.make_run_dir()
    assert cache.RUN_DIR_RE.match(d.name) and _mode(d) == 0o700
    assert (d / cache.RUN_DIR_PID).read_text() == f"{os.getpid()}\n"
    assert cache.stale_run_dirs(tmp_path) == []            # its owner (this process) is alive
    (d / cache.RUN_DIR_PID).write_text(f"{_dead_pid()}\n")
    assert cache.stale_run_dirs(tmp_path) == [d]


def test_run_dir_parent_keeps_qemu_socket_paths_under_108_bytes(monkeypatch, tmp_path):
    import tempfile
    from harness import cache
    short = tmp_path / "s"
    short.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    if len(str(short)) <= cache.SOCKET_TMP_MAX:
        assert cache.run_dir_parent() == short
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    assert cache.run_dir_parent() == Path("/tmp")
    d = cache.make_run_dir()
    try:
        assert len(str(d / "console.sock")) <= 107 and d.parent == Path("/tmp")
    finally:
        import shutil
        shutil.rmtree(d)
