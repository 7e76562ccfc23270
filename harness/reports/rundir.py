"""A finished run's folder (report.json plus per-scenario artifacts) as a frozen data model.

Every renderer in harness.reports works from a RunData, never from a live guest, so a
report can be rendered again, in any format, long after the run. Loading never raises on
odd content: a missing artifact is an empty string, an unparsable message has no checks.

report.json is what harness.reports.report.write_json writes: {"kernel", "results", "summary",
"exit_status"}, plus "shard" ({index, count, selection}) for `run --shard` and "baseline" (the
comparison) for `run --baseline`. A run on several kernels writes {"kernels": [one such document
per kernel, with "dir", its folder], "summary", "exit_status"}: load_runs reads either form (a
RunSet, one RunData per kernel); load_run reads one kernel. Optional keys the renderers use when
present (all may be absent):

    kernel.tree, kernel.commit, kernel.commit_subject, kernel.branch, kernel.patches (names, or
    {file, sha256, subject} as harness.reports.kernelfacts records them), kernel.patchset_hash, kernel.compiler, kernel.base, kernel.fragments,
    kernel.build_seconds, kernel.build_status ("PASS"/"FAIL"), kernel.config_symbols {SYM: val}
    bisect: {first_bad: {sha, subject}, parent: {sha, subject}, counts: [{label, good, bad}],
             to: [addr], cc: [addr], log: "git bisect log"}
    results[].measurements.failed_checks: [{name, expected, observed, rule}]
    results[].measurements.memory_map: [{step, block_size, blocks: [...], dimms: [...]}]

A kernel .config is read from RUN_DIR/kernel.config, else from beside the -kernel image
named in argv.txt (config or config-<release>, as Debian and kbuild leave it).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from harness.memory.parsers import find_splats
from harness.reports.kernelfacts import PATCH_DIR, PatchFile, patchset_hash_of_digests

OUTCOMES = ("pass", "fail", "crash", "hang", "infra", "skip")


class RunDirError(Exception):
    """The folder is not a finished memhp run (no readable report.json)."""


@dataclass(frozen=True)
class Check:
    """One failed check: what was expected, what was observed, and the rule linking them."""
    name: str
    expected: str
    observed: str
    rule: str


@dataclass(frozen=True)
class Splat:
    kind: str
    text: str
    line: int = -1      # 0-based index of its first line in the scenario's console.log; -1: not there


@dataclass(frozen=True)
class Scenario:
    name: str                       # "hot_add::hot_add[on-1GiB]"
    module: str                     # "hot_add"
    case: str                       # "hot_add[on-1GiB]"
    outcome: str                    # one of OUTCOMES
    message: str
    duration: float
    measurements: Mapping[str, Any]
    checks: Tuple[Check, ...]       # failed checks (FAIL), parsed or recorded
    splat: Optional[Splat]          # the first splat on the console (CRASH, or found anyway)
    artifacts: Optional[Path]
    console: str = field(default="", repr=False)
    dmesg: str = field(default="", repr=False)
    argv: str = ""
    decoded: str = field(default="", repr=False)    # the splat excerpt through decode_stacktrace.sh (reports.decode)

    @property
    def failed(self) -> bool:
        return self.outcome in ("fail", "crash", "hang")

    def splat_excerpt(self, before: int, after: int) -> List[str]:
        """The console lines around the splat: `before` lines before it, it and `after` after it."""
        if not self.splat or self.splat.line < 0:
            return []
        lines = self.console.splitlines()
        return lines[max(0, self.splat.line - before):self.splat.line + 1 + after]

    @property
    def memory_map(self) -> List[Mapping[str, Any]]:
        steps = self.measurements.get("memory_map")
        return [s for s in steps if isinstance(s, dict)] if isinstance(steps, list) else []


@dataclass(frozen=True)
class Machine:
    """What QEMU was asked for (argv.txt) and which QEMU answered (the QMP greeting)."""
    qemu_version: str = ""          # "7.2.22"
    qemu_package: str = ""          # "Debian 1:7.2+dfsg-7+deb12u18+b3"
    binary: str = ""
    machine: str = ""               # -M
    accel: str = ""
    cpu: str = ""
    smp: str = ""
    memory: str = ""                # -m as given: "1024M,slots=4,maxmem=8192M"
    cmdline: str = ""               # -append
    argv: str = ""                  # the whole command line, paths scrubbed


@dataclass(frozen=True)
class Kernel:
    release: str = ""
    spec: str = ""
    tree: str = ""
    commit: str = ""
    commit_subject: str = ""
    branch: str = ""
    patches: Tuple[str, ...] = ()                   # file names, in the order applied
    patchset_hash: str = ""
    compiler: str = ""
    base: str = ""
    fragments: Tuple[str, ...] = ()
    build_seconds: Optional[float] = None
    build_status: str = ""
    config: Optional[Mapping[str, str]] = field(default=None, repr=False)  # {"CONFIG_MEMCG": "y"}; None: unknown
    config_source: str = ""
    patch_files: Tuple[PatchFile, ...] = ()         # name, sha256, subject, when recorded (kernelfacts)
    patch_dir: Optional[Path] = None                # RUN_DIR/patches: the copies, when there

    def patch_lines(self) -> List[str]:
        """Each applied patch, in order: its file name, then its subject and the start of its sha256."""
        recorded = {f.file: f for f in self.patch_files}
        out = []
        for name in (p.rsplit("/", 1)[-1] for p in self.patches):
            f = recorded.get(name)
            extra = ([f'"{f.subject}"'] if f and f.subject else []) + ([f"sha256 {f.sha256[:12]}"] if f and f.sha256 else [])
            out.append(name + (f" ({', '.join(extra)})" if extra else ""))
        return out

    def symbol(self, name: str) -> Optional[str]:
        """A config symbol's value ("y", "m", a string; "n" when the config says "is not set"); None if unknown."""
        if self.config is None:
            return None
        key = name if name.startswith("CONFIG_") else "CONFIG_" + name
        return self.config.get(key, "n")


