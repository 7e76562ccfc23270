"""Build a kernel from a source tree with memhp's kconfig fragments and optional patches.

Layout in the cache folder (cache_root()):

  src/linux-source-<ver>_<debver>/       Debian's linux-source, unpacked once (.complete stamp)
  kbuild/<dir-key>/src/                  a private copy of the source tree (the user's tree is never touched)
  kbuild/<dir-key>/obj/                  the object tree (make O=obj), reused by every patch series
  kbuild/<dir-key>/applied.json          which patch series is applied to src/ and the files it touched
  builds/<key>/                          one finished build: bzImage, config, build.log, modules/ (if any)

dir-key hashes the tree state, base config, every fragment's content and the
compiler; key adds every patch's content. A patch series is applied to the
private src/ copy after the files the previous series touched are restored
from the pristine tree (with a fresh mtime, so make rebuilds them), so a
one-file patch rebuilds in seconds instead of minutes. Git trees are handled
the same way (copied without .git, keyed by HEAD + `git diff HEAD`), because
the O= object tree needs one stable source folder per key.

An flock on kbuild/<dir-key>/lock serialises builds that share a folder.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from harness.cache import cache_root, hash_inputs
from harness.errors import (ConfigSymbolsDropped, KernelBuildError, KernelError, HostToolMissing,
                            PatchError)
from harness.kconfig import dropped_symbols, parse_config, parse_fragment
from harness.kernel import KernelArtifact

PathLike = Union[str, Path]

KCONFIG_DIR = Path(__file__).resolve().parent.parent / "kconfigs"
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
SOURCE_TOOLS = {"apt-get": "apt", "apt-cache": "apt", "dpkg-deb": "dpkg"}

STAMP = ".memhp-source"   # written into a tree memhp unpacked: names the package and version


# ---------------------------------------------------------------- host checks

def check_host_tools(tools: Optional[Dict[str, str]] = None, headers: Optional[Dict[str, str]] = None) -> None:
    """Raise HostToolMissing naming the Debian packages of every missing tool."""
    tools = HOST_TOOLS if tools is None else tools
    headers = HOST_HEADERS if headers is None else headers
    missing = [(t, pkg) for t, pkg in tools.items() if shutil.which(t) is None]
    missing += [(h, pkg) for h, pkg in headers.items() if not os.path.exists(h)]
    if missing:
        pkgs = sorted({pkg for _, pkg in missing})
        what = ", ".join(t for t, _ in missing)
        raise HostToolMissing(f"kernel build needs {what}: apt-get install {' '.join(pkgs)}")


def compiler_id() -> str:
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise HostToolMissing("kernel build needs gcc: apt-get install gcc") from None
    return out.splitlines()[0] if out else ""


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

def _run(argv: Sequence[str], cwd: Optional[Path] = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=check)


_BUILD_OUTPUT = re.compile(r"\.(o|a|ko|cmd|mod|mod\.c|order|symvers|d|tmp)$")


def tree_key(tree: Path) -> str:
    """A stable id of a source tree's state.

    git: HEAD + hash of `git diff HEAD`. A tree memhp unpacked: its stamp
    (package and version). Any other tree: the top Makefile plus the
    (path, size, mtime) of every source file, so an edit changes the key.
    """
    tree = Path(tree)
    if (tree / ".git").exists():
        head = _run(["git", "rev-parse", "HEAD"], cwd=tree).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=tree, capture_output=True,
                              check=True).stdout
        return "git:" + head + ":" + hashlib.sha256(diff).hexdigest()[:16]
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


# ---------------------------------------------------------------- locking and logging

@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Log:
    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def run(self, argv: Sequence[str], cwd: Path, env: Optional[dict] = None, what: str = "") -> None:
        with open(self.path, "a") as fh:
            fh.write(f"$ (cd {cwd} && {' '.join(str(a) for a in argv)})\n")
            fh.flush()
            rc = subprocess.call([str(a) for a in argv], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if rc != 0:
            raise KernelBuildError(f"{what or argv[0]} failed (exit {rc}):\n{self.tail()}", str(self.path))

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
        dry = _run(argv + ["--dry-run"], cwd=src, check=False)
        if dry.returncode != 0:
            _restore(src, pristine, touched)
            out = dry.stdout + dry.stderr
            if log:
                log.note(f"$ {' '.join(argv)} --dry-run\n{out}")
            f, detail = parse_patch_failure(out)
            where = f"{f}: {detail}" if f else (out.strip().splitlines() or ["no output"])[-1]
            raise PatchError(f"patch {p} does not apply to {pristine}: {where}")
        real = _run(argv, cwd=src, check=False)
        touched += patched_files(real.stdout)
        if log:
            log.note(f"$ {' '.join(argv)}\n{real.stdout}{real.stderr}")
        if real.returncode != 0:   # dry run passed, so this is unexpected; still leave src clean
            _restore(src, pristine, touched)
            raise PatchError(f"patch {p} failed after a clean dry run: {(real.stdout + real.stderr).strip()[-300:]}")
    return touched


def _copy_tree(tree: Path, dst: Path) -> None:
    """A full, independent copy (no hardlinks: patching must not reach the original)."""
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tar = subprocess.Popen(["tar", "-C", str(tree), "--exclude=./.git", "-cf", "-", "."], stdout=subprocess.PIPE)
    rc = subprocess.call(["tar", "-C", str(tmp), "-xf", "-"], stdin=tar.stdout)
    tar.stdout.close()  # type: ignore[union-attr]
    if tar.wait() != 0 or rc != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KernelBuildError(f"copying {tree} to {dst} failed")
    tmp.rename(dst)


# ---------------------------------------------------------------- build

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
    tree = Path(tree).resolve()
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
    dkey = dir_key(tree_key(tree), base, frags, compiler)
    key = build_key(dkey, pats)
    spec = spec or f"build:{tree}"
    out = root / "builds" / key
    bdir = root / "kbuild" / dkey

    if (out / ".complete").exists():
        return _artifact_from(out, spec, tree)

    started = time.monotonic()
    with _locked(bdir / "lock"):
        if (out / ".complete").exists():      # another process built it while we waited
            return _artifact_from(out, spec, tree)
        src, obj = bdir / "src", bdir / "obj"
        if not src.is_dir():
            _copy_tree(tree, src)
        obj.mkdir(exist_ok=True)
        log = _Log(bdir / "build.log")
        log.note(f"# memhp build {key}: tree {tree}, base {base}, fragments "
                 f"{[str(f) for f in frags]}, patches {[str(p) for p in pats]}, {compiler}")
        env = dict(os.environ, ARCH="x86_64", LC_ALL="C")
        make = ["make", f"O={obj}", "ARCH=x86_64"]

        # patches: undo the previous series, apply this one
        state_file = bdir / "applied.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {"key": "", "files": []}
        if state["key"] != key:
            _restore(src, tree, state["files"])
            state_file.write_text(json.dumps({"key": "", "files": []}))
            touched = apply_patches(src, tree, pats, log)
            state_file.write_text(json.dumps({"key": key, "files": touched}))

        # config: once per build folder (its key covers tree, base, fragments, compiler)
        if not (bdir / "config.done").exists():
            merge = [src / t for t in TREE_FRAGMENTS if (src / t).is_file()] + frags
            log.run(make + [base], cwd=src, env=env, what=f"make {base}")
            log.run(["sh", "scripts/kconfig/merge_config.sh", "-m", "-O", obj, obj / ".config", *merge],
                    cwd=src, env=env, what="merge_config.sh")
            log.run(make + ["olddefconfig"], cwd=src, env=env, what="make olddefconfig")
            requested: Dict[str, str] = {}
            for f in frags:
                requested.update(parse_fragment(f.read_text()))
            final = parse_config((obj / ".config").read_text())
            dropped = dropped_symbols(requested, final)
            if dropped:
                raise ConfigSymbolsDropped(dropped)
            (bdir / "config.done").write_text("")

        config = parse_config((obj / ".config").read_text())
        jobs = jobs or os.cpu_count() or 1
        log.run(make + [f"-j{jobs}", "bzImage"], cwd=src, env=env, what="make bzImage")
        has_modules = config.get("CONFIG_MODULES") == "y" and "m" in config.values()
        if has_modules:
            log.run(make + [f"-j{jobs}", "modules"], cwd=src, env=env, what="make modules")
        release = _run(make + ["-s", "kernelrelease"], cwd=src).stdout.strip()

        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        shutil.copyfile(obj / "arch" / "x86" / "boot" / "bzImage", tmp / "bzImage")
        shutil.copyfile(obj / ".config", tmp / "config")
        if has_modules:
            log.run(make + ["modules_install", f"INSTALL_MOD_PATH={tmp / 'modules'}", "INSTALL_MOD_STRIP=1"],
                    cwd=src, env=env, what="make modules_install")
        shutil.copyfile(log.path, tmp / "build.log")
        (tmp / "build.json").write_text(json.dumps({
            "release": release, "tree": str(tree), "base": base, "compiler": compiler,
            "fragments": [str(f) for f in frags], "patches": [str(p) for p in pats],
            "build_dir": str(bdir), "seconds": round(time.monotonic() - started, 1)}, indent=1))
        (tmp / ".complete").write_text("")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    return _artifact_from(out, spec, tree)


# ---------------------------------------------------------------- Debian's linux-source

def _check_ver(ver: str) -> None:
    if ver not in DEBIAN_SRC_VERSIONS:
        raise KernelError(f"no Debian linux-source for {ver!r}; valid: {', '.join(DEBIAN_SRC_VERSIONS)}")


def apt_candidate(pkg: str) -> Optional[str]:
    """The version apt would install, or None."""
    try:
        out = _run(["apt-cache", "policy", pkg], check=False).stdout
    except OSError:
        return None
    m = re.search(r"^\s*Candidate:\s*(\S+)", out, re.M)
    return m.group(1) if m and m.group(1) != "(none)" else None


def source_tree(ver: str, cache: Optional[PathLike] = None) -> Path:
    """Debian's linux-source-<ver> (newest apt candidate), unpacked once into the cache."""
    _check_ver(ver)
    root = cache_root(cache)
    pkg = f"linux-source-{ver}"
    debver = apt_candidate(pkg)
    srcdir = root / "src"
    if debver is None:   # offline or no apt lists: use the newest one already unpacked
        have = sorted(srcdir.glob(f"{pkg}_*/.complete"))
        if not have:
            raise KernelError(f"apt has no candidate for {pkg}; run apt-get update "
                              f"(bookworm has it in main and bookworm-security)")
        return have[-1].parent / pkg
    check_host_tools(SOURCE_TOOLS, {})
    check_host_tools({"xz": "xz-utils", "tar": "tar"}, {})
    outer = srcdir / f"{pkg}_{debver}"
    tree = outer / pkg
    if (outer / ".complete").exists():
        return tree
    with _locked(srcdir / f".{pkg}.lock"):
        if (outer / ".complete").exists():
            return tree
        if outer.exists():
            shutil.rmtree(outer)
        outer.mkdir(parents=True)
        with tempfile.TemporaryDirectory(dir=srcdir) as tmpd:
            tmp = Path(tmpd)
            dl = _run(["apt-get", "download", f"{pkg}={debver}"], cwd=tmp, check=False)
            debs = list(tmp.glob(f"{pkg}_*.deb"))
            if dl.returncode != 0 or not debs:
                raise KernelError(f"apt-get download {pkg}={debver} failed: {(dl.stderr or dl.stdout).strip()[-300:]}")
            x = _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "x")], check=False)
            tarball = tmp / "x" / "usr" / "src" / f"{pkg}.tar.xz"
            if x.returncode != 0 or not tarball.is_file():
                raise KernelError(f"{debs[0].name} has no /usr/src/{pkg}.tar.xz: {x.stderr.strip()[-300:]}")
            t = _run(["tar", "-C", str(outer), "-xf", str(tarball)], check=False)
            if t.returncode != 0 or not tree.is_dir():
                raise KernelError(f"unpacking {tarball.name} failed: {t.stderr.strip()[-300:]}")
        (tree / STAMP).write_text(f"{pkg} {debver}\n")
        (outer / ".complete").write_text(f"{pkg} {debver}\n")
    return tree


def resolve_debian_src(ver: str, cache: Optional[PathLike] = None, fragments: Sequence[PathLike] = (),
                       patches: Sequence[PathLike] = (), jobs: Optional[int] = None) -> KernelArtifact:
    """debian-src:<ver>: Debian's linux-source built with tinyconfig + kconfigs/ (+ fragments, patches)."""
    tree = source_tree(ver, cache)
    return build(tree, fragments=fragments, patches=patches, base="tinyconfig", jobs=jobs, cache=cache,
                 spec=f"debian-src:{ver}")
