"""harness.kernels.kbuild on git trees: real git on small repos in tmp_path (no make, no kernel).

The user's repo is checked before and after every operation (status, HEAD,
branch) because the promise is that only its worktree list and object store
change.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import List, Tuple

import pytest

from harness.kernels import kbuild
from harness.errors import KernelBuildError, PatchError

GIT = ["git", "-c", "user.name=Dev", "-c", "user.email=dev@example.org", "-c", "init.defaultBranch=main",
       "-c", "commit.gpgSign=false"]
OLD = 1_000_000_000            # a past mtime (2001) no checkout would write


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(GIT + list(args), cwd=cwd, check=True, capture_output=True, text=True).stdout


def _repo(tmp_path: Path) -> Path:
    """A 'kernel' repo: Makefile, mm/a.c (5 lines), mm/b.c, mm/c.c, one commit on branch main."""
    t = tmp_path / "linux"
    (t / "mm").mkdir(parents=True)
    (t / "Makefile").write_text("VERSION = 6\n")
    (t / "mm" / "a.c").write_text("int a1;\nint a2;\nint a3;\nint a4;\nint a5;\n")
    (t / "mm" / "b.c").write_text("int b;\n")
    (t / "mm" / "c.c").write_text("int c1;\nint c2;\nint c3;\n")
    git(t, "init", "-q")
    git(t, "add", ".")
    git(t, "commit", "-qm", "base")
    return t


def _series(tmp_path: Path, repo: Path, name: str, edits: List[Tuple[str, str, str]]) -> List[Path]:
    """`git format-patch` of one commit per (file, old, new) edit, made in a scratch clone (repo untouched)."""
    scratch = tmp_path / f"scratch-{name}"
    git(tmp_path, "clone", "-q", str(repo), str(scratch))
    for i, (rel, old, new) in enumerate(edits, 1):
        f = scratch / rel
        text = f.read_text()
        assert old in text, (rel, old)
        f.write_text(text.replace(old, new))
        git(scratch, "commit", "-qam", f"{name} part {i}")
    out = tmp_path / f"series-{name}"
    git(scratch, "format-patch", "-q", f"-{len(edits)}", "-o", str(out))
    return sorted(out.glob("*.patch"))


def _user_state(repo: Path) -> Tuple[str, str, str, str]:
    """What the user sees: status (incl. untracked), HEAD, branch, the content of every tracked file's diff."""
    return (git(repo, "status", "--porcelain", "--untracked-files=all"), git(repo, "rev-parse", "HEAD"),
            git(repo, "symbolic-ref", "HEAD"), git(repo, "diff", "HEAD"))


def _prepare(tmp_path: Path, repo: Path) -> Tuple[Path, str]:
    src = tmp_path / "cache" / "kbuild" / "k" / "src"
    head, diff = kbuild.git_state(repo)
    return src, kbuild.prepare_worktree(repo, src, head, diff)


def _subjects(src: Path, base: str) -> List[str]:
    return git(src, "log", "--reverse", "--format=%s", f"{base}..HEAD").splitlines()


# ---------------------------------------------------------------- pure parts

def test_is_mail_patch():
    assert kbuild.is_mail_patch("From 0123abcd Mon Sep 17 00:00:00 2001\nFrom: A <a@b>\nSubject: x\n\n---\n")
    assert kbuild.is_mail_patch("From: A <a@b>\nSubject: [PATCH] x\n  folded\nDate: now\n\nbody\n--- a/x\n")
    assert not kbuild.is_mail_patch("--- a/mm/a.c\n+++ b/mm/a.c\n@@ -1 +1 @@\n-x\n+y\n")
    assert not kbuild.is_mail_patch("diff --git a/mm/a.c b/mm/a.c\nindex 1..2 100644\n--- a/mm/a.c\n")
    assert not kbuild.is_mail_patch("Subject: no sender\n\n--- a/x\n")     # headers but no From:
    assert not kbuild.is_mail_patch("")
    assert not kbuild.is_mail_patch("Fix: a note, then\n--- a/x\n+++ b/x\n")


def test_parse_git_failure_am_hunk():
    # git 2.39 `git am`, stderr then stdout as combined by apply_series_git
    out = ("error: patch failed: mm/memory_hotplug.c:1330\n"
           "error: mm/memory_hotplug.c: patch does not apply\n"
           "hint: Use 'git am --show-current-patch=diff' to see the failed patch\n"
           "Applying: mm: first\nApplying: mm/memory_hotplug: second\n"
           "Patch failed at 0002 mm/memory_hotplug: second\n"
           "When you have resolved this problem, run \"git am --continue\".\n")
    f = kbuild.parse_git_failure(out)
    assert f == ("mm/memory_hotplug.c", 1330, "hunk does not apply", "0002 mm/memory_hotplug: second")
    assert f.where() == "mm/memory_hotplug.c:1330"


