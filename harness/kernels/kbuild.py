"""Build a kernel from a source tree with memhp's kconfig fragments and optional patches.

Layout in the cache folder (cache_root()):

  debs/linux-source-<ver>_<debver>_all.deb  the package, verified against apt's size and SHA256
  src/linux-source-<ver>_<debver>/       Debian's linux-source, unpacked once (.complete stamp)
  kbuild/<dir-key>/src/                  the private source dir (the user's tree is never touched):
                                         a git worktree of the user's repo, or a copy of a plain tree
  kbuild/<dir-key>/obj/                  the object tree (make O=obj), reused by every patch series
  kbuild/<dir-key>/applied.json          which patch series is applied to src/ (plain: and the files it touched)
  kbuild/<dir-key>/worktree.json         git trees: the commit src/ was made from and its base commit
  builds/<key>/                          one finished build: bzImage, config, build.log, modules/ (if any)

dir-key hashes the tree state, base config, every fragment's content and the
compiler; key adds every patch's content. Patches are applied in the order given.

Plain trees (Debian's linux-source, a tarball): src/ is a full copy. A patch
series is applied with `patch -p1` (each patch dry-run first) after the files
the previous series touched are restored from the pristine tree with a fresh
mtime, so a one-file patch rebuilds in seconds instead of minutes. Their keys
(a stamp, or the files' sizes and mtimes) are unchanged from memhp-kbuild-1.

Git trees (the tree is the top of a git work tree): src/ is `git worktree add
--detach src <HEAD>` of the user's repo (shared object store, no copy of the
history), made once per tree key. The user's uncommitted changes (`git diff
HEAD`, which the key hashes) are committed there as "memhp: working-tree
changes", so the series applies on top of exactly what the user has;
untracked files are not part of `git diff HEAD`: `git add -N` them to include
them. That commit is the base. A series is applied after `git checkout
--detach <base>` (git rewrites only files that differ, so untouched files keep
their mtimes and make stays incremental): an mbox or `git format-patch` file
with plain `git am` (no 3-way merge: kernel developers expect exactness), any
other diff with `git apply --index` and a commit whose subject is the file
name (no fuzz, unlike `patch -p1`). On a failure `git am --abort`, the
worktree goes back to the base and PatchError names the patch file, the first
failing file:line and, for an mbox, git's "Patch failed at NNNN subject".
The user's work tree, index and branch are never written; the worktree is
registered in the user's repo (`git worktree list` shows it, under
.git/worktrees/src*) and its commits go to the shared object store. Deleting
the cache leaves stale registrations: `git worktree prune` in the repo clears
them (git gc also does, after gc.worktreePruneExpire).

An flock on kbuild/<dir-key>/lock serialises builds that share a folder. Every program runs
through harness.host: with a timeout, in its own process group, killed with its compilers
when memhp is interrupted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from harness import host
from harness.kernels.artifact import KernelArtifact
from harness.kernels.debuginfo import has_debug_info
from harness.cache import (cache_root, ensure_dir, entry_lock, hash_inputs, is_complete, locked, publish,
                           scratch_dir)
from harness.errors import (ConfigSymbolsDropped, HostCommandTimeout, KernelBuildError, KernelError,
                            HostToolMissing, PackageError, PatchError)
from harness.kernels.buildphases import LineClock, TimedLines, format_note, split_make
from harness.kernels.kconfig import dropped_symbols, parse_config, parse_fragment

PathLike = Union[str, Path]

KCONFIG_DIR = Path(__file__).resolve().parents[2] / "kconfigs"
DEBIAN_SRC_VERSIONS = ("6.1", "6.12")
BASES = ("tinyconfig", "defconfig")
# The tree's own guest fragment; merged but not checked (it names symbols of other arches).
TREE_FRAGMENTS = ("kernel/configs/kvm_guest.config",)

# program -> Debian package that provides it
HOST_TOOLS = {
    "gcc": "gcc", "make": "make", "bc": "bc", "flex": "flex", "bison": "bison",
    "patch": "patch", "xz": "xz-utils", "perl": "perl", "tar": "tar",
}
# header -> Debian package (objtool and certificate signing need them)
HOST_HEADERS = {"/usr/include/gelf.h": "libelf-dev", "/usr/include/openssl/ssl.h": "libssl-dev"}

STAMP = ".memhp-source"   # written into a tree memhp unpacked: names the package and version


# ---------------------------------------------------------------- host checks

def check_host_tools(tools: Optional[Mapping[str, str]] = None, headers: Optional[Mapping[str, str]] = None) -> None:
    """Raise HostToolMissing naming the Debian packages of every missing build tool."""
    host.require(HOST_TOOLS if tools is None else tools, "kernel build",
                 HOST_HEADERS if headers is None else headers)


def compiler_id() -> str:
    r = host.run(["gcc", "--version"], timeout=host.QUICK_TIMEOUT)
    if r.returncode != 0:
        raise HostToolMissing("kernel build needs gcc: apt-get install gcc")
    return r.stdout.splitlines()[0] if r.stdout else ""


# ---------------------------------------------------------------- patch output parsing

_PATCHING = re.compile(r"^(?:patching|checking) file (?:'([^']+)'|(\S+))")
_HUNK_FAILED = re.compile(r"^Hunk #(\d+) FAILED at (\d+)")
_NO_FILE = re.compile(r"^can't find file to patch at input line (\d+)")
_REVERSED = re.compile(r"^Reversed \(or previously applied\) patch detected")
_HEADER = re.compile(r"^\|?\+\+\+ (?:b/)?(\S+)|^\|?--- (?:a/)?(\S+)")


def parse_patch_failure(output: str) -> Tuple[Optional[str], Optional[str]]:
    """From GNU patch's output, the first file that failed and what failed in it.

    Returns (file, detail), e.g. ("mm/memory_hotplug.c", "hunk #1 FAILED at 1372");
    (None, None) when the output names no failure. Never raises.
    """
    current: Optional[str] = None
    header_file: Optional[str] = None
    lines = output.splitlines()
    for i, line in enumerate(lines):
        m = _PATCHING.match(line)
        if m:
            current = m.group(1) or m.group(2)
            continue
        m = _HEADER.match(line)
        if m:
            name = m.group(1) or m.group(2)
            if name != "/dev/null":
                header_file = name
            continue
        m = _HUNK_FAILED.match(line)
        if m:
            return current, f"hunk #{m.group(1)} FAILED at {m.group(2)}"
        m = _NO_FILE.match(line)
        if m:
            # patch prints the headers after this line; take the next +++/--- name
            for later in lines[i + 1:]:
                h = _HEADER.match(later)
                if h and (h.group(1) or h.group(2)) != "/dev/null":
                    header_file = h.group(1) or h.group(2)
                    break
            return header_file, "file to patch not found"
        if _REVERSED.match(line):
            return current, "reversed (or previously applied) patch"
    return None, None


def patched_files(output: str) -> List[str]:
    """Files a successful `patch` run touched, from its "patching file X" lines."""
    out = []
    for line in output.splitlines():
        m = _PATCHING.match(line)
        if m:
            out.append(m.group(1) or m.group(2))
    return out


# ---------------------------------------------------------------- keys

_BUILD_OUTPUT = re.compile(r"\.(o|a|ko|cmd|mod|mod\.c|order|symvers|d|tmp)$")


def tree_key(tree: Path) -> str:
    """A stable id of a source tree's state.

    git: HEAD + hash of `git diff HEAD`. A tree memhp unpacked: its stamp
    (package and version). Any other tree: the top Makefile plus the
    (path, size, mtime) of every source file, so an edit changes the key.
    """
    tree = Path(tree)
    if is_git_tree(tree):
        return git_tree_key(*git_state(tree))
    stamp = tree / STAMP
    if stamp.is_file():
        return "stamp:" + stamp.read_text().strip()
    if not (tree / "Makefile").is_file():
        raise KernelError(f"{tree} is not a kernel source tree (no Makefile)")
    h = hashlib.sha256((tree / "Makefile").read_bytes())
    for root, dirs, files in os.walk(tree):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith(".") or _BUILD_OUTPUT.search(f):
                continue
            p = Path(root) / f
            try:
                st = p.lstat()
            except OSError:
                continue
            h.update(f"{p.relative_to(tree)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "tree:" + h.hexdigest()[:16]


def default_fragments() -> List[Path]:
    """kconfigs/*.config, sorted (kconfigs/debug/ is opt-in and not included)."""
    return sorted(KCONFIG_DIR.glob("*.config"))


def dir_key(tkey: str, base: str, fragments: Sequence[Path], compiler: str) -> str:
    parts: List[Union[str, Path, bytes]] = ["memhp-kbuild-1", tkey, base, compiler]
    for f in fragments:
        parts += [f.name, f.read_bytes()]
    return hash_inputs(parts)


def build_key(dkey: str, patches: Sequence[Path]) -> str:
    parts: List[Union[str, Path, bytes]] = [dkey]
    for p in patches:
        parts += [p.name, p.read_bytes()]
    return hash_inputs(parts)


# ---------------------------------------------------------------- logging

class _Log:
    """build.log: every command and its output; a failed step raises with the log's tail."""

    def __init__(self, path: Path, lock_fd: Optional[int] = None):
        self.path = path
        self.keep = () if lock_fd is None else (lock_fd,)
        path.write_text("")

    def run(self, argv: Sequence[Union[str, Path]], cwd: Path, env: Optional[Mapping[str, str]] = None,
            what: str = "", timeout: float = host.BUILD_TIMEOUT, lines: Optional[TimedLines] = None) -> None:
        """lines: also keep each output line with its arrival time (the build's phase split)."""
        what = what or str(argv[0])
        with open(self.path, "a") as fh:
            fh.write(f"$ (cd {cwd} && {' '.join(str(a) for a in argv)})\n")
            fh.flush()
            try:
                # make and its compilers die with memhp, and hold the build folder's lock while alive
                if lines is None:
                    r = host.run(argv, cwd=cwd, env=env, log=fh, timeout=timeout, what=what,
                                 die_with_parent=True, pass_fds=self.keep)
                else:
                    with LineClock(fh, lines) as pipe:
                        r = host.run(argv, cwd=cwd, env=env, log=pipe, timeout=timeout, what=what,
                                     die_with_parent=True, pass_fds=self.keep)
            except HostCommandTimeout as e:
                raise KernelBuildError(str(e), str(self.path)) from None
        if r.returncode != 0:
            raise KernelBuildError(f"{what} failed (exit {r.returncode}):\n{self.tail()}", str(self.path))

    def note(self, text: str) -> None:
        with open(self.path, "a") as fh:
            fh.write(text.rstrip("\n") + "\n")

    def tail(self, n: int = 20) -> str:
        lines = self.path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


# ---------------------------------------------------------------- patches

def _restore(src: Path, pristine: Path, files: Sequence[str]) -> None:
    """Put files back as in the pristine tree, with a fresh mtime so make rebuilds them."""
    for rel in files:
        dst, orig = src / rel, pristine / rel
        if orig.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists() or dst.is_symlink():
                dst.unlink()
            shutil.copyfile(orig, dst)
            shutil.copymode(orig, dst)
        elif dst.exists():
            dst.unlink()


def apply_patches(src: Path, pristine: Path, patches: Sequence[Path], log: Optional[_Log] = None) -> List[str]:
    """Apply patches in order to src; return the files touched.

    Each patch is dry-run first; on a failure every file the earlier patches
    touched is restored from pristine and PatchError names the patch and the
    first rejected file and hunk.
    """
    touched: List[str] = []
    for p in patches:
        argv = ["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-i", str(p)]
        dry = host.run(argv + ["--dry-run"], cwd=src, timeout=host.GIT_TIMEOUT)
        if dry.returncode != 0:
            _restore(src, pristine, touched)
            out = dry.stdout + dry.stderr
            if log:
                log.note(f"$ {' '.join(argv)} --dry-run\n{out}")
            f, detail = parse_patch_failure(out)
            where = f"{f}: {detail}" if f else (out.strip().splitlines() or ["no output"])[-1]
            raise PatchError(f"patch {p} does not apply to {pristine}: {where}")
        real = host.run(argv, cwd=src, timeout=host.GIT_TIMEOUT)
        touched += patched_files(real.stdout)
        if log:
            log.note(f"$ {' '.join(argv)}\n{real.stdout}{real.stderr}")
        if real.returncode != 0:   # dry run passed, so this is unexpected; still leave src clean
            _restore(src, pristine, touched)
            raise PatchError(f"patch {p} failed after a clean dry run: {(real.stdout + real.stderr).strip()[-300:]}")
    return touched


# ---------------------------------------------------------------- git trees

# The caller's git environment (e.g. memhp run from a git hook) must not redirect our commands.
_GIT_ENV_DROP = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR",
                 "GIT_PREFIX", "GIT_NAMESPACE", "GIT_CEILING_DIRECTORIES")
# The user's config must not change how a series applies: no hooks, no signing prompt,
# whitespace errors applied as written (as patch -p1 does); am gets --no-3way over am.threeWay.
_GIT_CONFIG = ("-c", "core.hooksPath=/dev/null", "-c", "commit.gpgSign=false", "-c", "apply.whitespace=warn",
               "-c", "advice.detachedHead=false")
GIT_IDENT = ("memhp", "memhp@localhost")
WORKTREE_SUBJECT = "memhp: working-tree changes"
# `git diff HEAD` in a form `git apply` reads whatever the user's diff.* config says
_DIFF_HEAD = ("diff", "HEAD", "--binary", "--no-color", "--no-ext-diff", "--no-textconv", "--submodule=short",
              "--src-prefix=a/", "--dst-prefix=b/")


def _git_raw(args: Sequence[str], cwd: Path, input: Optional[bytes] = None,
             author: bool = False) -> subprocess.CompletedProcess:
    """git with memhp's fixed config and the C locale (its messages are parsed); bytes in and out."""
    env = {k: v for k, v in os.environ.items() if k not in _GIT_ENV_DROP}
    env.update(LC_ALL="C", LANGUAGE="C", GIT_COMMITTER_NAME=GIT_IDENT[0], GIT_COMMITTER_EMAIL=GIT_IDENT[1])
    if author:    # our own commits; git am keeps the patch's author
        env.update(GIT_AUTHOR_NAME=GIT_IDENT[0], GIT_AUTHOR_EMAIL=GIT_IDENT[1])
    return host.run(["git", *_GIT_CONFIG, *args], cwd=cwd, input=input, text=False, env=env,
                    timeout=host.GIT_TIMEOUT, what=f"git {' '.join(args[:2])}")


def _git(args: Sequence[str], cwd: Path, check: bool = True, input: Optional[bytes] = None,
         author: bool = False) -> subprocess.CompletedProcess:
    """_git_raw with text output; check raises KernelBuildError with git's message."""
    r = _git_raw(args, cwd, input, author)
    out = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                      r.stderr.decode(errors="replace"))
    if check and r.returncode != 0:
        raise KernelBuildError(f"git {' '.join(args)} in {cwd} failed (exit {r.returncode}): "
                               f"{(out.stderr or out.stdout).strip()[-300:]}")
    return out


def is_git_tree(tree: Path) -> bool:
    """True when tree is the top of a git work tree.

    A tree that merely sits inside a repository (a linux-source unpacked in
    someone's checkout) is a plain tree: its patches are relative to tree, not
    to the repository, and its cache key stays the plain one.
    """
    tree = Path(tree)
    if not (tree / ".git").exists():
        return False
    if shutil.which("git") is None:
        raise HostToolMissing(f"{tree} is a git tree: apt-get install git")
    r = _git(["rev-parse", "--is-inside-work-tree", "--show-toplevel"], cwd=tree, check=False)
    lines = r.stdout.splitlines()
    if r.returncode != 0 or len(lines) < 2:
        raise KernelError(f"{tree}/.git exists but git cannot read it: {(r.stderr or r.stdout).strip()[-300:]}")
    return lines[0] == "true" and Path(lines[1]).resolve() == tree.resolve()


def git_state(tree: Path) -> Tuple[str, bytes]:
    """(HEAD commit, `git diff HEAD` with staged and unstaged changes) of a git tree."""
    head = _git(["rev-parse", "--verify", "HEAD^{commit}"], cwd=tree).stdout.strip()
    r = _git_raw(_DIFF_HEAD, cwd=tree)
    if r.returncode != 0:
        raise KernelError(f"git diff HEAD in {tree} failed: {r.stderr.decode(errors='replace').strip()[-300:]}")
    return head, r.stdout


def git_tree_key(head: str, diff: bytes) -> str:
    return "git:" + head + ":" + hashlib.sha256(diff).hexdigest()[:16]


_MBOX_FROM = re.compile(r"^From \S+")
_MAIL_HEADER = re.compile(r"^[A-Za-z][A-Za-z0-9-]*:[ \t]")


def is_mail_patch(text: str) -> bool:
    """True for an mbox or `git format-patch` file (what `git am` takes), False for a bare diff.

    An mbox starts with a "From " line; a single mail starts with RFC 2822
    headers, one of them From:, up to the first blank line.
    """
    lines = text.lstrip("\r\n").splitlines()
    if not lines:
        return False
    if _MBOX_FROM.match(lines[0]):
        return True
    seen_from = False
    for line in lines:
        if not line.strip():
            return seen_from
        if line[0] in " \t":        # a folded header line
            continue
        if not _MAIL_HEADER.match(line):
            return False
        seen_from = seen_from or line.lower().startswith("from:")
    return seen_from


class GitApplyFailure(NamedTuple):
    """What `git am` / `git apply` said about the first failure; None where it said nothing."""
    file: Optional[str]        # "mm/memory_hotplug.c"
    line: Optional[int]        # first line of the failing hunk in the old file
    detail: Optional[str]      # "hunk does not apply", "does not exist in index", ...
    failed_at: Optional[str]   # git am: "0002 mm: subject" (the mail within the file)

    def where(self) -> Optional[str]:
        if self.file is None:
            return None
        return f"{self.file}:{self.line}" if self.line is not None else self.file


_GIT_HUNK = re.compile(r"^error: patch failed: (.+):(\d+)$")
_GIT_FILE = re.compile(r"^error: (.+?): (does not exist in index|No such file or directory|already exists in index"
                       r"|already exists in working directory|does not match index|patch does not apply"
                       r"|wrong type|has type \S+, expected \S+)$")
_GIT_CORRUPT = re.compile(r"^(?:error|fatal): corrupt patch at line (\d+)")
_GIT_FAILED_AT = re.compile(r"^Patch failed at (.+)$")
_GIT_WHOLE = (("Patch is empty.", "patch is empty (a cover letter?)"),
              ("Patch format detection failed.", "not a patch git am recognises"),
              ("error: No valid patches in input", "no valid patches in input"))


def parse_git_failure(output: str) -> GitApplyFailure:
    """From `git am` or `git apply` output (C locale), the first file and hunk that failed.

    Never raises; fields git did not name are None.
    """
    file: Optional[str] = None
    line: Optional[int] = None
    detail: Optional[str] = None
    failed_at: Optional[str] = None
    for text in output.splitlines():
        text = text.rstrip()
        m = _GIT_FAILED_AT.match(text)
        if m:
            failed_at = failed_at or m.group(1)
            continue
        if detail is not None:
            continue
        m = _GIT_HUNK.match(text)
        if m:
            file, line, detail = m.group(1), int(m.group(2)), "hunk does not apply"
            continue
        m = _GIT_FILE.match(text)
        if m:
            file, detail = m.group(1), m.group(2)
            continue
        m = _GIT_CORRUPT.match(text)
        if m:
            detail = f"corrupt patch at line {m.group(1)}"
            continue
        for prefix, what in _GIT_WHOLE:
            if text.startswith(prefix):
                detail = what
    return GitApplyFailure(file, line, detail, failed_at)


def _git_path(src: Path, name: str) -> Path:
    p = Path(_git(["rev-parse", "--git-path", name], cwd=src).stdout.strip())
    return p if p.is_absolute() else src / p


def _reset_worktree(src: Path, base: str) -> None:
    """Back to base: abort a `git am` left half-done, then rewrite only the files that differ."""
    if _git_path(src, "rebase-apply").exists():
        _git(["am", "--abort"], cwd=src, check=False)
    # a file whose stat no longer matches the index (touched, same content) would be rewritten by
    # checkout --force, and rebuilt by make: refresh the index's stat data first
    _git(["update-index", "-q", "--refresh"], cwd=src, check=False)
    _git(["checkout", "-q", "--force", "--detach", base], cwd=src)
    _git(["clean", "-fdq"], cwd=src)     # not -x: nothing memhp builds lives in src (make O=obj)


def _discard_worktree(tree: Path, src: Path) -> None:
    if (src / ".git").is_file():
        _git(["worktree", "remove", "--force", "--force", str(src)], cwd=tree, check=False)
    if src.is_symlink() or src.is_file():
        src.unlink()
    elif src.exists():
        shutil.rmtree(src)


def prepare_worktree(tree: Path, src: Path, head: str, diff: bytes, log: Optional[_Log] = None) -> str:
    """Make src a detached git worktree of tree at head with diff committed on top; return that base commit.

    Reused when src.parent/worktree.json says it was made from the same head and
    diff and the base commit is still there; otherwise (first use, a plain copy
    from an older memhp, a broken worktree) src is rebuilt. Only the repo's
    worktree list and object store change, never its work tree, index or HEAD.
    """
    record = src.parent / "worktree.json"
    diff_sha = hashlib.sha256(diff).hexdigest()
    if record.is_file() and (src / ".git").is_file():
        try:
            rec = json.loads(record.read_text())
        except ValueError:
            rec = {}
        if rec.get("head") == head and rec.get("diff") == diff_sha and rec.get("base") and \
                _git(["cat-file", "-e", rec["base"] + "^{commit}"], cwd=src, check=False).returncode == 0:
            return str(rec["base"])
    if record.exists():
        record.unlink()
    _discard_worktree(tree, src)
    ensure_dir(src.parent)
    # --force: a registration left by a deleted cache (missing but registered) is taken over
    r = _git(["worktree", "add", "--force", "--detach", str(src), head], cwd=tree)
    if log:
        log.note(f"$ git worktree add --force --detach {src} {head}  (in {tree})\n{r.stdout}{r.stderr}")
    if diff.strip():
        a = _git(["apply", "--index", "--whitespace=nowarn", "-"], cwd=src, input=diff, check=False)
        if a.returncode != 0:
            _discard_worktree(tree, src)
            raise KernelBuildError(f"the uncommitted changes of {tree} (git diff HEAD) do not apply to its HEAD "
                                   f"{head[:12]} in {src}: {(a.stderr or a.stdout).strip()[-300:]}")
        _git(["commit", "-q", "--no-verify", "-m", WORKTREE_SUBJECT], cwd=src, author=True)
    base = _git(["rev-parse", "--verify", "HEAD^{commit}"], cwd=src).stdout.strip()
    record.write_text(json.dumps({"repo": str(tree), "head": head, "diff": diff_sha, "base": base}))
    return base


def apply_series_git(src: Path, base: str, patches: Sequence[Path], log: Optional[_Log] = None,
                     tree: Optional[Path] = None) -> str:
    """Apply patches in order on top of base in the git worktree src; return the new HEAD.

    An mbox / `git format-patch` file goes through plain `git am` (no 3-way);
    a bare diff (no mail headers) through `git apply --index` and a commit
    whose subject is the file name. On a failure the worktree is put back to
    base and PatchError names the patch file and the first failing file:line.
    """
    _reset_worktree(src, base)
    for p in patches:
        text = p.read_bytes().decode(errors="replace")
        if is_mail_patch(text):
            how = "git am"
            r = _git(["am", "--no-3way", str(p)], cwd=src, check=False)
            out = r.stdout + r.stderr
        else:
            how = "git apply"
            r = _git(["apply", "--index", str(p)], cwd=src, check=False)
            out = r.stdout + r.stderr
            if r.returncode == 0:
                c = _git(["commit", "-q", "--no-verify", "--allow-empty", "-m", p.name], cwd=src, check=False,
                         author=True)
                out += c.stdout + c.stderr
                r = c
        if log:
            log.note(f"$ {how} {p}\n{out}")
        if r.returncode != 0:
            _reset_worktree(src, base)
            f = parse_git_failure(out)
            where = f.where()
            if where and f.detail:
                what = f"{where}: {f.detail}"
            else:
                what = f.detail or where or (out.strip().splitlines() or ["no output"])[-1]
            at = f", at {f.failed_at}" if f.failed_at else ""
            raise PatchError(f"patch {p} does not apply to {tree or src} ({how}{at}): {what}")
    return _git(["rev-parse", "--verify", "HEAD^{commit}"], cwd=src).stdout.strip()



def _copy_tree(tree: Path, dst: Path) -> None:
    """A full, independent copy (no hardlinks: patching must not reach the original)."""
    with scratch_dir(ensure_dir(dst.parent), "copy") as tmp:
        pipe = (f"set -o pipefail; tar -C {shlex.quote(str(tree))} --exclude=./.git -cf - . | "
                f"tar -C {shlex.quote(str(tmp))} -xf -")
        r = host.run(["bash", "-c", pipe], timeout=host.UNPACK_TIMEOUT, what=f"copying {tree}")
        if r.returncode != 0:
            raise KernelBuildError(f"copying {tree} to {dst} failed: {host.one_line(r.stderr)}")
        os.chmod(tmp, 0o700)
        tmp.rename(dst)


# ---------------------------------------------------------------- build

@dataclass(frozen=True)
class _Plan:
    """One build's inputs and where it happens; the keys name its cache folders."""
    tree: Path
    base: str
    fragments: Tuple[Path, ...]          # kconfigs/*.config, then the user's
    patches: Tuple[Path, ...]
    compiler: str
    git: Optional[Tuple[str, bytes]]     # (HEAD, `git diff HEAD`) of a git tree, read once
    key: str
    out: Path                            # builds/<key>: the finished build
    bdir: Path                           # kbuild/<dir-key>: src/, obj/, build.log, lock
    spec: str

    @property
    def src(self) -> Path:
        return self.bdir / "src"

    @property
    def obj(self) -> Path:
        return self.bdir / "obj"

    def make(self, *targets: str) -> List[str]:
        return ["make", f"O={self.obj}", "ARCH=x86_64", *targets]


_MAKE_ENV = {"ARCH": "x86_64", "LC_ALL": "C"}


def _artifact_from(out: Path, spec: str, source: Optional[Path]) -> KernelArtifact:
    meta = json.loads((out / "build.json").read_text())
    release = meta["release"]
    mods = out / "modules" / "lib" / "modules" / release
    return KernelArtifact(spec=spec, image=out / "bzImage", config=out / "config",
                          modules=mods if mods.is_dir() else None, release=release, source=source)


def build(tree: PathLike, fragments: Sequence[PathLike] = (), patches: Sequence[PathLike] = (),
          base: str = "tinyconfig", jobs: Optional[int] = None, cache: Optional[PathLike] = None,
          spec: Optional[str] = None) -> KernelArtifact:
    """Build bzImage from tree with kconfigs/*.config + fragments, after applying patches.

    Returns the cached artifact when the same inputs were built before.
    Raises PatchError, ConfigSymbolsDropped, KernelBuildError, HostToolMissing.
    """
    plan = _plan(Path(tree).resolve(), fragments, patches, base, cache, spec)
    if is_complete(plan.out):
        return _artifact_from(plan.out, plan.spec, plan.tree)
    with locked(plan.bdir / "lock") as lock_fd:
        if not is_complete(plan.out):        # else another process built it while we waited
            started = time.monotonic()
            log = _Log(ensure_dir(plan.bdir) / "build.log", lock_fd)
            log.note(f"# memhp build {plan.key}: tree {plan.tree}, base {plan.base}, fragments "
                     f"{[str(f) for f in plan.fragments]}, patches {[str(p) for p in plan.patches]}, "
                     f"{plan.compiler}")
            phases: Dict[str, float] = {}
            _prepare_source(plan, log)
            phases["prepare"] = time.monotonic() - started
            _configure(plan, log)
            phases["config"] = time.monotonic() - started - phases["prepare"]
            release, has_modules = _compile(plan, jobs or os.cpu_count() or 1, log, phases)
            log.note(format_note(phases))
            _store(plan, release, has_modules, log, time.monotonic() - started, phases)
    return _artifact_from(plan.out, plan.spec, plan.tree)


def _plan(tree: Path, fragments: Sequence[PathLike], patches: Sequence[PathLike], base: str,
          cache: Optional[PathLike], spec: Optional[str]) -> _Plan:
    """Check the inputs and the host, and work out the keys (reads a git tree's state once)."""
    if base not in BASES:
        raise KernelError(f"unknown base config {base!r}; valid: {', '.join(BASES)}")
    if not (tree / "Makefile").is_file() or not (tree / "scripts" / "kconfig" / "merge_config.sh").is_file():
        raise KernelError(f"{tree} is not a kernel source tree (no Makefile or scripts/kconfig/merge_config.sh)")
    frags = default_fragments() + [Path(f).resolve() for f in fragments]
    pats = [Path(p).resolve() for p in patches]
    for f in frags + pats:
        if not f.is_file():
            raise KernelError(f"no such file: {f}")
    check_host_tools()
    root = cache_root(cache)
    compiler = compiler_id()
    git = git_state(tree) if is_git_tree(tree) else None   # the worktree gets exactly what the key hashes
    tkey = git_tree_key(*git) if git else tree_key(tree)
    dkey = dir_key(tkey, base, frags, compiler)
    key = build_key(dkey, pats)
    return _Plan(tree, base, tuple(frags), tuple(pats), compiler, git, key, root / "builds" / key,
                 root / "kbuild" / dkey, spec or f"build:{tree}")


def _prepare_source(plan: _Plan, log: _Log) -> None:
    """src/ holds the tree with this build's patch series (and only it) applied."""
    state_file = plan.bdir / "applied.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"key": "", "files": []}
    if plan.git:
        base_commit = prepare_worktree(plan.tree, plan.src, *plan.git, log)
        head = _git(["rev-parse", "HEAD"], cwd=plan.src).stdout.strip()
        if state["key"] != plan.key or state.get("head") != head:
            state_file.write_text(json.dumps({"key": "", "files": []}))
            now = apply_series_git(plan.src, base_commit, plan.patches, log, plan.tree)
            state_file.write_text(json.dumps({"key": plan.key, "files": [], "head": now}))
        return
    if not plan.src.is_dir():
        _copy_tree(plan.tree, plan.src)
    if state["key"] != plan.key:
        _restore(plan.src, plan.tree, state["files"])          # undo the previous series
        state_file.write_text(json.dumps({"key": "", "files": []}))
        touched = apply_patches(plan.src, plan.tree, plan.patches, log)
        state_file.write_text(json.dumps({"key": plan.key, "files": touched}))


def _configure(plan: _Plan, log: _Log) -> None:
    """obj/.config from base + fragments, once per build folder; every requested symbol must survive."""
    if (plan.bdir / "config.done").exists():
        return
    ensure_dir(plan.obj)
    env = dict(os.environ, **_MAKE_ENV)
    src = plan.src
    merge = [src / t for t in TREE_FRAGMENTS if (src / t).is_file()] + list(plan.fragments)
    log.run(plan.make(plan.base), cwd=src, env=env, what=f"make {plan.base}", timeout=host.CONFIG_TIMEOUT)
    log.run(["sh", "scripts/kconfig/merge_config.sh", "-m", "-O", plan.obj, plan.obj / ".config", *merge],
            cwd=src, env=env, what="merge_config.sh", timeout=host.CONFIG_TIMEOUT)
    log.run(plan.make("olddefconfig"), cwd=src, env=env, what="make olddefconfig", timeout=host.CONFIG_TIMEOUT)
    requested: Dict[str, str] = {}
    for f in plan.fragments:
        requested.update(parse_fragment(f.read_text()))
    dropped = dropped_symbols(requested, parse_config((plan.obj / ".config").read_text()))
    if dropped:
        raise ConfigSymbolsDropped(dropped)
    (plan.bdir / "config.done").write_text("")


def _compile(plan: _Plan, jobs: int, log: _Log, phases: Optional[Dict[str, float]] = None) -> Tuple[str, bool]:
    """make bzImage (and modules, if the config has any); returns (kernelrelease, has_modules).
    phases: gets the compile, link and modules seconds (harness.kernels.buildphases)."""
    env = dict(os.environ, **_MAKE_ENV)
    config = parse_config((plan.obj / ".config").read_text())
    lines: TimedLines = []
    t0 = time.monotonic()
    log.run(plan.make(f"-j{jobs}", "bzImage"), cwd=plan.src, env=env, what="make bzImage", lines=lines)
    t1 = time.monotonic()
    if phases is not None:
        phases["compile"], phases["link"] = split_make(lines, t0, t1)
    has_modules = config.get("CONFIG_MODULES") == "y" and "m" in config.values()
    if has_modules:
        log.run(plan.make(f"-j{jobs}", "modules"), cwd=plan.src, env=env, what="make modules")
        if phases is not None:
            phases["modules"] = time.monotonic() - t1
    r = host.check(plan.make("-s", "kernelrelease"), cwd=plan.src, env=env, timeout=host.QUICK_TIMEOUT,
                   what="make kernelrelease")
    return r.stdout.strip(), has_modules


def _store(plan: _Plan, release: str, has_modules: bool, log: _Log, seconds: float,
           phases: Optional[Mapping[str, float]] = None) -> None:
    """builds/<key>/: bzImage, config, modules/, build.log, build.json; made aside, then published."""
    with scratch_dir(plan.out.parent, "build") as tmp:
        shutil.copyfile(plan.obj / "arch" / "x86" / "boot" / "bzImage", tmp / "bzImage")
        shutil.copyfile(plan.obj / ".config", tmp / "config")
        if has_debug_info(plan.obj / "vmlinux"):    # a DEBUG_INFO config: memhp report decodes splats with it
            shutil.copyfile(plan.obj / "vmlinux", tmp / "vmlinux")
        if has_modules:
            log.run(plan.make("modules_install", f"INSTALL_MOD_PATH={tmp / 'modules'}", "INSTALL_MOD_STRIP=1"),
                    cwd=plan.src, env=dict(os.environ, **_MAKE_ENV), what="make modules_install",
                    timeout=host.CONFIG_TIMEOUT)
        shutil.copyfile(log.path, tmp / "build.log")
        (tmp / "build.json").write_text(json.dumps({
            "release": release, "tree": str(plan.tree), "base": plan.base, "compiler": plan.compiler,
            "fragments": [str(f) for f in plan.fragments], "patches": [str(p) for p in plan.patches],
            "build_dir": str(plan.bdir), "seconds": round(seconds, 1),
            # phases: harness.kernels.buildphases; loadavg: the host's load (1, 5, 15 min) at the end
            "phases": {k: round(v, 1) for k, v in (phases or {}).items()},
            "loadavg": [round(x, 2) for x in os.getloadavg()]}, indent=1))
        with entry_lock(plan.out):
            publish(tmp, plan.out)


# ---------------------------------------------------------------- for build loops outside build()
# harness.workflows.bisect builds commit after commit in a clone and object tree of its own, and
# publishes each build where build() would look for it: these are the parts of build() it shares.

class BuildLog(_Log):
    """A build log file (emptied on creation): run() appends each command and its output and raises
    KernelBuildError with the log's tail when the command fails; note() appends a line."""


def git(args: Sequence[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """git in cwd with memhp's fixed config (no hooks, no signing), the C locale and none of the
    caller's GIT_DIR & co.; text output. check: a non-zero exit raises KernelBuildError (INFRA)."""
    return _git(args, cwd, check=check)


def commit_build_key(commit: str, base: str, fragments: Sequence[Path], patches: Sequence[Path],
                     compiler: str) -> str:
    """The builds/<key> that build() gives a git tree at commit with no uncommitted change
    (fragments: kconfigs/*.config first, as build() orders them)."""
    return build_key(dir_key(git_tree_key(commit, b""), base, fragments, compiler), patches)


def publish_build(out: Path, build_dir: Path, tree: Path, base: str, fragments: Sequence[Path],
                  patches: Sequence[Path], compiler: str, release: str, has_modules: bool, log: BuildLog,
                  seconds: float, spec: str = "") -> None:
    """Publish the kernel built in build_dir/obj from build_dir/src as out (builds/<key>), in the
    layout build() writes: bzImage, config, modules/, build.log, build.json."""
    plan = _Plan(tree, base, tuple(fragments), tuple(patches), compiler, None, out.name, out, build_dir,
                 spec or f"build:{tree}")
    _store(plan, release, has_modules, log, seconds)


# ---------------------------------------------------------------- Debian's linux-source

def _check_ver(ver: str) -> None:
    if ver not in DEBIAN_SRC_VERSIONS:
        raise KernelError(f"no Debian linux-source for {ver!r}; valid: {', '.join(DEBIAN_SRC_VERSIONS)}")


def source_tree(ver: str, cache: Optional[PathLike] = None) -> Path:
    """Debian's linux-source-<ver> (newest apt candidate), unpacked once into the cache."""
    _check_ver(ver)
    root = cache_root(cache)
    pkg = f"linux-source-{ver}"
    srcdir = root / "src"
    debver = host.apt_candidate(pkg)
    if debver is None:   # offline or no apt lists: use the newest one already unpacked
        have = sorted(srcdir.glob(f"{pkg}_*/.complete"))
        if not have:
            raise PackageError(f"apt has no candidate for {pkg}; run apt-get update "
                               f"(bookworm has it in main and bookworm-security)")
        return have[-1].parent / pkg
    outer = srcdir / f"{pkg}_{debver}"
    if not is_complete(outer):
        host.require_tools(f"unpacking {pkg}", "apt-get", "apt-cache", "dpkg-deb", "tar", "xz")
        deb = host.fetch_deb(pkg, debver, ensure_dir(root / "debs"))
        _unpack_source(deb, pkg, debver, outer)
    return outer / pkg


