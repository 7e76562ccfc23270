"""The cache folder: $XDG_CACHE_HOME/memhp, default ~/.cache/memhp (MEMHP_CACHE overrides).

Rules every writer of a cache entry (a kernel extraction, an image, a build, a selftest
folder, a .deb) follows, so that runs at the same time never see or delete half-made work:

  - the entry is made in a scratch folder beside it (`scratch_dir`, named `.tmp.<pid>.…`),
    stamped `.complete` last, and renamed into place (`publish`);
  - the writer holds the entry's flock (`entry_lock`) from the re-check to the rename;
  - an entry that is already complete is kept, and the writer's own copy is discarded;
  - every folder memhp makes is 0700, and the root must be the user's own and not
    writable by others.

`clean_stale()` (run by the CLI at startup) removes the scratch folders of runs that died,
and the QEMU run folders (`$TMPDIR/memhp-*`) they left.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Union

from harness.errors import CacheError

COMPLETE = ".complete"
TMP_PREFIX = ".tmp."              # scratch entries: .tmp.<pid>.<tag>.<random>
_TMP_RE = re.compile(r"^\.tmp\.(\d+)\.")
RUN_DIR_RE = re.compile(r"^memhp-[a-z0-9_]{8}$")   # tempfile.mkdtemp(prefix="memhp-") (Machine's run folders)
RUN_DIR_PID = "pid"               # the owner's PID, written into a run folder by its creator
RUN_DIR_MAX_AGE = 3600.0          # a run folder without a pid file is stale after this (seconds)
_NO_SCRATCH = ("artifacts", "logs")   # run outputs, kept and growing: not walked for scratch entries


def cache_root(override: Optional[Union[str, Path]] = None) -> Path:
    """The cache folder, created 0700; refused if another user owns it or others may write to it."""
    if override:
        root = Path(override)
    elif os.environ.get("MEMHP_CACHE"):
        root = Path(os.environ["MEMHP_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "memhp"
    try:
        if not root.is_dir():
            root.parent.mkdir(parents=True, exist_ok=True)
            root.mkdir(mode=0o700, exist_ok=True)
        st = root.stat()
    except OSError as e:
        raise CacheError(f"cache folder {root} is not writable: {e.strerror or e}. "
                         f"Set MEMHP_CACHE or XDG_CACHE_HOME to a writable folder.") from None
    check_root_owner(root, st.st_uid, st.st_mode)
    try:
        probe = root / f"{TMP_PREFIX}{os.getpid()}.write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CacheError(f"cache folder {root} is not writable: {e.strerror or e}. "
                         f"Set MEMHP_CACHE or XDG_CACHE_HOME to a writable folder.") from None
    return root


def check_root_owner(root: Path, uid: int, mode: int) -> None:
    """Refuse a cache root another user owns, or one others may write to (they could plant kernels)."""
    if uid != os.geteuid():
        raise CacheError(f"cache folder {root} belongs to uid {uid}, not to you (uid {os.geteuid()}); "
                         f"set MEMHP_CACHE to a folder of your own")
    if mode & 0o022:
        raise CacheError(f"cache folder {root} is group- or world-writable (mode {mode & 0o7777:04o}); "
                         f"run chmod go-w {root}, or set MEMHP_CACHE to a private folder")


def ensure_dir(path: Path) -> Path:
    """mkdir -p, every folder it creates 0700 (existing ones are left as they are)."""
    path = Path(path)
    missing: List[Path] = []
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
    return path


# ---------------------------------------------------------------- writing entries

@contextmanager
def locked(lock_file: Path) -> Iterator[int]:
    """An exclusive flock on lock_file (created 0600) for the duration of the block.

    Yields the descriptor: a program given it (host.run pass_fds) keeps the lock held until it
    exits too, so a build orphaned by a killed memhp still excludes the next one.
    """
    ensure_dir(lock_file.parent)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)   # closing drops the lock (once no inheritor holds it either)


def entry_lock(entry: Path) -> Iterator[int]:
    """The flock that guards writing `entry`: <parent>/.<name>.lock."""
    return locked(entry.parent / f".{entry.name}.lock")


def is_complete(entry: Path) -> bool:
    return (entry / COMPLETE).is_file()


def scratch_name(parent: Path, tag: str) -> Path:
    """A temporary file name in parent that clean_stale() can tie to this process."""
    return parent / f"{TMP_PREFIX}{os.getpid()}.{tag}"


@contextmanager
def scratch_dir(parent: Path, tag: str = "") -> Iterator[Path]:
    """A 0700 scratch folder in parent, named after this PID; removed at exit unless published."""
    ensure_dir(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}.{tag}.", dir=parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, dest: Path, stamp: str = "") -> bool:
    """Stamp tmp complete and rename it to dest; the caller holds entry_lock(dest).

    A complete dest is kept and tmp discarded (returns False): another run finished first.
    A dest without the stamp is a crashed writer's leftover and is replaced.
    """
    if is_complete(dest):
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    (tmp / COMPLETE).write_text(stamp.rstrip("\n") + "\n")
    os.chmod(tmp, 0o700)
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return True


# ---------------------------------------------------------------- stale files

# QEMU's sockets live in the run folder, and a unix socket path must fit sun_path (108 bytes):
# "<tmp>/memhp-XXXXXXXX/console.sock" leaves <tmp> this many characters.
SOCKET_TMP_MAX = 107 - len("/memhp-XXXXXXXX/console.sock")


def run_dir_parent() -> Path:
    """$TMPDIR when QEMU's socket paths fit under it, else /tmp (a deep $TMPDIR, such as pytest's
    tmp_path, made QEMU refuse: "UNIX socket path '...' is too long")."""
    t = tempfile.gettempdir()
    return Path(t) if len(t) <= SOCKET_TMP_MAX else Path("/tmp")


def make_run_dir() -> Path:
    """A private memhp-XXXXXXXX folder (under run_dir_parent()) with this process's PID recorded,
    so that clean_stale() of a later run removes it only once this process is gone."""
    d = Path(tempfile.mkdtemp(prefix="memhp-", dir=run_dir_parent()))
    (d / RUN_DIR_PID).write_text(f"{os.getpid()}\n")
    return d


def pid_alive(pid: int) -> bool:
    """True if a process with this PID exists (someone else's counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _named_in_a_cmdline(path: str) -> bool:
    """True if a live process mentions path in its argv (QEMU names its run folder's sockets)."""
    needle = path.encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


def _remove(p: Path) -> bool:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except OSError:
        return False
    return True


def stale_scratch(root: Path) -> List[Path]:
    """Scratch entries (.tmp.<pid>.*) up to two levels under root whose PID is gone."""
    out: List[Path] = []
    level = [root]
    for _ in range(3):
        nxt: List[Path] = []
        for folder in level:
            try:
                children = list(folder.iterdir())
            except OSError:
                continue
            for c in children:
                m = _TMP_RE.match(c.name)
                if m:
                    if not pid_alive(int(m.group(1))):
                        out.append(c)
                elif c.is_dir() and not c.is_symlink() and not c.name.startswith(".") and \
                        not (folder == root and c.name in _NO_SCRATCH):
                    nxt.append(c)
        level = nxt
    return out


def stale_run_dirs(tmpdir: Path, now: Optional[float] = None) -> List[Path]:
    """$TMPDIR/memhp-XXXXXXXX folders of ours whose owner is gone.

    With a `pid` file: stale when that PID is gone. Without one (older memhp): stale when
    older than RUN_DIR_MAX_AGE and no live process names the folder in its argv.
    """
    now = time.time() if now is None else now
    out: List[Path] = []
    try:
        children = list(tmpdir.iterdir())
    except OSError:
        return out
    for d in children:
        if not RUN_DIR_RE.match(d.name):
            continue
        try:
            st = d.lstat()
        except OSError:
            continue
        if not d.is_dir() or d.is_symlink() or st.st_uid != os.geteuid():
            continue
        try:
            pid = int((d / RUN_DIR_PID).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        if pid is not None:
            if not pid_alive(pid):
                out.append(d)
        elif now - st.st_mtime > RUN_DIR_MAX_AGE and not _named_in_a_cmdline(str(d)):
            out.append(d)
    return out


def clean_stale(root: Optional[Path] = None, tmpdir: Optional[Path] = None) -> List[Path]:
    """Remove what dead runs left: cache scratch entries and $TMPDIR/memhp-* run folders.

    Never raises (a cache that cannot be used is reported by whoever uses it); returns what it removed.
    """
    removed: List[Path] = []
    try:
        root = Path(root) if root else cache_root()
    except CacheError:
        root = None
    candidates: List[Path] = stale_scratch(root) if root else []
    candidates += stale_run_dirs(Path(tmpdir) if tmpdir else run_dir_parent())
    for p in candidates:
        if _remove(p):
            removed.append(p)
    return removed


def hash_inputs(parts: Iterable[Union[bytes, str, Path]]) -> str:
    """Stable hash of a sequence of inputs; Paths hash by content (files) or name+content (dirs)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path):
            if p.is_dir():
                for f in sorted(x for x in p.rglob("*") if x.is_file()):
                    h.update(str(f.relative_to(p)).encode())
                    h.update(f.read_bytes())
            else:
                h.update(p.read_bytes())
        elif isinstance(p, str):
            h.update(p.encode())
        else:
            h.update(p)
        h.update(b"\0")
    return h.hexdigest()[:16]