def test_parse_git_failure_file_level():
    f = kbuild.parse_git_failure("error: mm/nofile.c: does not exist in index\nPatch failed at 0001 nofile\n")
    assert f == ("mm/nofile.c", None, "does not exist in index", "0001 nofile") and f.where() == "mm/nofile.c"
    f = kbuild.parse_git_failure("error: mm/b.c: already exists in working directory\n")
    assert f.where() == "mm/b.c" and f.detail == "already exists in working directory"


def test_parse_git_failure_odd_input():
    assert kbuild.parse_git_failure("") == (None, None, None, None)
    assert kbuild.parse_git_failure("Applying: x\n").where() is None
    assert kbuild.parse_git_failure("Patch is empty.\n").detail == "patch is empty (a cover letter?)"
    assert kbuild.parse_git_failure("error: corrupt patch at line 7\n").detail == "corrupt patch at line 7"
    assert kbuild.parse_git_failure("Patch format detection failed.\n").detail == "not a patch git am recognises"


def test_plain_tree_keys_unchanged(tmp_path):
    """Golden values computed before git support: cached builds of plain trees must stay valid."""
    frag = tmp_path / "memhp.config"
    frag.write_text("CONFIG_MEMORY_HOTPLUG=y\n")
    dk = kbuild.dir_key("stamp:linux-source-6.1 6.1.192-2", "tinyconfig", [frag], "gcc (Debian 12.2.0-14) 12.2.0")
    assert dk == "ab1c2b770b7aae6d"
    p = tmp_path / "0001-x.patch"
    p.write_text("--- a/mm/a.c\n+++ b/mm/a.c\n")
    assert kbuild.build_key(dk, [p]) == "c8b3d22fd8c1f6e4"
    t = tmp_path / "linux"
    t.mkdir()
    (t / "Makefile").write_text("VERSION = 6\n")
    (t / "a.c").write_text("x")
    for f in (t / "Makefile", t / "a.c"):
        os.utime(f, ns=(10**18, 10**18))
    assert kbuild.tree_key(t) == "tree:e7cc89a0a92b1d1a"


def test_tree_inside_a_repo_is_plain(tmp_path):
    """A linux-source unpacked in someone's checkout keeps the plain-tree path and key."""
    outer = tmp_path / "outer"
    (outer / "linux").mkdir(parents=True)
    (outer / "linux" / "Makefile").write_text("VERSION = 6\n")
    git(outer, "init", "-q")
    assert not kbuild.is_git_tree(outer / "linux")
    assert kbuild.tree_key(outer / "linux").startswith("tree:")
    assert kbuild.is_git_tree(outer)
    # a .git git cannot use (here an empty folder) makes git find the outer repo: still a plain tree
    (outer / "linux" / ".git").mkdir()
    assert not kbuild.is_git_tree(outer / "linux")
    assert kbuild.tree_key(outer / "linux").startswith("tree:")


# ---------------------------------------------------------------- real git

def test_series_applies_in_order_with_git_am(tmp_path):
    repo = _repo(tmp_path)
    before = _user_state(repo)
    # part 2 edits the line part 1 wrote: out of order it cannot apply
    pats = _series(tmp_path, repo, "s", [("mm/a.c", "int a2;", "int A2;"), ("mm/a.c", "int A2;", "long A2;")])
    assert [p.name for p in pats] == ["0001-s-part-1.patch", "0002-s-part-2.patch"]
    src, base = _prepare(tmp_path, repo)
    assert (src / ".git").is_file()                                   # a worktree, not a copy
    assert base == git(repo, "rev-parse", "HEAD").strip()              # nothing uncommitted: no extra commit
    assert str(src) in git(repo, "worktree", "list")
    head = kbuild.apply_series_git(src, base, pats)
    assert head == git(src, "rev-parse", "HEAD").strip()
    assert _subjects(src, base) == ["s part 1", "s part 2"]
    assert git(src, "log", "-1", "--format=%an").strip() == "Dev"      # git am kept the author
    assert "long A2;" in (src / "mm" / "a.c").read_text()
    assert git(src, "status", "--porcelain") == ""
    assert _user_state(repo) == before
    assert "int a2;" in (repo / "mm" / "a.c").read_text()