def _unpack_source(deb: Path, pkg: str, debver: str, outer: Path) -> None:
    """outer/<pkg>/: the tarball inside the .deb, unpacked (made aside, published under outer's lock)."""
    with entry_lock(outer):
        if is_complete(outer):
            return
        with scratch_dir(outer.parent, "src") as tmp:
            host.check(["dpkg-deb", "-x", deb, tmp / "x"], timeout=host.UNPACK_TIMEOUT, what=f"dpkg-deb -x {deb.name}")
            tarball = tmp / "x" / "usr" / "src" / f"{pkg}.tar.xz"
            if not tarball.is_file():
                raise PackageError(f"{deb.name} has no /usr/src/{pkg}.tar.xz")
            host.check(["tar", "-C", tmp, "-xf", tarball], timeout=host.UNPACK_TIMEOUT, what=f"unpacking {tarball.name}")
            shutil.rmtree(tmp / "x")
            if not (tmp / pkg).is_dir():
                raise PackageError(f"{tarball.name} has no top folder {pkg}/")
            (tmp / pkg / STAMP).write_text(f"{pkg} {debver}\n")
            publish(tmp, outer, f"{pkg} {debver}")


def resolve_debian_src(ver: str, cache: Optional[PathLike] = None, fragments: Sequence[PathLike] = (),
                       patches: Sequence[PathLike] = (), jobs: Optional[int] = None) -> KernelArtifact:
    """debian-src:<ver>: Debian's linux-source built with tinyconfig + kconfigs/ (+ fragments, patches)."""
    tree = source_tree(ver, cache)
    return build(tree, fragments=fragments, patches=patches, base="tinyconfig", jobs=jobs, cache=cache,
                 spec=f"debian-src:{ver}")
