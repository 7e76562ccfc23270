"""harness.kernels.kbuild pure parts: patch-output parsing, cache keys, host checks, argument errors."""
import subprocess
from pathlib import Path

import pytest

from harness.kernels import kbuild
from harness.errors import HostToolMissing, KernelError, PatchError

DATA = Path(__file__).resolve().parent.parent / "data"
PATCHES = DATA / "patches"


def test_parse_patch_failure_hunk_failed():
    out = (PATCHES / "output-hunk-failed.txt").read_text()
    # the first file (mm/Kconfig) applied; the rejected one is the second
    assert kbuild.parse_patch_failure(out) == ("mm/memory_hotplug.c", "hunk #1 FAILED at 1330")


def test_parse_patch_failure_no_file():
    out = (PATCHES / "output-no-file.txt").read_text()
    assert kbuild.parse_patch_failure(out) == ("mm/no_such_file.c", "file to patch not found")


def test_parse_patch_failure_reversed():
    out = (PATCHES / "output-reversed.txt").read_text()
    assert kbuild.parse_patch_failure(out) == ("mm/memory_hotplug.c",
                                               "reversed (or previously applied) patch")


def test_parse_patch_failure_odd_input():
    assert kbuild.parse_patch_failure("") == (None, None)
    assert kbuild.parse_patch_failure("patching file a.c\n") == (None, None)
    assert kbuild.parse_patch_failure("Hunk #3 FAILED at 7.\n") == (None, "hunk #3 FAILED at 7")
    out = "patching file 'with space.c'\nHunk #2 FAILED at 9 (different line endings).\n"
    assert kbuild.parse_patch_failure(out) == ("with space.c", "hunk #2 FAILED at 9")


def test_patched_files():
    assert kbuild.patched_files("patching file mm/a.c\nHunk #1 succeeded at 3 (offset 1 line).\n"
                                "patching file include/b.h\n") == ["mm/a.c", "include/b.h"]


def _tree(tmp_path: Path) -> Path:
    t = tmp_path / "linux"
    (t / "mm").mkdir(parents=True)
    (t / "Makefile").write_text("VERSION = 6\n")
    (t / "mm" / "a.c").write_text("int a;\nint b;\nint c;\n")
    return t


def _patch(tmp_path: Path, name: str, old: str, new: str) -> Path:
    p = tmp_path / name
    p.write_text(f"--- a/mm/a.c\n+++ b/mm/a.c\n@@ -1,3 +1,3 @@\n int a;\n-{old}\n+{new}\n int c;\n")
    return p


def test_tree_key_plain_tree_changes_on_edit(tmp_path):
    t = _tree(tmp_path)
    k1 = kbuild.tree_key(t)
    assert kbuild.tree_key(t) == k1
    (t / "mm" / "a.c").write_text("int a;\nint B;\nint c;\n")
    assert kbuild.tree_key(t) != k1
    k2 = kbuild.tree_key(t)
    (t / "mm" / "a.o").write_text("object")     # build outputs do not count
    assert kbuild.tree_key(t) == k2


def test_tree_key_stamp(tmp_path):
    t = _tree(tmp_path)
    (t / kbuild.STAMP).write_text("linux-source-6.1 6.1.192-2\n")
    assert kbuild.tree_key(t) == "stamp:linux-source-6.1 6.1.192-2"


def test_tree_key_git(tmp_path):
    t = _tree(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], cwd=t, check=True)
    subprocess.run(git + ["add", "."], cwd=t, check=True)
    subprocess.run(git + ["commit", "-qm", "x"], cwd=t, check=True)
    k1 = kbuild.tree_key(t)
    assert k1.startswith("git:") and kbuild.tree_key(t) == k1
    (t / "mm" / "a.c").write_text("changed\n")
    assert kbuild.tree_key(t) != k1


