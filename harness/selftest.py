"""The kernel's own memory-hotplug selftest (tools/testing/selftests/memory-hotplug/), fetched
from Debian's linux-source-<line> package and judged by kselftest's exit codes.

Fetching: the script is taken, in this order, from memhp's own cache
(<cache>/selftests/linux-source-<line>_<debver>/), from a source tree harness.kbuild already
unpacked (<cache>/src/linux-source-<line>_<debver>/), or from the .deb itself: `apt-get
download`, then only the selftest folder is streamed out of the package's tarball
(dpkg-deb --fsys-tarfile | tar -xO <tarball> | xz -dc | tar -x --wildcards ...), so the
1.5 GB tree is never written. Either way the folder is kept per package version, so the
slow path runs once per version.

Running (harness/scenarios/test_selftest.py): the guest has busybox ash, not bash. The script
is written for bash, but the only bashism ash lacks is $UID (bash sets it; ash does not, and
`[ $UID != 0 ]` then errors out), so it runs as `UID=0 sh mem-on-off-test.sh`: `local`,
$FUNCNAME, $RANDOM, `&>`, `echo -e`, bc and awk all work in busybox.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from harness.cache import cache_root
from harness.errors import HostToolMissing, KernelError

SELFTEST_DIR = "tools/testing/selftests/memory-hotplug"
SCRIPT = "mem-on-off-test.sh"
STAMP = ".complete"

# kselftest exit codes, tools/testing/selftests/kselftest.h (KSFT_*); the script itself uses
# ksft_skip=4 for "skip all tests".
KSFT_PASS, KSFT_FAIL, KSFT_XFAIL, KSFT_XPASS, KSFT_SKIP = 0, 1, 2, 3, 4

# Shell variables bash sets and busybox ash does not; passed in the environment.
ASH_ENV = {"UID": "0"}

# The notifier error injection module the second half of the script loads.
INJECT_MODULE = "memory_notifier_error_inject"


@dataclass(frozen=True)
class Selftest:
    folder: Path            # the memory-hotplug selftest folder (script, Makefile, config)
    package: str            # linux-source-6.1
    version: str            # Debian version, e.g. 6.1.192-2
    origin: str             # "cache" | "kbuild tree" | "deb"

    @property
    def script(self) -> Path:
        return self.folder / SCRIPT


def kernel_line(version: Sequence[int]) -> str:
    """Debian's linux-source package line for a kernel version: (6, 1, 192) -> "6.1"."""
    v = tuple(version or ())
    if len(v) < 2 or v[0] <= 0:
        raise KernelError(f"cannot tell the kernel line of version {v!r}")
    return f"{v[0]}.{v[1]}"


def parse_apt_candidate(policy: str) -> Optional[str]:
    """The "Candidate:" of `apt-cache policy` output, or None (absent or "(none)")."""
    m = re.search(r"^\s*Candidate:\s*(\S+)", policy or "", re.M)
    return m.group(1) if m and m.group(1) != "(none)" else None


def _debver_key(name: str) -> Tuple:
    """Sort key for "linux-source-6.1_6.1.192-2": numbers compare as numbers."""
    ver = name.split("_", 1)[-1]
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"[.\-+~]", ver))


def _run(argv: Union[str, List[str]], cwd: Optional[Path] = None, timeout: float = 900,
         shell: bool = False) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, shell=shell,
                              executable="/bin/bash" if shell else None)
    except subprocess.TimeoutExpired:
        raise KernelError(f"{argv if shell else ' '.join(argv)} timed out after {timeout:.0f}s") from None


def _need(tools: dict) -> None:
    missing = [(t, p) for t, p in tools.items() if shutil.which(t) is None]
    if missing:
        raise HostToolMissing(f"fetching the kernel selftest needs {', '.join(t for t, _ in missing)}: "
                              f"apt-get install {' '.join(sorted({p for _, p in missing}))}")


