"""Folders memhp creates for logs, artifacts and QEMU runs are private (0700), and a machine's run
folder carries its owner's pid from the start (so clean_stale() can remove it once that pid is gone)."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from harness import cache, cli

ROOT = Path(__file__).resolve().parents[2] / "harness"
FRONT = ("cli.py", "plugin.py", "vm/machine.py")


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node


@pytest.mark.parametrize("rel", FRONT)
def test_no_bare_mkdir_in_the_front_ends(rel):
    """Every folder they create goes through cache.ensure_dir (0700), never Path.mkdir (umask: 0755)."""
    bad = [f"{rel}:{c.lineno}: {ast.unparse(c)[:80]}" for c in _calls(ROOT / rel)
           if isinstance(c.func, ast.Attribute) and c.func.attr in ("mkdir", "makedirs")]
    assert not bad, bad


@pytest.mark.parametrize("rel", FRONT)
def test_run_folders_come_from_make_run_dir(rel):
    """A $TMPDIR/memhp-* folder made with mkdtemp has no pid file until someone writes one; a later
    run's clean_stale() could remove it (or keep a dead one for RUN_DIR_MAX_AGE). make_run_dir()
    writes the pid at once."""
    bad = [f"{rel}:{c.lineno}" for c in _calls(ROOT / rel)
           if isinstance(c.func, ast.Attribute) and c.func.attr == "mkdtemp"
           and any(k.arg == "prefix" and isinstance(k.value, ast.Constant) and k.value.value == "memhp-"
                   for k in c.keywords)]
    assert not bad, bad


def test_cli_folders_are_0700_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        made = cli._mk(tmp_path / "logs" / "a" / "b")
    finally:
        os.umask(old)
    for d in (tmp_path / "logs", tmp_path / "logs" / "a", made):
        assert d.stat().st_mode & 0o777 == 0o700, (d, oct(d.stat().st_mode))


def test_a_run_folder_of_a_dead_pid_is_stale_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(cache.tempfile, "tempdir", None)
    d = cache.make_run_dir()
    assert d.parent == tmp_path and d.stat().st_mode & 0o777 == 0o700
    assert cache.stale_run_dirs(tmp_path) == []                 # ours: alive
    (d / cache.RUN_DIR_PID).write_text("999999999\n")            # a pid that cannot exist
    assert cache.stale_run_dirs(tmp_path) == [d]