def test_keys_stable_and_sensitive(tmp_path):
    f1 = tmp_path / "a.config"
    f1.write_text("CONFIG_A=y\n")
    f2 = tmp_path / "b.config"
    f2.write_text("CONFIG_B=y\n")
    k = kbuild.dir_key("stamp:x", "tinyconfig", [f1, f2], "gcc 12")
    assert k == kbuild.dir_key("stamp:x", "tinyconfig", [f1, f2], "gcc 12")
    assert k != kbuild.dir_key("stamp:y", "tinyconfig", [f1, f2], "gcc 12")
    assert k != kbuild.dir_key("stamp:x", "defconfig", [f1, f2], "gcc 12")
    assert k != kbuild.dir_key("stamp:x", "tinyconfig", [f1, f2], "gcc 13")
    assert k != kbuild.dir_key("stamp:x", "tinyconfig", [f1], "gcc 12")
    f2.write_text("CONFIG_B=n\n")
    assert k != kbuild.dir_key("stamp:x", "tinyconfig", [f1, f2], "gcc 12")
    p = _patch(tmp_path, "p.patch", "int b;", "int B;")
    b = kbuild.build_key(k, [p])
    assert b == kbuild.build_key(k, [p]) and b != kbuild.build_key(k, [])
    p.write_text(p.read_text().replace("int B;", "int BB;"))
    assert kbuild.build_key(k, [p]) != b


def test_apply_patches_dry_runs_and_rolls_back(tmp_path):
    pristine = _tree(tmp_path)
    src = tmp_path / "src"
    kbuild._copy_tree(pristine, src)
    good = _patch(tmp_path, "0001-good.patch", "int b;", "int B;")
    bad = _patch(tmp_path, "0002-bad.patch", "int nothing;", "int x;")
    with pytest.raises(PatchError) as e:
        kbuild.apply_patches(src, pristine, [good, bad])
    assert "0002-bad.patch" in str(e.value) and "mm/a.c" in str(e.value) and "hunk #1 FAILED" in str(e.value)
    # the good patch was rolled back, no .rej/.orig left
    assert (src / "mm" / "a.c").read_text() == (pristine / "mm" / "a.c").read_text()
    assert sorted(p.name for p in (src / "mm").iterdir()) == ["a.c"]
    assert kbuild.apply_patches(src, pristine, [good]) == ["mm/a.c"]
    assert "int B;" in (src / "mm" / "a.c").read_text()
    assert "int b;" in (pristine / "mm" / "a.c").read_text()


def test_restore_deletes_files_a_patch_created(tmp_path):
    pristine = _tree(tmp_path)
    src = tmp_path / "src"
    kbuild._copy_tree(pristine, src)
    (src / "mm" / "new.c").write_text("x")
    (src / "mm" / "a.c").write_text("patched")
    kbuild._restore(src, pristine, ["mm/new.c", "mm/a.c"])
    assert not (src / "mm" / "new.c").exists()
    assert (src / "mm" / "a.c").read_text() == (pristine / "mm" / "a.c").read_text()


def test_host_tool_missing_names_package():
    with pytest.raises(HostToolMissing, match="apt-get install memhp-no-such-pkg"):
        kbuild.check_host_tools({"memhp-no-such-tool": "memhp-no-such-pkg"}, {})
    with pytest.raises(HostToolMissing, match="libnothing-dev"):
        kbuild.check_host_tools({}, {"/nonexistent/x.h": "libnothing-dev"})


def test_bad_arguments(tmp_path):
    with pytest.raises(KernelError, match="6.1, 6.12"):
        kbuild.resolve_debian_src("5.10", cache=tmp_path)
    with pytest.raises(KernelError, match="6.1, 6.12"):
        kbuild.source_tree("6.2", cache=tmp_path)
    with pytest.raises(KernelError, match="not a kernel source tree"):
        kbuild.build(tmp_path, cache=tmp_path)
    with pytest.raises(KernelError, match="tinyconfig, defconfig"):
        kbuild.build(tmp_path, base="allyesconfig", cache=tmp_path)


def test_default_fragments_exclude_debug():
    names = [f.name for f in kbuild.default_fragments()]
    assert "memhp.config" in names and "debug.config" not in names