def fetch(version: Sequence[int], cache: Optional[Union[str, Path]] = None) -> Selftest:
    """The memory-hotplug selftest folder of the kernel line of `version`, cached per package version."""
    line = kernel_line(version)
    pkg = f"linux-source-{line}"
    root = cache_root(cache)
    mine = root / "selftests"
    _need({"apt-cache": "apt"})
    debver = parse_apt_candidate(_run(["apt-cache", "policy", pkg], timeout=120).stdout)
    if debver is None:   # no apt lists (offline): the newest version already cached
        have = sorted((p.parent for p in mine.glob(f"{pkg}_*/{STAMP}")), key=lambda p: _debver_key(p.name))
        if have:
            return Selftest(have[-1], pkg, have[-1].name.split("_", 1)[1], "cache")
        raise KernelError(f"apt has no candidate for {pkg}; run apt-get update (bookworm: main / bookworm-security, "
                          f"6.12 from bookworm-backports or the deb12 security line)")
    dest = mine / f"{pkg}_{debver}"
    if (dest / STAMP).exists():
        return Selftest(dest, pkg, debver, "cache")
    tree = root / "src" / f"{pkg}_{debver}"
    if (tree / STAMP).exists() and (tree / pkg / SELFTEST_DIR / SCRIPT).is_file():
        _install(tree / pkg / SELFTEST_DIR, dest, f"{pkg} {debver} (from {tree})")
        return Selftest(dest, pkg, debver, "kbuild tree")
    _need({"apt-get": "apt", "dpkg-deb": "dpkg", "tar": "tar", "xz": "xz-utils"})
    mine.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=mine) as tmpd:
        tmp = Path(tmpd)
        dl = _run(["apt-get", "download", f"{pkg}={debver}"], cwd=tmp)
        debs = sorted(tmp.glob(f"{pkg}_*.deb"))
        if dl.returncode != 0 or not debs:
            raise KernelError(f"apt-get download {pkg}={debver} failed: {(dl.stderr or dl.stdout).strip()[-300:]}")
        out = tmp / "x"
        out.mkdir()
        cmd = (f"set -o pipefail; dpkg-deb --fsys-tarfile {_q(debs[0])} | tar -xO ./usr/src/{pkg}.tar.xz | "
               f"xz -dc | tar -x -C {_q(out)} --wildcards '*/{SELFTEST_DIR}/*'")
        x = _run(cmd, shell=True, timeout=1800)
        found = out / pkg / SELFTEST_DIR
        if x.returncode != 0 or not (found / SCRIPT).is_file():
            raise KernelError(f"{debs[0].name}: no {SELFTEST_DIR}/{SCRIPT} in /usr/src/{pkg}.tar.xz: "
                              f"{x.stderr.strip()[-300:]}")
        _install(found, dest, f"{pkg} {debver} (from {debs[0].name})")
    return Selftest(dest, pkg, debver, "deb")


def _q(p: Path) -> str:
    import shlex
    return shlex.quote(str(p))


def _install(src: Path, dest: Path, stamp: str) -> None:
    """Copy the selftest folder into dest atomically (a half-copied folder has no stamp)."""
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    (tmp / STAMP).write_text(stamp + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


# ---------------------------------------------------------------- judging (pure)
@dataclass(frozen=True)
class SelftestOutcome:
    status: str                        # "pass" | "fail" | "skip"
    exit_code: int
    skip_reasons: Tuple[str, ...] = ()     # "skip all tests: ..." / "skip extra tests: ..." lines
    failures: Tuple[str, ...] = ()         # "... unexpected ..." and "FAILED" lines
    extra_ran: bool = False                # the notifier error injection half ran to its end
    offline_results: Tuple[str, ...] = field(default=())   # "-> Success" / "-> Failure" per offline try

    @property
    def ok(self) -> bool:
        return self.status == "pass"


def judge(exit_code: int, output: str) -> SelftestOutcome:
    """kselftest verdict from the script's exit code and output.

    exit 0 = pass, 4 (ksft_skip) = skip, anything else = fail. The script exits 0 when it
    skips only its second half (`skip extra tests:`: no debugfs or no
    memory-notifier-error-inject); that shows in skip_reasons and extra_ran=False.
    """
    lines = (output or "").replace("\r", "").split("\n")
    skips = tuple(ln.strip() for ln in lines if re.search(r"skip (all|extra) tests:", ln))
    fails = tuple(ln.strip() for ln in lines if "unexpected" in ln or "FAILED" in ln)
    offl = tuple(ln.strip() for ln in lines if ln.strip() in ("-> Success", "-> Failure"))
    extra = any("Test with memory notifier error injection" in ln for ln in lines) and not any(
        "skip extra tests:" in s for s in skips)
    if exit_code == KSFT_PASS:
        status = "pass"
    elif exit_code == KSFT_SKIP:
        status = "skip"
    else:
        status = "fail"
    return SelftestOutcome(status, exit_code, skips, fails, extra, offl)
