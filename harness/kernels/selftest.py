"""The kernel's own memory-hotplug selftest (tools/testing/selftests/memory-hotplug/), fetched
from Debian's linux-source-<line> package and judged by kselftest's exit codes.

Fetching: the script is taken, in this order, from memhp's own cache
(<cache>/selftests/linux-source-<line>_<debver>/), from a source tree harness.kernels.kbuild already
unpacked (<cache>/src/linux-source-<line>_<debver>/), or from the .deb itself (fetched and
verified into <cache>/debs/ by harness.host.fetch_deb, shared with kbuild): only the selftest
folder is streamed out of the package's tarball (dpkg-deb --fsys-tarfile | tar -xO <tarball> |
xz -dc | tar -x --wildcards ...), so the 1.5 GB tree is never written. Either way the folder is
kept per package version (made aside and published under a lock, see harness.cache), so the
slow path runs once per version.

Running (harness/scenarios/test_selftest.py): the guest has busybox ash, not bash. The script
is written for bash, but the only bashism ash lacks is $UID (bash sets it; ash does not, and
`[ $UID != 0 ]` then errors out), so it runs as `UID=0 sh mem-on-off-test.sh`: `local`,
$FUNCNAME, $RANDOM, `&>`, `echo -e`, bc and awk all work in busybox.
"""
from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

from harness import host
from harness.cache import cache_root, ensure_dir, entry_lock, is_complete, publish, scratch_dir
from harness.errors import KernelError, PackageError

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


parse_apt_candidate = host.parse_apt_candidate   # kept here: the scenario helpers' tests use it


def _debver_key(name: str) -> Tuple:
    """Sort key for "linux-source-6.1_6.1.192-2": numbers compare as numbers."""
    ver = name.split("_", 1)[-1]
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"[.\-+~]", ver))


def fetch(version: Sequence[int], cache: Optional[Union[str, Path]] = None) -> Selftest:
    """The memory-hotplug selftest folder of the kernel line of `version`, cached per package version."""
    line = kernel_line(version)
    pkg = f"linux-source-{line}"
    root = cache_root(cache)
    mine = root / "selftests"
    debver = host.apt_candidate(pkg)
    if debver is None:   # no apt lists (offline): the newest version already cached
        have = sorted((p.parent for p in mine.glob(f"{pkg}_*/{STAMP}")), key=lambda p: _debver_key(p.name))
        if have:
            return Selftest(have[-1], pkg, have[-1].name.split("_", 1)[1], "cache")
        raise PackageError(f"apt has no candidate for {pkg}; run apt-get update (bookworm: main / bookworm-security, "
                           f"6.12 from bookworm-backports or the deb12 security line)")
    dest = mine / f"{pkg}_{debver}"
    if is_complete(dest):
        return Selftest(dest, pkg, debver, "cache")
    tree = root / "src" / f"{pkg}_{debver}"
    if is_complete(tree) and (tree / pkg / SELFTEST_DIR / SCRIPT).is_file():
        _install(dest, f"{pkg} {debver} (from {tree})", lambda tmp: shutil.copytree(tree / pkg / SELFTEST_DIR,
                                                                                     tmp, dirs_exist_ok=True))
        return Selftest(dest, pkg, debver, "kbuild tree")
    host.require_tools("fetching the kernel selftest", "apt-get", "apt-cache", "dpkg-deb", "tar", "xz")
    deb = host.fetch_deb(pkg, debver, ensure_dir(root / "debs"))
    _install(dest, f"{pkg} {debver} (from {deb.name})", lambda tmp: _extract_selftest(deb, pkg, tmp))
    return Selftest(dest, pkg, debver, "deb")


def _extract_selftest(deb: Path, pkg: str, into: Path) -> None:
    """Only the selftest folder, streamed out of the package's tarball (the 1.5 GB tree is never written)."""
    with scratch_dir(into.parent, "selftest-x") as out:
        q = shlex.quote
        cmd = (f"set -o pipefail; dpkg-deb --fsys-tarfile {q(str(deb))} | tar -xO ./usr/src/{pkg}.tar.xz | "
               f"xz -dc | tar -x -C {q(str(out))} --wildcards '*/{SELFTEST_DIR}/*'")
        x = host.run(["bash", "-c", cmd], timeout=host.UNPACK_TIMEOUT, what=f"extracting the selftest from {deb.name}")
        found = out / pkg / SELFTEST_DIR
        if x.returncode != 0 or not (found / SCRIPT).is_file():
            raise PackageError(f"{deb.name}: no {SELFTEST_DIR}/{SCRIPT} in /usr/src/{pkg}.tar.xz: "
                               f"{host.one_line(x.stderr)}")
        shutil.copytree(found, into, dirs_exist_ok=True)


def _install(dest: Path, stamp: str, fill) -> None:
    """Make dest with fill(tmp) in a scratch folder and publish it under dest's lock."""
    with entry_lock(dest):
        if is_complete(dest):
            return
        with scratch_dir(ensure_dir(dest.parent), "selftest") as tmp:
            fill(tmp)
            publish(tmp, dest, stamp)


# ---------------------------------------------------------------- judging (pure)
@dataclass(frozen=True)
class SelftestOutcome:
    status: str                        # "pass" | "fail" | "skip"
    exit_code: int
    skip_reasons: Tuple[str, ...] = ()     # "skip all tests: ..." / "skip extra tests: ..." lines
    failures: Tuple[str, ...] = ()         # "... unexpected ..." and "FAILED" lines
    extra_ran: bool = False                # the notifier error injection half ran to its end
    offline_results: Tuple[str, ...] = field(default=())   # "-> Success" / "-> Failure" per offline try
    expected_exit: int = KSFT_PASS         # what the script's own logic returns for this output (judge())

    @property
    def ok(self) -> bool:
        return self.status == "pass"


def judge(exit_code: int, output: str) -> SelftestOutcome:
    """kselftest verdict from the script's exit code and output.

    exit 0 = pass, 4 (ksft_skip) = skip, anything else = fail. expected_exit follows the
    script's own logic (mem-on-off-test.sh): prerequisite() exits $ksft_skip after a
    "skip all tests:" line; otherwise every step that fails sets retval=1 and prints an
    "unexpected" or "FAILED" line, and prerequisite_extra() exits $retval after "skip extra
    tests:" (no debugfs, or no memory-notifier-error-inject): 0 when the first half passed.
    So a kernel without those debug facilities passes, with the skip in skip_reasons and
    extra_ran=False.
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
    if any("skip all tests:" in s for s in skips):
        expected = KSFT_SKIP
    else:
        expected = KSFT_FAIL if fails else KSFT_PASS
    return SelftestOutcome(status, exit_code, skips, fails, extra, offl, expected)
