"""memhp bisect: from "this kernel fails" to the first bad commit, on a real kernel git tree.

Where it works (cache folder bisect/<key>/, key = the repo, base config, fragments, compiler):

  src/          `git clone --shared --no-checkout` of the user's repo: its own HEAD, index, work
                tree and refs/bisect/*, reading the user's objects through .git/objects/info/alternates.
                Nothing is ever written to the user's repo (not even a worktree registration), so
                Ctrl-C cannot leave anything behind there. It stays between runs: the next bisect
                checks out only the files that differ.
  obj/          the one object tree (make O=obj) every step builds in; git rewrites only the files
                that differ between two commits, so make rebuilds only what changed
  steps/        one JSON record per tested commit (verdict, runs, timings): a rerun with the same
                arguments replays them instead of building and booting again
  logs/         build and test logs of every step, each run's folder (memhp run --artifacts: its
                report.json and artifacts) and the first bad commit's patch
  ../../ccache  ccache's folder, shared by every bisect (CC="ccache gcc")

Every step regenerates .config from scratch (base, the tree's kvm_guest.config, the fragments,
olddefconfig) at the step's commit, so a Kconfig change between commits never leaves a stale
config in the reused object tree. A finished build is published to builds/<key> under the same
key `memhp kernel build --tree` computes for a clean tree at that commit (commit, fragments,
patches, compiler), so a step and a later `memhp run` share it.

The verdict of a step compares failure signatures: the set of (scenario, outcome, check name
or splat title) the bad endpoint failed with. A run that shows one of them is bad; one that
passes is good; one that fails only differently (another scenario or check, a panic elsewhere,
a build error, the host) is skip, with the reason. With --repeat N (syzkaller's rule) a step is
good when no run was bad and at least half gave a verdict, bad when a run was bad and at least
half gave a verdict, else skip. A step left without a verdict where a run failed because of the
host (memhp run exit 125) is not skip: the bisect stops with exit 3 and records nothing for it.

When a commit is found, the tree's own scripts/get_maintainer.pl (at that commit, in src/) gives
To and Cc for the regression email (linux-mm when it fails, and why); they go, with the first bad
commit, its parent and the run counts on each, into the "bisect" block of the report.json of the
culprit's last failing run, so `memhp report THAT_RUN --format email` renders the report.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness import host
from harness.cache import cache_root, ensure_dir, hash_inputs, is_complete, locked
from harness.errors import ConfigSymbolsDropped, InfraError, KernelBuildError, UsageError
from harness.kernels import kbuild
from harness.kernels.kconfig import dropped_symbols, parse_config, parse_fragment
from harness.reports import report

GOOD, BAD, SKIP = "good", "bad", "skip"
EXIT_FOUND, EXIT_INCONCLUSIVE, EXIT_USAGE, EXIT_INFRA = 0, 1, 2, 3
STEP_TIMEOUT = 3 * 3600.0        # one `memhp run` of a step (the whole suite on TCG fits)
INFRA_STATUS = 125               # `memhp run --bisect`: infrastructure
GET_MAINTAINER_TIMEOUT = 120.0   # scripts/get_maintainer.pl on one patch (about a second)
_TIMESTAMP = re.compile(r"\[\s*\d+\.\d+\]\s*")
# what `make tinyconfig` + merge_config.sh + olddefconfig read besides the fragments
CONFIG_PATHS = (":(glob)**/Kconfig*", "scripts", "kernel/configs", "arch/x86/configs", "Makefile",
                "arch/x86/Makefile")
_HEX = re.compile(r"\b(?:0x)?[0-9a-f]{8,}\b")


class EndpointError(UsageError):
    """--bad does not fail, or --good does not pass: nothing to bisect (exit 2); details: both results."""

    def __init__(self, msg: str, details: str = ""):
        super().__init__(msg)
        self.details = details


class BisectInfraError(InfraError):
    """The host could not build or test an endpoint, or git failed (exit 3)."""


# ---------------------------------------------------------------- signatures and verdicts (pure)

Failure = Tuple[str, str, str]      # (scenario, outcome, check name / splat title / "")


def failure_detail(outcome: str, message: str) -> str:
    """The part of a result's message that identifies the failure: check names or the splat title.

    FAIL: "name: expected ..." gives name; "N checks failed (a, b)" gives "a, b". CRASH: the
    first line without its timestamp and addresses. HANG and others: "" (the scenario says it).
    """
    first = (message.strip().splitlines() or [""])[0]
    if outcome == report.FAIL:
        first = re.sub(r"^CheckFailed: ", "", first)     # report.json's messages name the exception class
        m = re.match(r"^\d+ checks failed \((.*)\)", first)
        if m:
            return m.group(1)
        return first.split(": expected ", 1)[0] if ": expected " in first else first[:120]
    if outcome == report.CRASH:
        title = _TIMESTAMP.sub("", first.replace("guest ", "", 1))
        return _HEX.sub("X", title)[:160]
    return ""


def signature(results: Sequence[Dict[str, Any]]) -> List[Failure]:
    """The kernel failures of a run (report.json's results), sorted."""
    out = set()
    for r in results:
        if r.get("outcome") in report.KERNEL_FAILURES:
            out.add((str(r["name"]), str(r["outcome"]), failure_detail(str(r["outcome"]), str(r.get("message", "")))))
    return sorted(out)


def run_verdict(status: int, failures: Sequence[Failure], bad_sig: Sequence[Failure]) -> Tuple[str, str]:
    """One `memhp run --bisect` (status, failures) against the bad endpoint's signature."""
    if status == 0:
        return GOOD, "passed"
    if status == 1:
        same = [f for f in failures if tuple(f) in {tuple(b) for b in bad_sig}]
        if same:
            return BAD, "same failure: " + _fmt(same[0])
        return SKIP, "a different failure: " + "; ".join(_fmt(f) for f in failures[:2])
    if status == 125:
        return SKIP, "infrastructure (memhp run exit 125)"
    return SKIP, f"memhp run exited {status}"


def _fmt(f: Sequence[str]) -> str:
    return f"{f[0]} {str(f[1]).upper()}" + (f" {f[2]}" if f[2] else "")


def step_verdict(verdicts: Sequence[str], runs: int) -> str:
    """syzkaller's rule over the runs of one step: good/bad need at least half the runs to give a verdict."""
    decided = sum(1 for v in verdicts if v in (GOOD, BAD))
    if decided * 2 < runs:
        return SKIP
    return BAD if BAD in verdicts else GOOD


def decided_early(verdicts: Sequence[str], runs: int) -> bool:
    """A bad run plus half the runs decided makes the step bad whatever the rest would say."""
    decided = sum(1 for v in verdicts if v in (GOOD, BAD))
    return BAD in verdicts and decided * 2 >= runs


def missed_probability(rate: float, good_runs: Sequence[int]) -> float:
    """The issue's "probability that a good verdict missed the bug": the product over the good
    steps of (1 - rate)^runs, runs being the step's runs that gave a verdict.

    A good step with n runs would miss a bug reproducing at `rate` with (1 - rate)^n; the
    product is the chance that every good step missed it. No good step: 1.0 (empty product).
    """
    p = 1.0
    for n in good_runs:
        p *= (1.0 - rate) ** n
    return p


def any_missed_probability(rate: float, good_runs: Sequence[int]) -> float:
    """The chance that at least one good step would have missed a bug present there:
    1 - prod(1 - (1 - rate)^runs). A bound on a misdirected bisect (one wrong "good" suffices);
    reported beside missed_probability, under its own name."""
    p_none = 1.0
    for n in good_runs:
        p_none *= 1.0 - (1.0 - rate) ** n
    return 1.0 - p_none


def k_for(failures: Sequence[Failure]) -> str:
    """A pytest -k expression selecting the scenarios of a signature (test names, no parameters)."""
    names = sorted({f[0].split("::")[-1].split("[")[0] for f in failures})
    return " or ".join(names)


# ---------------------------------------------------------------- records

@dataclass
class Step:
    commit: str
    subject: str
    role: str                        # "bad endpoint", "good endpoint", "step"
    verdict: str = SKIP
    why: str = ""
    build_s: float = 0.0
    test_s: float = 0.0
    runs: List[Dict[str, Any]] = field(default_factory=list)   # per run: status, verdict, why, failures
    build: str = ""                  # builds/<key> folder, "" when the build failed
    recorded: bool = False           # replayed from an earlier run's record

    @property
    def bad_runs(self) -> int:
        return sum(1 for r in self.runs if r["verdict"] == BAD)

    @property
    def decided_runs(self) -> int:
        return sum(1 for r in self.runs if r["verdict"] in (GOOD, BAD))


@dataclass(frozen=True)
class Options:
    tree: Path
    good: str
    bad: str
    k: Optional[str] = None
    fragments: Tuple[Path, ...] = ()
    patches: Tuple[Path, ...] = ()
    repeat: int = 1
    json_path: Optional[Path] = None
    base: str = "tinyconfig"
    jobs: Optional[int] = None
    cache: Optional[Path] = None


# ---------------------------------------------------------------- git

def _git(args: Sequence[str], cwd: Path, check: bool = True):
    return kbuild.git(args, cwd, check=check)


def _resolve(tree: Path, rev: str, what: str) -> str:
    r = _git(["rev-parse", "--verify", "--end-of-options", rev + "^{commit}"], tree, check=False)
    if r.returncode != 0:
        raise UsageError(f"{what} {rev!r} is not a commit of {tree}")
    return r.stdout.strip()


def check_inputs(o: Options) -> Tuple[str, str]:
    """Bad input, before anything is built: the tree, the revisions, their order, the files."""
    tree = o.tree
    if not tree.is_dir() or not kbuild.is_git_tree(tree):
        raise UsageError(f"--tree {tree} is not the top of a git work tree")
    if not (tree / "scripts" / "kconfig" / "merge_config.sh").is_file():
        raise UsageError(f"--tree {tree} is not a kernel source tree (no scripts/kconfig/merge_config.sh)")
    if o.repeat < 1 or o.repeat > 100:
        raise UsageError("--repeat takes 1..100")
    for f in (*o.fragments, *o.patches):
        if not f.is_file() or not os.access(f, os.R_OK):
            raise UsageError(f"cannot read {f}")
    good, bad = _resolve(tree, o.good, "--good"), _resolve(tree, o.bad, "--bad")
    if good == bad:
        raise UsageError(f"--good and --bad are the same commit {good[:12]}")
    if _git(["merge-base", "--is-ancestor", bad, good], tree, check=False).returncode == 0:
        raise UsageError(f"--bad {o.bad} ({bad[:12]}) is an ancestor of --good {o.good} ({good[:12]}): "
                         f"swapped? --good must be the older commit")
    if _git(["merge-base", "--is-ancestor", good, bad], tree, check=False).returncode != 0:
        raise UsageError(f"--good {o.good} ({good[:12]}) is not an ancestor of --bad {o.bad} ({bad[:12]})")
    if o.json_path is not None:
        parent = o.json_path.parent if str(o.json_path.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UsageError(f"--json {o.json_path}: folder {parent} is not a writable folder")
    return good, bad


# ---------------------------------------------------------------- the bisector

class Bisector:
    """One bisect folder (locked for the whole run): the clone, the object tree, the records."""

    def __init__(self, o: Options, good: str, bad: str, log=print):
        self.o, self.good, self.bad, self.say = o, good, bad, log
        self.root = cache_root(o.cache)
        self.compiler = kbuild.compiler_id()
        self.frags = tuple(kbuild.default_fragments()) + tuple(Path(f).resolve() for f in o.fragments)
        common = _git(["rev-parse", "--path-format=absolute", "--git-common-dir"], o.tree).stdout.strip()
        parts: List[Any] = ["memhp-bisect-1", str(Path(common).resolve()), o.base, self.compiler]
        for f in self.frags:
            parts += [f.name, f.read_bytes()]
        self.key = hash_inputs(parts)
        self.dir = ensure_dir(self.root / "bisect" / self.key)
        self.src, self.obj = self.dir / "src", self.dir / "obj"
        self.ccache = ensure_dir(self.root / "ccache")
        self.steps: List[Step] = []
        self.started = time.monotonic()

    # -- keys
    def build_key(self, commit: str) -> str:
        """The key kbuild.build gives a clean tree at commit: the two commands share the build."""
        return kbuild.commit_build_key(commit, self.o.base, self.frags, self.o.patches, self.compiler)

    def record_path(self, commit: str, role: str, bad_sig: Sequence[Failure]) -> Path:
        parts: List[Any] = ["step-1", commit, self.build_key(commit), self.o.k or "", str(self.o.repeat),
                            role, json.dumps([list(f) for f in bad_sig])]
        return ensure_dir(self.dir / "steps") / f"{commit[:12]}-{hash_inputs(parts)}.json"

    # -- the clone
    def prepare_clone(self) -> None:
        if not (self.src / ".git").is_dir():
            if self.src.exists():
                shutil.rmtree(self.src)
            tmp = self.dir / "src.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            # --shared: objects are read through alternates, the user's repo is only read
            r = host.run(["git", "clone", "-q", "--shared", "--no-checkout", str(self.o.tree), str(tmp)],
                         timeout=host.GIT_TIMEOUT, what="git clone --shared")
            if r.returncode != 0:
                raise BisectInfraError(f"git clone --shared {self.o.tree}: {host.one_line(r.stderr)}")
            tmp.rename(self.src)
        # a bisect a Ctrl-C left behind; stay at the current commit (no full checkout)
        if (self.src / ".git" / "BISECT_START").exists():
            _git(["bisect", "reset", "HEAD"], self.src, check=False)

    def checkout(self, commit: str) -> None:
        """The work tree at commit, clean; only files that differ are rewritten (mtimes of the rest kept)."""
        _git(["update-index", "-q", "--refresh"], self.src, check=False)
        _git(["checkout", "-q", "--force", "--detach", commit], self.src)
        _git(["clean", "-fdq"], self.src)

    def head(self) -> str:
        return _git(["rev-parse", "HEAD"], self.src).stdout.strip()

    # -- build
    def _make(self, *targets: str) -> List[str]:
        return ["make", f"O={self.obj}", "ARCH=x86_64", "CC=ccache gcc", *targets]

    def build(self, commit: str, logs: Path) -> Tuple[Optional[Path], str, float]:
        """(builds/<key> or None, why it failed, seconds). Assumes src is at commit."""
        key = self.build_key(commit)
        out = self.root / "builds" / key
        if is_complete(out):
            return out, "cached build", 0.0
        started = time.monotonic()
        # CCACHE_BASEDIR: paths under the cache are hashed relative to obj/ (../src/...), so two
        # bisect folders (another clone path, a rerun after the cache moved) share ccache's entries
        env = dict(os.environ, ARCH="x86_64", LC_ALL="C", CCACHE_DIR=str(self.ccache), CCACHE_MAXSIZE="5G",
                   CCACHE_BASEDIR=str(self.root), CCACHE_NOHASHDIR="1",
                   KBUILD_BUILD_TIMESTAMP="memhp", KBUILD_BUILD_USER="memhp", KBUILD_BUILD_HOST="memhp")
        log = kbuild.BuildLog(logs / f"build-{commit[:12]}.log")
        try:
            if self.o.patches:
                base = self.head()
                kbuild.apply_series_git(self.src, base, list(self.o.patches), log, self.o.tree)
            self.configure(commit, env, log)
            requested: Dict[str, str] = {}
            for f in self.frags:
                requested.update(parse_fragment(f.read_text()))
            dropped = dropped_symbols(requested, parse_config((self.obj / ".config").read_text()))
            if dropped:
                raise ConfigSymbolsDropped(dropped)
            jobs = self.o.jobs or os.cpu_count() or 1
            log.run(self._make(f"-j{jobs}", "bzImage"), cwd=self.src, env=env, what="make bzImage")
            config = parse_config((self.obj / ".config").read_text())
            has_modules = config.get("CONFIG_MODULES") == "y" and "m" in config.values()
            if has_modules:
                log.run(self._make(f"-j{jobs}", "modules"), cwd=self.src, env=env, what="make modules")
            release = host.check(self._make("-s", "kernelrelease"), cwd=self.src, env=env,
                                 timeout=host.QUICK_TIMEOUT, what="make kernelrelease").stdout.strip()
            seconds = time.monotonic() - started
            kbuild.publish_build(out, self.dir, self.o.tree, self.o.base, self.frags, self.o.patches, self.compiler,
                                 release, has_modules, log, seconds, spec=f"build:{self.o.tree}@{commit[:12]}")
            return out, "", time.monotonic() - started
        except (KernelBuildError, ConfigSymbolsDropped, kbuild.PatchError) as e:
            return None, f"build failed: {_first_error(log.path) or host.one_line(str(e), 200)}", \
                time.monotonic() - started
        finally:
            if self.o.patches:
                self.checkout(commit)

    def configure(self, commit: str, env: Dict[str, str], log) -> None:
        """obj/.config as a from-scratch build at commit would have it (base, fragments, olddefconfig).

        Regenerated unless the previous step's .config came from the same base and fragments at a
        commit whose config inputs (every Kconfig file, scripts/, the config fragments of the tree,
        the Makefiles that set the toolchain) are identical: then it is the same file, byte for byte.
        """
        ensure_dir(self.obj)
        stamp = self.obj / ".memhp-config.json"
        inputs = hash_inputs([self.o.base, *self.frags])
        patched = bool(self.o.patches)    # a patch can touch Kconfig: always regenerate
        if stamp.is_file() and (self.obj / ".config").is_file() and not patched:
            try:
                was = json.loads(stamp.read_text())
            except ValueError:
                was = {}
            if was.get("inputs") == inputs and was.get("commit") and _git(
                    ["diff", "--quiet", was["commit"], commit, "--", *CONFIG_PATHS], self.src,
                    check=False).returncode == 0:
                log.note(f"# .config inputs unchanged since {was['commit'][:12]}: .config kept")
                return
        if stamp.exists():
            stamp.unlink()
        merge = [self.src / t for t in kbuild.TREE_FRAGMENTS if (self.src / t).is_file()] + list(self.frags)
        log.run(self._make(self.o.base), cwd=self.src, env=env, what=f"make {self.o.base}",
                timeout=host.CONFIG_TIMEOUT)
        log.run(["sh", "scripts/kconfig/merge_config.sh", "-m", "-O", self.obj, self.obj / ".config", *merge],
                cwd=self.src, env=env, what="merge_config.sh", timeout=host.CONFIG_TIMEOUT)
        log.run(self._make("olddefconfig"), cwd=self.src, env=env, what="make olddefconfig",
                timeout=host.CONFIG_TIMEOUT)
        if not patched:
            stamp.write_text(json.dumps({"commit": commit, "inputs": inputs}))

    # -- test
    def test_once(self, build: Path, k: Optional[str], logs: Path, n: int) -> Tuple[int, List[Failure], str, str]:
        """One `memhp run --bisect` of the build; (status, failures, its output's log, its run folder).

        The run folder (--artifacts) holds report.json and the artifacts `memhp report` renders."""
        name = f"run-{build.name}-{n}"
        rj, art = logs / f"{name}.json", logs / name
        if rj.exists():
            rj.unlink()
        if art.exists():
            shutil.rmtree(art)
        argv = [sys.executable, "-m", "harness", "run", "--bisect", "--kernel", str(build), "--json", str(rj),
                "--artifacts", str(art)]
        if k:
            argv += ["-k", k]
        with open(logs / f"{name}.log", "w") as fh:
            r = host.run(argv, timeout=STEP_TIMEOUT, log=fh, what="memhp run --bisect", die_with_parent=True,
                         cwd=Path(__file__).resolve().parents[2])
        if r.returncode == 130:
            raise KeyboardInterrupt
        if r.returncode == 128:      # bad input (e.g. a -k that selects nothing): every step would say so
            said = [ln for ln in (logs / f"{name}.log").read_text(errors="replace").splitlines() if ln.strip()]
            raise UsageError(f"memhp run refused the input: {said[-1] if said else 'exit 128'}")
        failures: List[Failure] = []
        if rj.is_file():
            try:
                failures = signature(json.loads(rj.read_text()).get("results", []))
            except ValueError:
                pass
        return r.returncode, failures, str(logs / f"{name}.log"), str(art)

    # -- one commit
    def run_step(self, commit: str, role: str, bad_sig: Sequence[Failure], k: Optional[str]) -> Step:
        rec = self.record_path(commit, role, bad_sig)
        if rec.is_file():
            try:
                s = Step(**json.loads(rec.read_text()))
                s.recorded = True
                self._show(s)
                self.steps.append(s)
                return s
            except (TypeError, ValueError):
                rec.unlink()
        self.checkout(commit)
        s = Step(commit, _subject(self.src, commit), role)
        logs = ensure_dir(self.dir / "logs")
        build, why, s.build_s = self.build(commit, logs)
        if build is None:
            s.verdict, s.why = SKIP, why
        else:
            s.build = str(build)
            started = time.monotonic()
            verdicts: List[str] = []
            for n in range(self.o.repeat):
                status, failures, logfile, art = self.test_once(build, k, logs, n)
                if role == "bad endpoint":
                    v, w = (BAD, "failed") if status == 1 else ((GOOD, "passed") if status == 0
                                                                else (SKIP, f"memhp run exited {status}"))
                else:
                    v, w = run_verdict(status, failures, bad_sig)
                s.runs.append({"status": status, "verdict": v, "why": w, "failures": [list(f) for f in failures],
                               "log": logfile, "dir": art})
                verdicts.append(v)
                if role == "step" and decided_early(verdicts, self.o.repeat):
                    break
            s.test_s = time.monotonic() - started
            s.verdict = step_verdict(verdicts, self.o.repeat)
            s.why = _why(s)
            infra = [r for r in s.runs if r["status"] == INFRA_STATUS]
            if s.verdict == SKIP and infra:
                # The host, not the commit: stop (exit 3) without recording, so a rerun tests it again.
                self.steps.append(s)
                self._show(s)
                raise BisectInfraError(f"{role} {commit[:12]}: memhp run could not test it (infrastructure, "
                                       f"exit {INFRA_STATUS}): {_last_line(infra[-1]['log'])}")
        rec.write_text(json.dumps({k2: v2 for k2, v2 in asdict(s).items() if k2 != "recorded"}, indent=1))
        self._show(s)
        self.steps.append(s)
        return s

    # -- the regression report
    def maintainers(self, sha: str) -> Tuple[List[str], List[str], str]:
        """To and Cc for the first bad commit, and where they came from.

        The tree's own scripts/get_maintainer.pl (as of that commit, in memhp's clone, never the
        user's tree) reads the commit's `git format-patch`: maintainers, reviewers and supporters go
        to To, lists and the rest to Cc. When it cannot run or prints nobody: linux-mm, and why.
        """
        from harness.reports.mail import LINUX_MM
        argv = ["perl", "scripts/get_maintainer.pl", "--no-git", "--no-git-fallback", "--roles", "--no-rolestats"]
        try:
            self.checkout(sha)
            if not (self.src / "scripts" / "get_maintainer.pl").is_file():
                raise _NoMaintainers(f"{sha[:12]} has no scripts/get_maintainer.pl")
            patch = _git(["format-patch", "-1", "--stdout", sha], self.src).stdout
            (ensure_dir(self.dir / "logs") / f"first-bad-{sha[:12]}.patch").write_text(patch)
            r = host.run(argv, cwd=self.src, input=patch, timeout=GET_MAINTAINER_TIMEOUT,
                         env=dict(os.environ, LC_ALL="C"), what="scripts/get_maintainer.pl", die_with_parent=True)
            if r.returncode != 0:
                raise _NoMaintainers(f"exit {r.returncode}: {host.one_line(r.stderr or r.stdout, 200)}")
            to, cc = split_maintainers(r.stdout)
            if not to and not cc:
                raise _NoMaintainers("it printed no address")
            how = f"scripts/get_maintainer.pl {' '.join(argv[2:])} on `git format-patch -1 {sha[:12]}`"
            self.say(f"memhp bisect: To/Cc from {how}: {len(to)} To, {len(cc)} Cc", file=sys.stderr, flush=True)
            return to, cc, how
        except (_NoMaintainers, InfraError) as e:
            why = f"scripts/get_maintainer.pl gave no recipients ({host.one_line(str(e), 300)}); " \
                  f"the report goes to {LINUX_MM}"
            self.say(f"memhp bisect: {why}", file=sys.stderr, flush=True)
            return [LINUX_MM], [], why

    def regression_report(self, fb: Dict[str, Any], sig: Sequence[Failure], bisect_log: str) -> Dict[str, Any]:
        """The "bisect" block `memhp report RUN_DIR --format email` reads, written into the report.json of
        the first bad commit's last failing run; returns {run_dir, to, cc, recipients_from, bisect}."""
        sha = fb["sha"]
        to, cc, how = self.maintainers(sha)
        par = _git(["rev-parse", "--verify", "-q", sha + "^"], self.src, check=False).stdout.strip()
        bad_step = next((st for st in reversed(self.steps) if st.commit == sha and st.verdict == BAD), None)
        par_step = next((st for st in reversed(self.steps) if st.commit == par and st.verdict == GOOD), None)
        block: Dict[str, Any] = {"first_bad": {"sha": sha, "subject": fb["subject"]},
                                 "parent": {"sha": par, "subject": _subject(self.src, par) if par else ""},
                                 "to": to, "cc": cc, "log": bisect_log, "recipients_from": how}
        if bad_step is not None and par_step is not None:
            block["counts"] = run_counts(par_step.runs, bad_step.runs, sig)
        out: Dict[str, Any] = {"run_dir": None, "to": to, "cc": cc, "recipients_from": how, "bisect": block}
        run_dir = next((Path(r["dir"]) for r in reversed(bad_step.runs) if r["verdict"] == BAD and r.get("dir")),
                       None) if bad_step else None
        rj = run_dir / "report.json" if run_dir else None
        if rj is None or not rj.is_file():
            self.say(f"memhp bisect: no run folder of {sha[:12]} with a report.json to add the bisection to",
                     file=sys.stderr, flush=True)
            return out
        try:
            doc = json.loads(rj.read_text())
        except ValueError as e:
            raise BisectInfraError(f"{rj} is not JSON: {e}") from None
        doc["bisect"] = block
        kernel = doc.setdefault("kernel", {})
        kernel.setdefault("tree", str(self.o.tree))
        kernel.setdefault("commit", sha)
        kernel.setdefault("commit_subject", fb["subject"])
        tmp = rj.with_name(rj.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, rj)
        out["run_dir"] = str(run_dir)
        return out

    def _show(self, s: Step) -> None:
        self.say(f"memhp bisect: {s.commit[:12]} {s.role}: {s.verdict} ({s.why}); build {s.build_s:.0f}s, "
                 f"test {s.test_s:.0f}s{' (recorded)' if s.recorded else ''}", file=sys.stderr, flush=True)


class _NoMaintainers(Exception):
    """scripts/get_maintainer.pl could not give recipients (the fallback's reason)."""


_ROLE = re.compile(r"^(.+?) \((.*)\)$")
_TO_ROLES = ("maintainer", "reviewer", "supporter", "odd fixer")


def split_maintainers(output: str) -> Tuple[List[str], List[str]]:
    """get_maintainer.pl --roles --no-rolestats output as (to, cc): maintainers, reviewers,
    supporters and odd fixers to To, lists and everyone else to Cc; each address once."""
    to: List[str] = []
    cc: List[str] = []
    for line in output.splitlines():
        line = line.strip()
        if "@" not in line:
            continue
        m = _ROLE.match(line)
        addr, roles = (m.group(1), m.group(2)) if m else (line, "")
        if addr in to or addr in cc:
            continue
        first = [r.split(":", 1)[0].strip().lower() for r in roles.split(",")]
        (to if any(r in _TO_ROLES for r in first) else cc).append(addr)
    return to, cc


def run_counts(parent_runs: Sequence[Dict[str, Any]], bad_runs: Sequence[Dict[str, Any]],
               sig: Sequence[Failure]) -> List[Dict[str, Any]]:
    """The kernel test robot's table as data: runs on the parent and on the first bad commit, then
    for each failure of the signature how many runs showed it on each."""
    def showing(runs: Sequence[Dict[str, Any]], f: Failure) -> int:
        return sum(1 for r in runs if tuple(f) in {tuple(x) for x in r["failures"]})
    counts = [{"label": "runs", "good": len(parent_runs), "bad": len(bad_runs)}]
    counts += [{"label": _fmt(f), "good": showing(parent_runs, f), "bad": showing(bad_runs, f)} for f in sig]
    return counts


def _why(s: Step) -> str:
    if len(s.runs) == 1:
        return s.runs[0]["why"]
    counts = ", ".join(f"{sum(1 for r in s.runs if r['verdict'] == v)} {v}" for v in (BAD, GOOD, SKIP))
    first_bad = next((r["why"] for r in s.runs if r["verdict"] == BAD), None)
    first_skip = next((r["why"] for r in s.runs if r["verdict"] == SKIP), None)
    return f"{len(s.runs)} runs: {counts}" + (f"; {first_bad}" if first_bad else "") + \
        (f"; skip: {first_skip}" if first_skip and not first_bad else "")


def _last_line(log: str) -> str:
    """The last line a `memhp run` printed (its one-line error)."""
    try:
        lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(no output)"


def _first_error(log: Path) -> str:
    try:
        for line in log.read_text(errors="replace").splitlines():
            if ": error: " in line or line.startswith("make[") and "Error" in line:
                return line.strip()[:200]
    except OSError:
        pass
    return ""


def _subject(repo: Path, commit: str) -> str:
    return _git(["log", "-1", "--format=%s", commit], repo).stdout.strip()


# ---------------------------------------------------------------- the workflow

@dataclass
class Outcome:
    status: int                      # 0 found, 1 inconclusive, 2 endpoints, 3 infra
    message: str
    first_bad: Optional[Dict[str, Any]]
    candidates: List[str]
    bisect_log: str
    steps: List[Step]
    signature: List[Failure]
    rate: Optional[float]
    missed: Optional[float]          # missed_probability (the product)
    any_missed: Optional[float]      # any_missed_probability
    wall_s: float
    report: Optional[Dict[str, Any]] = None    # Bisector.regression_report, when a commit was found


def bisect(o: Options, say=print) -> Outcome:
    """The whole workflow; raises UsageError before anything is built, EndpointError after the endpoints."""
    good, bad = check_inputs(o)
    b = Bisector(o, good, bad, say)
    with locked(b.dir / "lock"):
        b.prepare_clone()
        return _bisect(b, o, good, bad)


def _bisect(b: Bisector, o: Options, good: str, bad: str) -> Outcome:
    bs = b.run_step(bad, "bad endpoint", (), o.k)
    if bs.verdict != BAD:
        raise _endpoint_error(b, "--bad", bs, "does not fail")
    sig: List[Failure] = sorted({tuple(f) for r in bs.runs for f in r["failures"]})   # type: ignore[misc]
    rate = bs.bad_runs / bs.decided_runs if bs.decided_runs else 0.0
    k = o.k or k_for(sig)
    gs = b.run_step(good, "good endpoint", sig, k)
    if gs.verdict != GOOD:
        raise _endpoint_error(b, "--good", gs, "does not pass" if gs.verdict == BAD else "gave no verdict")
    src = b.src
    out = _git(["bisect", "start", bad, good], src, check=False)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise BisectInfraError(f"git bisect start failed: {host.one_line(text)}")
    result, candidates = _finished(text)
    while result is None and not candidates:
        commit = b.head()
        s = b.run_step(commit, "step", sig, k)
        r = _git(["bisect", s.verdict], src, check=False)
        text = r.stdout + r.stderr
        result, candidates = _finished(text)
        if result is None and not candidates and r.returncode != 0:
            raise BisectInfraError(f"git bisect {s.verdict} failed: {host.one_line(text)}")
    log = _git(["bisect", "log"], src).stdout
    _git(["bisect", "reset", "HEAD"], src, check=False)
    good_runs = [s.decided_runs for s in b.steps if s.verdict == GOOD]
    missed = missed_probability(rate, good_runs) if o.repeat > 1 else None
    any_missed = any_missed_probability(rate, good_runs) if o.repeat > 1 else None
    wall = time.monotonic() - b.started
    if result:
        fb = _commit_info(src, result)
        rep = b.regression_report(fb, sig, log)
        msg = f"first bad commit: {result[:12]} {fb['subject']}"
        return Outcome(EXIT_FOUND, msg, fb, [], log, b.steps, sig, rate, missed, any_missed,
                       time.monotonic() - b.started, rep)
    msg = f"inconclusive: only skipped commits left; the first bad commit is one of {len(candidates)}"
    return Outcome(EXIT_INCONCLUSIVE, msg, None, candidates, log, b.steps, sig, rate, missed, any_missed, wall)


def _finished(text: str) -> Tuple[Optional[str], List[str]]:
    """git bisect's answer: (first bad sha, []) | (None, candidate shas when only skips are left) | (None, [])."""
    m = re.search(r"^([0-9a-f]{40}) is the first bad commit", text, re.M)
    if m:
        return m.group(1), []
    if "There are only 'skip'ped commits left to test." in text:
        return None, re.findall(r"^([0-9a-f]{40})$", text, re.M)
    return None, []


def _commit_info(repo: Path, sha: str) -> Dict[str, Any]:
    fmt = _git(["show", "-s", "--format=%H%n%s%n%an <%ae>", sha], repo).stdout.splitlines()
    files = _git(["diff-tree", "--no-commit-id", "--name-only", "-r", sha], repo).stdout.split()
    return {"sha": fmt[0], "subject": fmt[1], "author": fmt[2], "files": files}


def _endpoint_error(b: Bisector, which: str, s: Step, what: str) -> EndpointError:
    results = "\n".join(f"  {st.role} {st.commit[:12]} {st.subject}: {st.verdict} ({st.why})" for st in b.steps)
    return EndpointError(f"{which} {s.commit[:12]} {what}: nothing to bisect (results above)", results)


# ---------------------------------------------------------------- output

def render(out: Outcome, repeat: int) -> str:
    lines = [f"memhp bisect: {out.message}"]
    if out.first_bad:
        fb = out.first_bad
        lines += [f"commit {fb['sha']}", f"Author: {fb['author']}", f"    {fb['subject']}", "files:"]
        lines += [f"    {f}" for f in fb["files"]]
    if out.candidates:
        lines.append("the first bad commit could be any of:")
        for c in out.candidates:
            st = next((x for x in reversed(out.steps) if x.commit == c), None)
            what = f"{st.verdict}: {st.why}" if st else "not tested"
            lines.append(f"    {c} ({what})")
    lines.append("failure signature (from the bad endpoint):")
    lines += [f"    {_fmt(f)}" for f in out.signature]
    if repeat > 1 and out.rate is not None:
        lines.append(f"reproduction rate on the bad endpoint: {out.rate:.2f}")
        lines.append(f"probability that a good verdict missed the bug (product over good steps of "
                     f"(1 - rate)^runs): {out.missed:.3g}")
        lines.append(f"probability that at least one good step would have missed a bug present there "
                     f"(1 - product of (1 - (1 - rate)^runs)): {out.any_missed:.3g}")
    lines += ["", f"{'COMMIT':<12}  {'ROLE':<13}  {'BUILD':>6}  {'TEST':>6}  {'VERDICT':<7}  WHY"]
    for s in out.steps:
        lines.append(f"{s.commit[:12]}  {s.role:<13}  {s.build_s:5.0f}s  {s.test_s:5.0f}s  {s.verdict:<7}  "
                     f"{s.why}{' (recorded)' if s.recorded else ''}")
    lines += ["", "git bisect log:", out.bisect_log.rstrip("\n")]
    if out.report:
        r = out.report
        lines += ["", f"regression report To: {', '.join(r['to']) or '-'}", f"regression report Cc: {', '.join(r['cc']) or '-'}",
                  f"    ({r['recipients_from']})"]
        if r["run_dir"]:
            lines.append(f"render it: memhp report {r['run_dir']} --format email")
    lines += ["", f"total wall time: {out.wall_s:.0f}s"]
    return "\n".join(lines)


def to_json(out: Outcome) -> Dict[str, Any]:
    return {"status": out.status, "message": out.message, "first_bad_commit": out.first_bad,
            "candidates": out.candidates, "skipped": skipped_of(out),
            "signature": [list(f) for f in out.signature],
            "reproduction_rate": out.rate, "missed_probability": out.missed,
            "any_missed_probability": out.any_missed,
            "steps": [asdict(s) for s in out.steps], "bisect_log": out.bisect_log, "wall_seconds": round(out.wall_s, 1),
            "report": out.report}


def skipped_of(out: Outcome) -> List[Dict[str, str]]:
    """The candidates git bisect could not decide because memhp skipped them, with the reason."""
    skipped = []
    for c in out.candidates:
        st = next((x for x in reversed(out.steps) if x.commit == c), None)
        if st is not None and st.verdict == SKIP:
            skipped.append({"commit": c, "subject": st.subject, "why": st.why})
    return skipped


def main(o: Options) -> int:
    """`memhp bisect`: print the result, write --json; the exit status."""
    try:
        out = bisect(o)
    except EndpointError as e:
        print("memhp bisect: endpoint results:\n" + e.details, file=sys.stderr, flush=True)
        if o.json_path:
            _write_json(o.json_path, {"status": EXIT_USAGE, "message": str(e), "endpoints": e.details})
        raise
    except InfraError as e:
        if o.json_path:
            _write_json(o.json_path, {"status": EXIT_INFRA, "message": str(e)})
        raise
    print(render(out, o.repeat), flush=True)
    if o.json_path:
        _write_json(o.json_path, to_json(out))
    return out.status


def _write_json(path: Path, doc: Dict[str, Any]) -> None:
    try:
        path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    except OSError as e:
        raise BisectInfraError(f"cannot write --json {path}: {e}") from None
