"""Host programs, in one place: running them with a deadline, checking they are installed,
asking apt about packages, and fetching verified .debs into the cache.

Every command runs in its own session (process group) and has a timeout. When the timeout
runs out, or memhp is interrupted while waiting (the CLI turns SIGINT/SIGTERM/SIGHUP into
KeyboardInterrupt), the whole group gets SIGTERM, then SIGKILL after a grace period: make's
compilers die with it, and make deletes the targets it was writing, so the next incremental
build does not trust a half-written object file.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, List, Mapping, Optional, Sequence, Union

from harness.cache import entry_lock, scratch_dir
from harness.errors import HostCommandError, HostCommandTimeout, HostToolMissing, PackageError

# Deadlines (seconds). Generous: a 2-core host under load; they exist so nothing waits forever.
APT_QUERY_TIMEOUT = 120.0        # apt-cache search/policy/show
DOWNLOAD_TIMEOUT = 1800.0        # apt-get download (linux-source is ~140 MB)
UNPACK_TIMEOUT = 1800.0          # dpkg-deb -x, tar -x of a kernel tree
GIT_TIMEOUT = 600.0              # one git command (worktree add of a kernel tree included)
CONFIG_TIMEOUT = 900.0           # make tinyconfig / merge_config.sh / olddefconfig
BUILD_TIMEOUT = 4 * 3600.0       # make bzImage / modules on a slow host
QUICK_TIMEOUT = 60.0             # gcc --version, dpkg-deb --info, make kernelrelease
KILL_GRACE = 5.0                 # SIGTERM to SIGKILL
GROUP_EXIT_WAIT = 3.0            # after SIGKILL, until the group's last member has exited

# program -> Debian package that provides it
PACKAGES = {
    "apt-get": "apt", "apt-cache": "apt", "dpkg-deb": "dpkg", "tar": "tar", "xz": "xz-utils",
    "git": "git", "make": "make", "gcc": "gcc", "patch": "patch", "zstd": "zstd",
}

Argv = Sequence[Union[str, Path]]


def warn(msg: str) -> None:
    print(f"memhp: warning: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- running programs

def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, SIGKILL it after KILL_GRACE, reap the child."""
    try:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            pass
    except KeyboardInterrupt:
        pass        # a second Ctrl-C only cuts the grace period short: the group is killed below all the same
    # also reaches grandchildren still alive after the leader exited (the group outlives it)
    _signal_group(proc, signal.SIGKILL)
    proc.wait()
    # SIGKILL is delivered, not yet acted on, when killpg returns: wait (bounded) until the group is gone
    deadline = time.monotonic() + GROUP_EXIT_WAIT
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _group_alive(pgid: int) -> bool:
    """True while a process of group pgid is running (zombies awaiting their reaper do not count)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
    return False


def run(argv: Argv, *, timeout: float, cwd: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
        input: Union[str, bytes, None] = None, text: bool = True, log: Optional[IO] = None,
        what: Optional[str] = None, die_with_parent: bool = False,
        pass_fds: Sequence[int] = ()) -> subprocess.CompletedProcess:
    """Run argv in its own process group; return the result whatever the exit status.

    log: a file to receive stdout and stderr (the result's are then empty).
    die_with_parent: the program gets SIGKILL if memhp dies without cleaning up (kill -9),
    through `setpriv --pdeathsig KILL` (set before exec, no libc calls in the forked child).
    pass_fds: descriptors the program and its children keep, e.g. a cache lock that must stay
    held while any of them still writes.
    Raises HostCommandTimeout (the group killed) past timeout, HostToolMissing if argv[0]
    does not exist; kills the group and re-raises on KeyboardInterrupt or any other exception.
    """
    args = [str(a) for a in argv]
    name = what or " ".join(args[:3])
    tool = os.path.basename(args[0])
    if shutil.which(args[0]) is None:
        raise HostToolMissing(f"{tool} not found; install the Debian package {PACKAGES.get(tool, tool)}")
    if die_with_parent and shutil.which("setpriv"):
        args = ["setpriv", "--pdeathsig", "KILL", "--"] + args
    out = log if log is not None else subprocess.PIPE
    err = subprocess.STDOUT if log is not None else subprocess.PIPE
    try:
        proc = subprocess.Popen(args, cwd=cwd, env=None if env is None else dict(env),
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=out, stderr=err, text=text, start_new_session=True,
                                pass_fds=tuple(pass_fds))
    except FileNotFoundError:
        raise HostToolMissing(f"{tool} not found; install the Debian package {PACKAGES.get(tool, tool)}") from None
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        raise HostCommandTimeout(f"{name} timed out after {timeout:.0f}s (killed)", args) from None
    except BaseException:
        _stop_group(proc)
        raise
    empty = "" if text else b""
    return subprocess.CompletedProcess(args, proc.returncode, stdout if stdout is not None else empty,
                                       stderr if stderr is not None else empty)


def check(argv: Argv, *, timeout: float, what: Optional[str] = None, **kw) -> subprocess.CompletedProcess:
    """run(), raising HostCommandError with the last of the program's output on a non-zero exit."""
    r = run(argv, timeout=timeout, what=what, **kw)
    if r.returncode != 0:
        text = r.stderr or r.stdout or ""
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        name = what or " ".join(r.args[:3])
        raise HostCommandError(f"{name} failed (exit {r.returncode}): {one_line(text)}", r.args, r.returncode, text)
    return r


def one_line(text: str, limit: int = 300) -> str:
    """The last non-empty lines of a program's output, joined into one line of at most limit chars."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    joined = " | ".join(lines[-3:]) if lines else "no output"
    return joined[-limit:]


# ---------------------------------------------------------------- installed programs

def require(tools: Mapping[str, str], purpose: str, headers: Optional[Mapping[str, str]] = None) -> None:
    """Raise HostToolMissing naming every missing program (and header) and its Debian package.

    tools and headers map a program name / header path to the package that provides it.
    """
    missing = [(t, pkg) for t, pkg in tools.items() if shutil.which(t) is None]
    missing += [(h, pkg) for h, pkg in (headers or {}).items() if not os.path.exists(h)]
    if missing:
        pkgs = sorted({pkg for _, pkg in missing})
        raise HostToolMissing(f"{purpose} needs {', '.join(t for t, _ in missing)}: apt-get install {' '.join(pkgs)}")


def require_tools(purpose: str, *names: str) -> None:
    require({n: PACKAGES.get(n, n) for n in names}, purpose)


# ---------------------------------------------------------------- apt (queries)

def parse_apt_candidate(policy: str) -> Optional[str]:
    """The "Candidate:" of `apt-cache policy` output, or None (absent or "(none)")."""
    m = re.search(r"^\s*Candidate:\s*(\S+)", policy or "", re.M)
    return m.group(1) if m and m.group(1) != "(none)" else None


def apt_candidate(pkg: str) -> Optional[str]:
    """The version apt would install, or None (unknown package, no apt lists)."""
    require_tools("asking apt about packages", "apt-cache")
    return parse_apt_candidate(run(["apt-cache", "policy", pkg], timeout=APT_QUERY_TIMEOUT).stdout)


def apt_search(pattern: str) -> List[str]:
    """Package names matching an anchored regex (apt-cache search --names-only)."""
    require_tools("asking apt about packages", "apt-cache")
    out = check(["apt-cache", "search", "--names-only", pattern], timeout=APT_QUERY_TIMEOUT).stdout
    rx = re.compile(pattern)
    return [n for n in (ln.split(" - ", 1)[0].strip() for ln in out.splitlines()) if rx.match(n)]


@dataclass(frozen=True)
class AptRecord:
    package: str
    version: str
    size: int          # bytes of the .deb
    sha256: str


def parse_apt_record(text: str) -> Optional[AptRecord]:
    """Package, Version, Size and SHA256 of the first stanza of `apt-cache show`; None if any is missing."""
    fields = {}
    for line in (text or "").splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep and not line[0].isspace():
            fields.setdefault(key.strip(), value.strip())
    try:
        return AptRecord(fields["Package"], fields["Version"], int(fields["Size"]), fields["SHA256"].lower())
    except (KeyError, ValueError):
        return None


def apt_record(pkg: str, version: str) -> AptRecord:
    """What apt announces for pkg=version (the size and hash a download must have)."""
    require_tools("asking apt about packages", "apt-cache")
    r = run(["apt-cache", "show", "--no-all-versions", f"{pkg}={version}"], timeout=APT_QUERY_TIMEOUT)
    rec = parse_apt_record(r.stdout)
    if r.returncode != 0 or rec is None:
        raise PackageError(f"apt knows no {pkg}={version} with a size and SHA256 "
                           f"({one_line(r.stderr or r.stdout)}); run apt-get update")
    return rec


# ---------------------------------------------------------------- .deb files

def deb_version(path: Path) -> str:
    """The version in an apt-get download file name: pkg_1%3a2.0-1_amd64.deb -> 1:2.0-1."""
    parts = path.name.split("_")
    return parts[1].replace("%3a", ":") if len(parts) >= 3 else ""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def deb_problem(path: Path, rec: AptRecord) -> Optional[str]:
    """Why path is not the .deb apt announced (size, SHA256, dpkg-deb --info), or None if it is."""
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    if size != rec.size:
        return f"{size} bytes, apt says {rec.size}"
    digest = _sha256(path)
    if digest != rec.sha256:
        return f"SHA256 {digest[:16]}..., apt says {rec.sha256[:16]}..."
    info = run(["dpkg-deb", "--info", path], timeout=QUICK_TIMEOUT)
    if info.returncode != 0:
        return f"dpkg-deb --info: {one_line(info.stderr or info.stdout)}"
    return None


def fetch_deb(pkg: str, version: str, folder: Path) -> Path:
    """pkg=version as a verified .deb in folder: reused if it checks out, else downloaded.

    The download goes to a scratch folder, is checked against apt's size and SHA256 and
    `dpkg-deb --info`, and only then renamed into folder, under folder/.<pkg>.lock. A cached
    .deb that fails the check is downloaded again, with a one-line warning.
    """
    require_tools("fetching Debian packages", "apt-get", "apt-cache", "dpkg-deb")
    rec = apt_record(pkg, version)

    def cached() -> Optional[Path]:
        for p in sorted(folder.glob(f"{pkg}_*.deb")):
            if deb_version(p) == version:
                problem = deb_problem(p, rec)
                if problem is None:
                    return p
                warn(f"cached {p.name} is damaged ({problem}); downloading it again")
                p.unlink(missing_ok=True)
        return None

    with entry_lock(folder / pkg):
        found = cached()
        if found:
            return found
        with scratch_dir(folder, "deb") as tmp:
            r = run(["apt-get", "download", f"{pkg}={version}"], cwd=tmp, timeout=DOWNLOAD_TIMEOUT,
                    what=f"apt-get download {pkg}={version}")
            got = sorted(tmp.glob("*.deb"))
            if r.returncode != 0 or len(got) != 1:
                raise HostCommandError(f"apt-get download {pkg}={version} failed (exit {r.returncode}): "
                                       f"{one_line(r.stderr or r.stdout)}", r.args, r.returncode, r.stderr)
            problem = deb_problem(got[0], rec)
            if problem:
                raise PackageError(f"apt-get download {pkg}={version} gave a bad file: {problem}")
            final = folder / got[0].name
            os.chmod(got[0], 0o600)
            os.replace(got[0], final)
            return final
