"""pytest plugin: options, fixtures (kernel -> image -> vm -> qmp/guest), outcome classes.

Every booted guest writes console.log, qmp.jsonl, dmesg.txt, qemu.log and argv.txt into the
test's artifacts folder. After each test the console is scanned for splats (WARNING, BUG,
Oops, panic, Bad page state, Altmap not fully unmapped); one turns the test into a CRASH.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pytest

from harness import report
from harness.errors import GuestCrash, HarnessError
from harness.report import Result

def pytest_addoption(parser):
    g = parser.getgroup("memhp", "memhp: real-kernel memory hotplug tests")
    g.addoption("--kernel", default=os.environ.get("MEMHP_KERNEL"),
                help="kernel spec: debian:6.1, debian:6.12, debian-src:6.1, a bzImage or a build folder")
    g.addoption("--accel", default=os.environ.get("MEMHP_ACCEL", "auto"), choices=("auto", "tcg", "kvm"))
    g.addoption("--memhp-artifacts", default=os.environ.get("MEMHP_ARTIFACTS"),
                help="folder for per-test artifacts (default: <cache>/artifacts/<timestamp>)")
    g.addoption("--memhp-results", default=None, help="write the classified results as JSON here")
    g.addoption("--memhp-live", action="store_true", help="print one line per finished scenario on stderr")
    g.addoption("--fragment", action="append", default=[], help="extra kconfig fragment (debian-src: specs)")
    g.addoption("--patch", action="append", default=[], help="patch to apply (debian-src: specs)")


@dataclass(frozen=True)
class RunOptions:
    """Every value `memhp run` hands its inner pytest, as a plugin object: pytest.main(argv,
    plugins=[RunOptions(...)]). The values land on config.option here, never as argv words, so
    no user string (a patch named -pNAME, a -k expression) can be read as a pytest option."""

    kernel: str
    accel: str = "auto"
    fragments: Tuple[str, ...] = ()
    patches: Tuple[str, ...] = ()
    keyword: Optional[str] = None       # checked by the CLI with pytest's own Expression.compile
    artifacts: Optional[str] = None
    results: Optional[str] = None
    live: bool = False

    @pytest.hookimpl(tryfirst=True)
    def pytest_configure(self, config):
        o = config.option
        o.kernel, o.accel = self.kernel, self.accel
        o.fragment, o.patch = list(self.fragments), list(self.patches)
        # pytest's own -k machinery (deselect_by_keyword) reads this at collection.
        o.keyword = self.keyword or ""
        o.memhp_artifacts, o.memhp_results, o.memhp_live = self.artifacts, self.results, self.live


def pytest_configure(config):
    from harness.preflight import check_kernel_options
    spec = config.getoption("kernel", None)
    if spec:
        try:
            check_kernel_options(spec, config.getoption("fragment") or (), config.getoption("patch") or ())
        except HarnessError as e:
            raise pytest.UsageError(str(e)) from None
    config.addinivalue_line("markers", "allow_splats: the test provokes kernel splats on purpose")
    config.addinivalue_line("markers", "fresh_boot: the scenario changes boot-time state and boots its own guest")
    config._memhp_results = {}


# ---------------------------------------------------------------- session fixtures
@pytest.fixture(scope="session")
def memhp_spec(pytestconfig) -> str:
    from harness.kernel import DEFAULT_SPEC
    return pytestconfig.getoption("kernel") or DEFAULT_SPEC


@pytest.fixture(scope="session")
def memhp_kernel(pytestconfig, memhp_spec):
    from harness.kernel import resolve
    return resolve(memhp_spec, fragments=tuple(pytestconfig.getoption("fragment")),
                   patches=tuple(pytestconfig.getoption("patch")))


@pytest.fixture(scope="session")
def memhp_image(memhp_kernel):
    from harness.image import build
    return build(memhp_kernel)


@pytest.fixture(scope="session")
def artifacts_root(pytestconfig) -> Path:
    opt = pytestconfig.getoption("memhp_artifacts")
    if opt:
        root = Path(opt)
    else:
        from harness.cache import cache_root
        root = cache_root() / "artifacts" / time.strftime("%Y%m%d-%H%M%S") / str(os.getpid())
    root.mkdir(parents=True, exist_ok=True)
    return root


def _safe(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[-150:]


@pytest.fixture
def artifacts(request, artifacts_root) -> Path:
    d = artifacts_root / _safe(request.node.nodeid)
    d.mkdir(parents=True, exist_ok=True)
    request.node._memhp_artifacts = str(d)
    return d


# ---------------------------------------------------------------- booting
class BootFactory:
    """boot(**spec) -> a started harness.guest.VM; every VM is closed when the test ends."""

    def __init__(self, kernel, image, accel: str, artifacts: Path):
        self.kernel, self.image, self.accel, self.artifacts = kernel, image, accel, artifacts
        self.vms: List = []

    def __call__(self, **kw):
        from harness.guest import VM
        n = len(self.vms)
        log_dir = self.artifacts if n == 0 else self.artifacts / f"vm{n}"
        log_dir.mkdir(parents=True, exist_ok=True)
        kw.setdefault("accel", self.accel)
        vm = VM(self.kernel, self.image, log_dir, **kw)
        self.vms.append(vm)
        vm.start()
        return vm

    def close(self) -> None:
        for vm in self.vms:
            try:
                vm.close()
            except Exception:
                pass


@pytest.fixture
def boot(request, pytestconfig, memhp_kernel, memhp_image, artifacts):
    f = BootFactory(memhp_kernel, memhp_image, pytestconfig.getoption("accel"), artifacts)
    yield f
    f.close()
    if not request.node.get_closest_marker("allow_splats"):
        for vm in f.vms:
            _raise_on_splats(_read(vm.log_dir / "console.log"))


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""


def _raise_on_splats(text: str) -> None:
    from harness.parsers import find_splats
    splats = find_splats(text)
    if splats:
        s = splats[0]
        raise GuestCrash(s.kind, s.text)


@pytest.fixture
def vm(boot):
    """A fresh guest: memmap_on_memory=1, memhp_default_state=offline."""
    return boot()


class SharedVM:
    """One guest reused across a module's no-trace scenarios; rebooted if a test killed it
    or marked it dirty (vm._memhp_dirty, set by scenarios that keep a DIMM)."""

    def __init__(self, kernel, image, accel, root: Path, name: str, spec: Optional[dict] = None):
        self.kernel, self.image, self.accel = kernel, image, accel
        self.root, self.name = root, name
        self.spec = dict(spec or {})
        self.vm = None
        self.boots = 0

    def healthy(self) -> bool:
        if self.vm is None or not self.vm.machine.alive or getattr(self.vm, "_memhp_dirty", False):
            return False
        try:
            return self.vm.run("true", timeout=10).ok
        except Exception:
            return False

    def get(self):
        from harness.guest import VM
        if not self.healthy():
            if self.vm is not None:
                self.vm.close()
            self.boots += 1
            d = self.root / f"shared-{self.name}-{self.boots}"
            d.mkdir(parents=True, exist_ok=True)
            self.vm = VM(self.kernel, self.image, d, accel=self.accel, **self.spec)
            try:
                self.vm.start()
            except BaseException:
                self.vm.close()
                self.vm = None
                raise
        return self.vm

    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()
            self.vm = None


@pytest.fixture(scope="module")
def _shared_holder(request, pytestconfig, memhp_kernel, memhp_image, artifacts_root):
    h = SharedVM(memhp_kernel, memhp_image, pytestconfig.getoption("accel"), artifacts_root,
                 _safe(request.module.__name__))
    yield h
    h.close()


@pytest.fixture
def shared_vm(request, _shared_holder, artifacts):
    """The module's shared guest (memmap_on_memory=1, offline). The test must leave no trace.

    The test's artifacts folder gets the console and QMP slices of its own time span."""
    vm = _shared_holder.get()
    con0 = vm.console.offset()
    t0 = time.time()
    (artifacts / "argv.txt").write_text((vm.log_dir / "argv.txt").read_text())
    yield vm
    text = vm.console.text[con0:] if vm.console else ""
    (artifacts / "console.log").write_text(text)
    _slice_qmp(vm.log_dir / "qmp.jsonl", artifacts / "qmp.jsonl", t0)
    if vm.machine.alive:
        try:
            (artifacts / "dmesg.txt").write_text(vm.run("dmesg", timeout=15).stdout)
        except Exception as e:
            (artifacts / "dmesg.txt").write_text(f"(dmesg unavailable: {e})\n")
    if not request.node.get_closest_marker("allow_splats"):
        _raise_on_splats(text)