@dataclass(frozen=True)
class BisectCount:
    label: str
    good: int       # on the parent (last good) commit
    bad: int        # on the first bad commit


@dataclass(frozen=True)
class Bisect:
    first_bad: str
    first_bad_subject: str = ""
    parent: str = ""
    parent_subject: str = ""
    counts: Tuple[BisectCount, ...] = ()
    to: Tuple[str, ...] = ()
    cc: Tuple[str, ...] = ()
    log: str = ""


@dataclass(frozen=True)
class RunData:
    path: Path
    kernel: Kernel
    machine: Machine
    scenarios: Tuple[Scenario, ...]
    exit_status: int
    finished: _dt.datetime                  # report.json's mtime, UTC
    bisect: Optional[Bisect] = None
    facts: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)   # report.json as read
    decode_note: str = ""           # how the splats were decoded, or how to decode them (reports.decode)

    @property
    def failed(self) -> Tuple[Scenario, ...]:
        return tuple(s for s in self.scenarios if s.failed)

    def count(self, outcome: str) -> int:
        return sum(1 for s in self.scenarios if s.outcome == outcome)

    @property
    def modules(self) -> List[Tuple[str, List[Scenario]]]:
        """Scenarios grouped by module, in first-seen order."""
        out: Dict[str, List[Scenario]] = {}
        for s in self.scenarios:
            out.setdefault(s.module, []).append(s)
        return list(out.items())

    @property
    def memmap_cost(self) -> List[Mapping[str, Any]]:
        rows = [row for s in self.scenarios for row in s.measurements.get("memmap_cost", []) or []
                if isinstance(row, dict)]
        return sorted(rows, key=lambda x: (x.get("dimm_mib", 0), str(x.get("param", ""))))


# ---------------------------------------------------------------- pure helpers
_SINGLE = re.compile(r"(?s)^(?:CheckFailed: )?(?P<name>.*?): expected (?P<exp>.*?), observed (?P<obs>.*?) "
                     r"\((?P<rule>.*)\)\s*$")
_VERDICT = re.compile(r"^(?:FAIL )?(?P<name>.*?): expected (?P<exp>.*?), observed (?P<obs>.*?) \u2014 (?P<rule>.*)$")
_MULTI = re.compile(r"^(?:CheckFailed: )?\d+ checks failed \(")