def test_failing_second_patch_names_it_and_resets(tmp_path):
    repo = _repo(tmp_path)
    good = _series(tmp_path, repo, "good", [("mm/c.c", "int c2;", "int C2;")])[0]
    # made against a different a.c, so its hunk at line 3 (old file) is rejected here
    other = tmp_path / "other"
    git(tmp_path, "clone", "-q", str(repo), str(other))
    (other / "mm" / "a.c").write_text("int a1;\nint a2;\nint x3;\nint a4;\nint a5;\n")
    git(other, "commit", "-qam", "diverge")
    bad = _series(tmp_path, other, "bad", [("mm/a.c", "int x3;", "int X3;")])[0]
    bad = bad.rename(tmp_path / "0002-bad.patch")
    before = _user_state(repo)
    src, base = _prepare(tmp_path, repo)
    with pytest.raises(PatchError) as e:
        kbuild.apply_series_git(src, base, [good, bad], tree=repo)
    msg = str(e.value)
    print(msg)
    assert "0002-bad.patch" in msg and "mm/a.c:1" in msg and "git am" in msg and good.name not in msg
    assert "0001 bad part 1" in msg                                     # git's "Patch failed at"
    assert git(src, "rev-parse", "HEAD").strip() == base               # good's commit is gone too
    assert git(src, "status", "--porcelain", "--untracked-files=all") == ""
    assert "int c2;" in (src / "mm" / "c.c").read_text()
    assert not Path(git(src, "rev-parse", "--absolute-git-dir").strip(), "rebase-apply").exists()
    assert _user_state(repo) == before
    # and the worktree is usable again
    assert kbuild.apply_series_git(src, base, [good]) != base


def test_uncommitted_changes_are_the_base(tmp_path):
    repo = _repo(tmp_path)
    (repo / "mm" / "b.c").write_text("int b_unstaged;\n")
    (repo / "mm" / "new.c").write_text("int staged_new;\n")
    git(repo, "add", "mm/new.c")
    (repo / "untracked.c").write_text("not in git diff HEAD\n")
    before = _user_state(repo)
    src, base = _prepare(tmp_path, repo)
    user_head = git(repo, "rev-parse", "HEAD").strip()
    assert base != user_head
    assert git(src, "log", "-1", "--format=%s%n%P", base).splitlines() == [kbuild.WORKTREE_SUBJECT, user_head]
    assert (src / "mm" / "b.c").read_text() == "int b_unstaged;\n"
    assert (src / "mm" / "new.c").read_text() == "int staged_new;\n"
    assert not (src / "untracked.c").exists()                          # documented: git add -N to include it
    # a series made against the user's committed HEAD applies on top of the changes
    pats = _series(tmp_path, repo, "s", [("mm/c.c", "int c3;", "int C3;")])
    kbuild.apply_series_git(src, base, pats)
    assert _subjects(src, user_head) == [kbuild.WORKTREE_SUBJECT, "s part 1"]
    assert (src / "mm" / "b.c").read_text() == "int b_unstaged;\n"
    assert _user_state(repo) == before
    # same state again: the worktree is reused, not rebuilt
    head, diff = kbuild.git_state(repo)
    marker = src / "mm" / "c.c"
    ino = marker.stat().st_ino
    assert kbuild.prepare_worktree(repo, src, head, diff) == base
    assert marker.stat().st_ino == ino


def test_switching_series_keeps_untouched_mtimes(tmp_path):
    repo = _repo(tmp_path)
    series_a = _series(tmp_path, repo, "a", [("mm/a.c", "int a4;", "int A4;")])
    series_b = _series(tmp_path, repo, "b", [("mm/c.c", "int c1;", "int C1;")])
    src, base = _prepare(tmp_path, repo)
    kbuild.apply_series_git(src, base, series_a)
    for rel in ("mm/a.c", "mm/b.c"):
        os.utime(src / rel, (OLD, OLD))
    kbuild.apply_series_git(src, base, series_b)
    assert _subjects(src, base) == ["b part 1"]
    assert (src / "mm" / "b.c").stat().st_mtime == OLD                   # neither series touches it
    assert (src / "mm" / "a.c").stat().st_mtime != OLD                   # series a's change undone: rebuild
    assert "int a4;" in (src / "mm" / "a.c").read_text()
    assert "int C1;" in (src / "mm" / "c.c").read_text()


def test_plain_diff_applies_with_git_apply(tmp_path):
    repo = _repo(tmp_path)
    before = _user_state(repo)
    plain = tmp_path / "fix-b.diff"
    plain.write_text("--- a/mm/b.c\n+++ b/mm/b.c\n@@ -1 +1,2 @@\n int b;\n+int b2;\n")
    mail = _series(tmp_path, repo, "m", [("mm/c.c", "int c2;", "int C2;")])
    src, base = _prepare(tmp_path, repo)
    kbuild.apply_series_git(src, base, [plain] + mail)
    assert _subjects(src, base) == ["fix-b.diff", "m part 1"]
    assert (src / "mm" / "b.c").read_text() == "int b;\nint b2;\n"
    assert git(src, "log", "-1", "--format=%an", "HEAD~1").strip() == "memhp"
    # a plain diff that does not apply names the file and line, and resets
    bad = tmp_path / "bad.diff"
    bad.write_text("--- a/mm/c.c\n+++ b/mm/c.c\n@@ -2 +2 @@\n-int nothing;\n+int x;\n")
    with pytest.raises(PatchError) as e:
        kbuild.apply_series_git(src, base, [plain, bad], tree=repo)
    assert "bad.diff" in str(e.value) and "mm/c.c:2" in str(e.value) and "git apply" in str(e.value)
    assert git(src, "rev-parse", "HEAD").strip() == base
    assert (src / "mm" / "b.c").read_text() == "int b;\n"
    assert _user_state(repo) == before