def _slice_qmp(src: Path, dst: Path, t0: float) -> None:
    lines = []
    for line in _read(src).splitlines():
        try:
            if json.loads(line).get("t", 0) >= t0:
                lines.append(line)
        except ValueError:
            continue
    dst.write_text("\n".join(lines) + ("\n" if lines else ""))


# ---------------------------------------------------------------- measurements
@pytest.fixture
def measure(request):
    """measure(key, value): recorded in the JSON/JUnit results; 'memmap_cost' rows are appended."""
    def _m(key, value):
        props = dict(request.node.user_properties)
        if key == "memmap_cost":
            rows = props.get("memmap_cost", [])
            rows.append(value)
            props["memmap_cost"] = rows
        else:
            props[key] = value
        request.node.user_properties[:] = list(props.items())
    return _m


# ---------------------------------------------------------------- outcome classes
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    results: Dict[str, Result] = item.config._memhp_results
    r = results.get(item.nodeid)
    if r is None:
        r = results[item.nodeid] = Result(name=_display_name(item), outcome=report.PASS)
    r.duration += rep.duration
    if rep.skipped:
        new = report.SKIP
        msg = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    elif rep.failed:
        exc = call.excinfo.value if call.excinfo else None
        new = report.classify(exc)
        msg = _message(exc, call)
    else:
        new, msg = report.PASS, ""
    before = r.outcome
    report.merge(r, new, msg, rep.when)
    if r.outcome != before:
        rep.sections.append(("memhp outcome", r.outcome.upper()))
    r.measurements = {k: v for k, v in item.user_properties}
    r.artifacts = getattr(item, "_memhp_artifacts", None)
    if rep.when == "teardown" and item.config.getoption("memhp_live"):
        import sys
        first = " ".join(r.message.split())[:90]
        sys.__stderr__.write(f"  {r.outcome.upper():<6} {r.name} ({r.duration:.1f}s) {first}\n")
        sys.__stderr__.flush()