def parse_checks(message: str) -> Tuple[Check, ...]:
    """The failed checks named in a FAIL message (harness.memory.checks / CheckFailed wording); () if none."""
    msg = (message or "").strip()
    if not msg:
        return ()
    if _MULTI.match(msg):
        # CheckFailed for several verdicts: "N checks failed (names): expected [..], observed [..] (v1\nv2\n...vN)",
        # each v "name: expected X, observed Y — rule" (checks.Verdict.__str__).
        lines = msg.splitlines()
        pos = lines[0].find("] (", max(0, lines[0].find(", observed [")))
        lines[0] = lines[0][pos + 3:] if pos >= 0 else ""
        if lines[-1].endswith(")"):
            lines[-1] = lines[-1][:-1]
        out = []
        for line in lines:
            m = _VERDICT.match(line.strip())
            if m:
                out.append(Check(m.group("name"), m.group("exp"), m.group("obs"), m.group("rule")))
        return tuple(out)
    m = _SINGLE.match(msg)
    if m and "\n" not in m.group("name"):
        return (Check(m.group("name"), m.group("exp"), m.group("obs"), m.group("rule")),)
    return ()


def recorded_checks(measurements: Mapping[str, Any]) -> Tuple[Check, ...]:
    rows = measurements.get("failed_checks")
    if not isinstance(rows, list):
        return ()
    return tuple(Check(str(r.get("name", "")), _s(r.get("expected")), _s(r.get("observed")), str(r.get("rule", "")))
                 for r in rows if isinstance(r, dict))


def _s(v: Any) -> str:
    return v if isinstance(v, str) else repr(v)


def patchset_hash(patches: Sequence[bytes]) -> str:
    """KCIDB's patchset hash: sha256 over the newline-terminated sha256 of each patch, in order
    (`sha256sum *.patch | cut -c-64 | sha256sum`); "" for no patches."""
    if not patches:
        return ""
    import hashlib
    return hashlib.sha256("".join(hashlib.sha256(p).hexdigest() + "\n" for p in patches).encode()).hexdigest()


def _patchset_hash_of(paths: Sequence[str], run: Path) -> str:
    """The hash of the recorded patch files when every one is still readable, else ""."""
    data = []
    for p in paths:
        for cand in (Path(p), run / PATCH_DIR / Path(p).name, run / Path(p).name):
            if cand.is_file():
                try:
                    data.append(cand.read_bytes())
                    break
                except OSError:
                    pass
        else:
            return ""
    return patchset_hash(data)


def parse_config(text: str) -> Dict[str, str]:
    """A .config's symbols: {"CONFIG_X": "y"}; "# CONFIG_X is not set" gives "n"."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip('"')
            continue
        m = re.match(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$", line)
        if m:
            out[m.group(1)] = "n"
    return out


def parse_argv(argv: str) -> Dict[str, str]:
    """The QEMU options memhp reports: -M, -accel, -cpu, -smp, -m, -append (first of each), and the binary."""
    try:
        words = shlex.split(argv)
    except ValueError:
        words = argv.split()
    out: Dict[str, str] = {"binary": words[0] if words else ""}
    keys = {"-M": "machine", "-machine": "machine", "-accel": "accel", "-cpu": "cpu", "-smp": "smp",
            "-m": "memory", "-append": "cmdline", "-kernel": "kernel", "-initrd": "initrd"}
    for a, b in zip(words, words[1:]):
        if a in keys and keys[a] not in out:
            out[keys[a]] = b
    if "accel" not in out and "-enable-kvm" in words:
        out["accel"] = "kvm"
    return out


def qemu_greeting(qmp_jsonl: str) -> Tuple[str, str]:
    """(version, package) from the QMP greeting in a qmp.jsonl transcript; ("", "") if absent."""
    for line in qmp_jsonl.splitlines():
        try:
            msg = json.loads(line).get("msg", {})
        except (ValueError, AttributeError):
            continue
        q = msg.get("QMP") if isinstance(msg, dict) else None
        if isinstance(q, dict):
            v = q.get("version", {}).get("qemu", {})
            ver = f"{v.get('major', '?')}.{v.get('minor', '?')}.{v.get('micro', '?')}"
            return ver, str(q.get("version", {}).get("package", "")).strip()
    return "", ""


_LINUX_VERSION = re.compile(r"Linux version (\S+) \([^)]*\) \((?P<cc>.+?)(?:, GNU ld|, LLD| ld )")


def compiler_of(console: str) -> str:
    """The compiler from the kernel's "Linux version" banner, e.g. "x86_64-linux-gnu-gcc-12 (Debian ...) 12.2.0"."""
    m = _LINUX_VERSION.search(console)
    return m.group("cc").strip() if m else ""