def test_broken_or_stale_src_is_rebuilt(tmp_path):
    """A plain copy from an older memhp, or a deleted cache with a stale registration."""
    repo = _repo(tmp_path)
    src = tmp_path / "cache" / "kbuild" / "k" / "src"
    src.mkdir(parents=True)
    (src / "Makefile").write_text("an old plain copy\n")
    head, diff = kbuild.git_state(repo)
    base = kbuild.prepare_worktree(repo, src, head, diff)
    assert (src / ".git").is_file() and (src / "Makefile").read_text() == "VERSION = 6\n"
    shutil.rmtree(tmp_path / "cache")                                  # user deletes the cache
    assert kbuild.prepare_worktree(repo, src, head, diff) == base       # stale registration taken over
    assert git(src, "rev-parse", "HEAD").strip() == base


def test_build_uses_the_worktree(tmp_path, monkeypatch):
    """build() wiring up to the first make: src is a worktree with the series; a bad patch raises first."""
    repo = _repo(tmp_path)
    (repo / "scripts" / "kconfig").mkdir(parents=True)
    (repo / "scripts" / "kconfig" / "merge_config.sh").write_text("exit 1\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "kconfig")
    (repo / "mm" / "b.c").write_text("int dirty;\n")
    before = _user_state(repo)
    monkeypatch.setattr(kbuild, "check_host_tools", lambda *a, **k: None)
    monkeypatch.setattr(kbuild, "compiler_id", lambda: "gcc test")
    pats = _series(tmp_path, repo, "s", [("mm/a.c", "int a1;", "int A1;")])
    cache = tmp_path / "cache"
    # our Makefile has no tinyconfig target, so the build stops at the first make, after the patches
    with pytest.raises(KernelBuildError, match="make tinyconfig"):
        kbuild.build(repo, patches=pats, cache=cache)
    (bdir,) = (cache / "kbuild").iterdir()
    src = bdir / "src"
    assert (src / ".git").is_file()
    assert git(src, "log", "--format=%s", "-2").splitlines() == ["s part 1", kbuild.WORKTREE_SUBJECT]
    assert (src / "mm" / "b.c").read_text() == "int dirty;\n"
    assert "git am" in (bdir / "build.log").read_text()
    bad = tmp_path / "0009-bad.diff"
    bad.write_text("--- a/mm/c.c\n+++ b/mm/c.c\n@@ -2 +2 @@\n-int nothing;\n+int x;\n")
    with pytest.raises(PatchError, match="0009-bad.diff.*mm/c.c:2"):
        kbuild.build(repo, patches=pats + [bad], cache=cache)
    assert git(src, "log", "-1", "--format=%s").strip() == kbuild.WORKTREE_SUBJECT
    assert _user_state(repo) == before


def test_no_three_way_merge_even_if_the_user_config_asks(tmp_path):
    """A patch whose context moved would merge with --3way; memhp refuses it (exactness)."""
    repo = _repo(tmp_path)
    pats = _series(tmp_path, repo, "old", [("mm/a.c", "int a2;", "int A2;")])    # against 'base'
    (repo / "mm" / "a.c").write_text("int a1;\nint a2;\nint a3;\nint a4;\nint a5_changed;\n")
    git(repo, "commit", "-qam", "context moves")
    git(repo, "config", "am.threeWay", "true")
    before = _user_state(repo)
    # the same patch does merge with git's own 3-way (the blobs are in the shared object store)
    probe = tmp_path / "probe"
    git(repo, "worktree", "add", "-q", "--detach", str(probe))
    assert subprocess.run(GIT + ["am", "-q", str(pats[0])], cwd=probe, capture_output=True).returncode == 0
    git(repo, "worktree", "remove", "--force", str(probe))
    src, base = _prepare(tmp_path, repo)
    with pytest.raises(PatchError, match=r"0001-old-part-1\.patch.*mm/a\.c:1: hunk does not apply"):
        kbuild.apply_series_git(src, base, pats)
    assert git(src, "rev-parse", "HEAD").strip() == base
    assert _user_state(repo) == before