def _display_name(item) -> str:
    mod = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    mod = mod[5:] if mod.startswith("test_") else mod
    name = item.name[5:] if item.name.startswith("test_") else item.name
    return f"{mod}::{name}"


def _message(exc: Optional[BaseException], call) -> str:
    if exc is None:
        return ""
    if isinstance(exc, AssertionError):
        text = str(exc).split("\nassert ")[0]
        return text.strip() or call.excinfo.exconly()
    text = f"{type(exc).__name__}: {exc}"
    for attr in ("console_tail",):
        tail = getattr(exc, attr, "")
        if tail:
            text += "\n--- console tail ---\n" + tail
    if isinstance(exc, GuestCrash):
        text = f"{exc.kind}: " + exc.splat
    elif not isinstance(exc, (HarnessError, OSError)) and call.excinfo is not None:
        # Not raised on purpose: a bug in memhp (INFRA). Say where, so it can be fixed.
        tb = call.excinfo.traceback
        if len(tb):
            e = tb[-1]
            text = f"memhp bug: {text} (at {e.path}:{e.lineno + 1})"
    return text


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = list(config._memhp_results.values())
    if not results:
        return
    terminalreporter.section("memhp outcomes")
    terminalreporter.write_line(report.table(results))
    terminalreporter.write_line(report.summary_line(results))


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("memhp_results")
    if path:
        results = list(session.config._memhp_results.values())
        Path(path).write_text(json.dumps([r.__dict__ for r in results], default=str, indent=1))