def _home_paths() -> List[str]:
    roots = [os.path.expanduser("~")]
    for env in ("MEMHP_CACHE", "XDG_CACHE_HOME"):
        if os.environ.get(env):
            roots.append(os.environ[env])
    return [r.rstrip("/") for r in roots if r and r != "/"]


_PATH = re.compile(r"(?<![\w.:/-])(/[\w.+~@%=-]+(?:/[\w.+~@%=,-]*)*)")


def scrub_paths(text: str, extra_roots: Sequence[Union[str, Path]] = ()) -> str:
    """Replace host paths (home, cache, /tmp, the run folder) with their last component.

    Reports leave the machine; the reader needs "vmlinuz-6.12...", not where memhp cached it."""
    roots = _home_paths() + ["/tmp", "/var/tmp", "/root", "/home"] + [str(r).rstrip("/") for r in extra_roots]
    roots = [r for r in roots if r]

    def sub(m: re.Match) -> str:
        p = m.group(1)
        if any(p == r or p.startswith(r + "/") for r in roots) or "/.cache/" in p:
            base = p.rstrip("/").rsplit("/", 1)[-1]
            return base or p
        return p
    return _PATH.sub(sub, text)


def _read(p: Optional[Path], limit: int = 4 << 20) -> str:
    if p is None:
        return ""
    try:
        with open(p, "rb") as f:
            data = f.read(limit)
        return data.decode("utf-8", errors="replace")
    except OSError:
        return ""


def _split_name(name: str) -> Tuple[str, str]:
    if "::" in name:
        mod, case = name.split("::", 1)
        return mod, case
    return "memhp", name


def _artifact_dir(run: Path, value: Any) -> Optional[Path]:
    """The scenario's folder: as recorded, else the same last component inside this run folder
    (a run folder that was copied or moved keeps working)."""
    if not value:
        return None
    p = Path(str(value))
    cands = [p if p.is_absolute() else run / p, run / p.name]
    for c in cands:
        if c.is_dir():
            return c
    return None


def _find_kernel_config(run: Path, argv: Mapping[str, str], release: str) -> Tuple[Optional[Dict[str, str]], str]:
    local = run / "kernel.config"
    if local.is_file():
        return parse_config(_read(local)), "kernel.config"
    kpath = argv.get("kernel")
    if kpath:
        d = Path(kpath).parent
        for c in ([d / f"config-{release}"] if release else []) + [d / "config", d / ".config"]:
            if c.is_file():
                return parse_config(_read(c)), c.name
    return None, ""


# ---------------------------------------------------------------- loading
def read_report(path: Union[str, Path]) -> Tuple[Path, Dict[str, Any]]:
    """(the report.json path, its document) for RUN_DIR or a report.json path; RunDirError if it is
    not a memhp report (one kernel: a "results" list; several: a "kernels" list of such documents)."""
    p = Path(path)
    rj = p / "report.json" if p.is_dir() else p
    try:
        doc = json.loads(rj.read_text())
    except OSError as e:
        raise RunDirError(f"{rj}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise RunDirError(f"{rj}: not JSON: {e}") from None
    if not isinstance(doc, dict) or not (isinstance(doc.get("results"), list) or _is_multi(doc)):
        raise RunDirError(f"{rj}: not a memhp report (no results list)")
    return rj, doc


def _is_multi(doc: Mapping[str, Any]) -> bool:
    ks = doc.get("kernels")
    return isinstance(ks, list) and bool(ks) and all(isinstance(k, dict) and isinstance(k.get("results"), list)
                                                    for k in ks)


def kernel_docs(doc: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """The single-kernel documents a report holds: itself, or each entry of its "kernels" list."""
    return list(doc["kernels"]) if _is_multi(doc) else [doc]


@dataclass(frozen=True)
class RunSet:
    """A run on one or several kernels (`memhp run --kernel A --kernel B`): one RunData per kernel."""
    path: Path
    runs: Tuple[RunData, ...]
    exit_status: int
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def multi(self) -> bool:
        return _is_multi(self.raw)


def _finished(rj: Path) -> _dt.datetime:
    try:
        return _dt.datetime.fromtimestamp(rj.stat().st_mtime, _dt.timezone.utc).replace(microsecond=0)
    except OSError:
        return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def load_runs(path: Union[str, Path]) -> RunSet:
    """Every kernel of RUN_DIR/report.json (or a report.json path): a single-kernel run gives one RunData.
    A kernel's artifacts are in RUN_DIR/<its "dir"> when the run recorded one."""
    rj, doc = read_report(path)
    run, finished = rj.parent, _finished(rj)
    runs = []
    for k in kernel_docs(doc):
        sub = run / str(k.get("dir")) if k.get("dir") and (run / str(k.get("dir"))).is_dir() else run
        runs.append(_from_doc(k, sub, finished))
    status = doc.get("exit_status")
    return RunSet(path=run, runs=tuple(runs), exit_status=int(status) if isinstance(status, int) else -1, raw=doc)


def load_run(path: Union[str, Path]) -> RunData:
    """Read RUN_DIR/report.json (or a report.json path) and the artifacts it names (one kernel)."""
    rj, doc = read_report(path)
    if _is_multi(doc):
        dirs = ", ".join(str(k.get("dir") or k.get("kernel", {}).get("spec", "?")) for k in doc["kernels"])
        raise RunDirError(f"{rj}: holds {len(doc['kernels'])} kernels ({dirs}); load_runs reads them all, "
                          f"or give one kernel's folder")
    return _from_doc(doc, rj.parent, _finished(rj))


def _from_doc(doc: Mapping[str, Any], run: Path, finished: _dt.datetime) -> RunData:
    scenarios = []
    for r in doc["results"]:
        if not isinstance(r, dict):
            continue
        name = str(r.get("name", ""))
        mod, case = _split_name(name)
        meas = r.get("measurements") if isinstance(r.get("measurements"), dict) else {}
        outcome = str(r.get("outcome", "")).lower()
        msg = str(r.get("message") or "")
        art = _artifact_dir(run, r.get("artifacts"))
        console = _read(art / "console.log") if art else ""
        checks = recorded_checks(meas) or (parse_checks(msg) if outcome == "fail" else ())
        splats = find_splats(console)
        splat = Splat(splats[0].kind, splats[0].text, splats[0].line) if splats else None
        if splat is None and outcome == "crash":
            kind, _, text = msg.partition(": ")
            splat = Splat(kind or "crash", text.split("\n--- console before it ---")[0])
        scenarios.append(Scenario(
            name=name, module=mod, case=case, outcome=outcome if outcome in OUTCOMES else "infra",
            message=msg, duration=float(r.get("duration") or 0.0), measurements=meas, checks=checks,
            splat=splat, artifacts=art, console=console,
            dmesg=_read(art / "dmesg.txt") if art else "", argv=_read(art / "argv.txt").strip() if art else ""))

    # The machine: the first argv.txt; the QEMU version from any QMP greeting in the run folder
    # (a shared guest's greeting is in its own folder, not in each scenario's slice).
    argv_text = next((s.argv for s in scenarios if s.argv), "") or \
        next((_read(f).strip() for f in sorted(run.rglob("argv.txt"))), "")
    av = parse_argv(argv_text)
    ver = pkg = ""
    for f in sorted(run.rglob("qmp.jsonl")):
        ver, pkg = qemu_greeting(_read(f, 1 << 16))
        if ver:
            break
    machine = Machine(qemu_version=ver, qemu_package=pkg, binary=av.get("binary", ""),
                      machine=av.get("machine", ""), accel=av.get("accel", ""), cpu=av.get("cpu", ""),
                      smp=av.get("smp", ""), memory=av.get("memory", ""), cmdline=av.get("cmdline", ""),
                      argv=scrub_paths(argv_text, [run]))

    k = doc.get("kernel") if isinstance(doc.get("kernel"), dict) else {}
    release = str(k.get("release") or "")
    config, csrc = _find_kernel_config(run, av, release)
    if isinstance(k.get("config_symbols"), dict):
        config = dict(config or {}, **{(s if s.startswith("CONFIG_") else "CONFIG_" + s): str(v)
                                       for s, v in k["config_symbols"].items()})
        csrc = csrc or "report.json"
    compiler = str(k.get("compiler") or "")
    if not compiler:
        for s in scenarios:
            compiler = compiler_of(s.console)
            if compiler:
                break
    if not compiler:
        for f in sorted(run.rglob("console.log")):
            compiler = compiler_of(_read(f, 1 << 16))
            if compiler:
                break
    if not compiler and config:
        compiler = config.get("CONFIG_CC_VERSION_TEXT", "")
    bs = k.get("build_seconds")
    names, pfiles = _patches(k.get("patches"))
    phash = str(k.get("patchset_hash") or "")
    if not phash and pfiles and len(pfiles) == len(names) and all(f.sha256 for f in pfiles):
        phash = patchset_hash_of_digests([f.sha256 for f in pfiles])
    kernel = Kernel(release=release, spec=str(k.get("spec") or ""), tree=str(k.get("tree") or ""),
                    commit=str(k.get("commit") or ""), commit_subject=str(k.get("commit_subject") or ""),
                    branch=str(k.get("branch") or ""),
                    patches=names, patchset_hash=phash or _patchset_hash_of(list(names), run),
                    patch_files=pfiles, patch_dir=run / PATCH_DIR if (run / PATCH_DIR).is_dir() else None,
                    compiler=compiler,
                    base=str(k.get("base") or ""), fragments=tuple(str(x) for x in k.get("fragments") or ()),
                    build_seconds=float(bs) if isinstance(bs, (int, float)) else None,
                    build_status=str(k.get("build_status") or ""), config=config, config_source=csrc)

    facts = next((s.measurements["facts"] for s in scenarios if isinstance(s.measurements.get("facts"), dict)), {})
    exit_status = doc.get("exit_status")
    return RunData(path=run, kernel=kernel, machine=machine, scenarios=tuple(scenarios),
                   exit_status=int(exit_status) if isinstance(exit_status, int) else -1,
                   finished=finished, bisect=_bisect(doc.get("bisect")), facts=facts, raw=doc)


def _patches(value: Any) -> Tuple[Tuple[str, ...], Tuple[PatchFile, ...]]:
    """report.json's kernel.patches: names (older runs, bisect) or {file, sha256, subject} records."""
    names: List[str] = []
    files: List[PatchFile] = []
    for x in value if isinstance(value, list) else ():
        if isinstance(x, dict) and x.get("file"):
            f = PatchFile(Path(str(x["file"])).name, str(x.get("sha256") or ""), str(x.get("subject") or ""))
            files.append(f)
            names.append(f.file)
        elif isinstance(x, str) and x:
            names.append(x)
    return tuple(names), tuple(files)


def _bisect(b: Any) -> Optional[Bisect]:
    if not isinstance(b, dict):
        return None
    fb = b.get("first_bad") if isinstance(b.get("first_bad"), dict) else {}
    if not fb.get("sha"):
        return None
    par = b.get("parent") if isinstance(b.get("parent"), dict) else {}
    counts = tuple(BisectCount(str(c.get("label", "")), int(c.get("good", 0)), int(c.get("bad", 0)))
                   for c in b.get("counts") or () if isinstance(c, dict))
    return Bisect(first_bad=str(fb["sha"]), first_bad_subject=str(fb.get("subject") or ""),
                  parent=str(par.get("sha") or ""), parent_subject=str(par.get("subject") or ""),
                  counts=counts, to=tuple(str(x) for x in b.get("to") or ()),
                  cc=tuple(str(x) for x in b.get("cc") or ()), log=str(b.get("log") or ""))
