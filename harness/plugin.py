"""pytest plugin: options, fixtures (kernel -> image -> vm -> qmp/guest), outcome classes.

Every booted guest writes console.log, qmp.jsonl, commands.jsonl (guest commands), dmesg.txt,
qemu.log and argv.txt into the test's artifacts folder (a shared guest's slices, per test).
After each test the console is scanned for splats (WARNING, BUG, Oops, panic, Bad page
state, Altmap not fully unmapped); one turns the test into a CRASH. A CheckFailed is also
recorded as measurements["failed_checks"] ({name, expected, observed, rule} per verdict).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import pytest

from harness.cache import cache_root, ensure_dir
from harness.reports import report
from harness.errors import CheckFailed, GuestCrash, HarnessError, InfraError
from harness.reports.report import Result

WORKER_OPTIONS = "memhp_run_options"


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
        self.apply(config)

    def apply(self, config) -> None:
        o = config.option
        o.kernel, o.accel = self.kernel, self.accel
        o.fragment, o.patch = list(self.fragments), list(self.patches)
        # pytest's own -k machinery (deselect_by_keyword) reads this at collection.
        o.keyword = self.keyword or ""
        o.memhp_artifacts, o.memhp_results, o.memhp_live = self.artifacts, self.results, self.live

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node):
        # `memhp run --jobs N`: xdist workers get only the argv words, so the options travel in
        # workerinput, and the worker's harness.plugin applies them (_apply_worker_options).
        node.workerinput[WORKER_OPTIONS] = asdict(self)


def _apply_worker_options(config) -> None:
    """In an xdist worker of `memhp run --jobs N`: the controller's RunOptions, from workerinput.
    The worker also dies with memhp (parent-death signal), so a SIGKILLed memhp takes the
    worker's QEMUs down at once through their own parent-death signal."""
    values = getattr(config, "workerinput", {}).get(WORKER_OPTIONS)
    if values:
        RunOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}).apply(config)
        _die_with_parent()


def _die_with_parent() -> None:
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:   # memhp died before the prctl: the signal will never come
        os._exit(1)


def pytest_configure(config):
    from harness.kernels.preflight import check_kernel_options
    _apply_worker_options(config)
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
    from harness.kernels.kernel import DEFAULT_SPEC
    return pytestconfig.getoption("kernel") or DEFAULT_SPEC


@pytest.fixture(scope="session")
def memhp_kernel(pytestconfig, memhp_spec):
    from harness.kernels.kernel import resolve
    return resolve(memhp_spec, fragments=tuple(pytestconfig.getoption("fragment")),
                   patches=tuple(pytestconfig.getoption("patch")))


@pytest.fixture(scope="session")
def memhp_image(memhp_kernel):
    from harness.vm.image import build
    return build(memhp_kernel)


@pytest.fixture(scope="session")
def artifacts_root(pytestconfig) -> Path:
    opt = pytestconfig.getoption("memhp_artifacts")
    if opt:
        root = Path(opt)
    else:
        root = cache_root() / "artifacts" / time.strftime("%Y%m%d-%H%M%S") / str(os.getpid())
    ensure_dir(root)    # every folder it creates 0700 (artifacts hold console logs and keys' paths)
    return root


def _safe(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[-150:]


@pytest.fixture
def artifacts(request, artifacts_root) -> Path:
    d = ensure_dir(artifacts_root / _safe(request.node.nodeid))
    request.node._memhp_artifacts = str(d)
    return d


# ---------------------------------------------------------------- booting
class BootFactory:
    """boot(**spec) -> a started harness.vm.guest.VM; every VM is closed when the test ends."""

    def __init__(self, kernel, image, accel: str, artifacts: Path):
        self.kernel, self.image, self.accel, self.artifacts = kernel, image, accel, artifacts
        self.vms: List = []

    def __call__(self, **kw):
        from harness.vm.guest import VM
        n = len(self.vms)
        log_dir = self.artifacts if n == 0 else self.artifacts / f"vm{n}"
        ensure_dir(log_dir)
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
    retries = [r for vm in f.vms for r in getattr(vm, "boot_retries", [])]
    if retries:   # a boot thrown away for a stalled network is part of the record, not hidden
        request.node.user_properties.append(("boot_retries", retries))
    if not request.node.get_closest_marker("allow_splats"):
        for vm in f.vms:
            _raise_on_splats(_read(vm.log_dir / "console.log"))


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""


def _raise_on_splats(text: str) -> None:
    from harness.memory.parsers import find_splats
    splats = find_splats(text)
    if splats:
        s = splats[0]
        raise GuestCrash(s.kind, s.text)


@pytest.fixture
def vm(boot):
    """A fresh guest: memmap_on_memory=1, memhp_default_state=offline."""
    return boot()


class LeftoverState(InfraError):
    """A test left DIMMs or memory blocks on a shared guest; the guest is retired."""


class SharedGuests:
    """The guests one scenario module shares, one per GuestConfig (hashable), one running at a
    time (the machine is shared: asking for another config shuts the previous one down, so
    order tests by config). A guest is handed out again only if QEMU runs, it answers, it is
    not vm.dirty, and (checked when each test ends) QEMU lists no memory device and its
    memory blocks are the ones it booted with; otherwise it is retired and the next test
    boots a fresh one."""

    def __init__(self, kernel, image, accel: str, root: Path, name: str):
        self.kernel, self.image, self.accel, self.root, self.name = kernel, image, accel, root, name
        self.vms: Dict = {}
        self.baseline: Dict = {}
        self.boots = 0

    def get(self, config):
        from harness.vm.guest import VM
        for other in [c for c in self.vms if c != config]:
            self.retire(other)     # one shared guest per module at a time
        vm = self.vms.get(config)
        if vm is not None and not self._reusable(vm):
            self.retire(config)
            vm = None
        if vm is None:
            self.boots += 1
            d = self.root / f"shared-{self.name}-{self.boots}"
            ensure_dir(d)
            vm = VM(self.kernel, self.image, d, accel=self.accel, config=config)
            try:
                vm.start()
                self.baseline[config] = self._blocks(vm)
            except BaseException:
                vm.close()
                raise
            self.vms[config] = vm
        return vm

    @staticmethod
    def _reusable(vm) -> bool:
        if not vm.machine.alive or vm.dirty:
            return False
        try:
            return vm.run("true", timeout=10).ok
        except HarnessError:
            return False

    @staticmethod
    def _blocks(vm) -> tuple:
        from harness.memory.blocks import present_blocks
        return present_blocks(vm.guest)

    def leftovers(self, vm) -> str:
        """What a test left behind on vm: QEMU's memory devices and blocks not there at boot; "" if none."""
        from harness.memory.dimm import memory_devices
        config = vm.config
        # A boot-time virtio-mem device is part of the machine: a trace only while it has memory plugged.
        devs = [d.get("id") for d in memory_devices(vm.qmp)
                if not (d.get("type") == "virtio-mem" and d.get("size") == 0)]
        now = self._blocks(vm)
        base = self.baseline.get(config, now)
        extra = sorted(set(now) - set(base))
        gone = sorted(set(base) - set(now))
        parts = ([f"memory devices {devs}"] if devs else []) + \
            ([f"memory blocks {extra} not there at boot"] if extra else []) + \
            ([f"boot memory blocks {gone} missing"] if gone else [])
        return "; ".join(parts)

    def retire(self, config) -> None:
        vm = self.vms.pop(config, None)
        if vm is not None:
            vm.close()

    def close(self) -> None:
        for config in list(self.vms):
            self.retire(config)


@pytest.fixture(scope="module")
def _shared_guests(request, pytestconfig, memhp_kernel, memhp_image, artifacts_root):
    pool = SharedGuests(memhp_kernel, memhp_image, pytestconfig.getoption("accel"), artifacts_root,
                        _safe(request.module.__name__))
    yield pool
    pool.close()


@pytest.fixture
def shared_guest(request, _shared_guests, artifacts):
    """shared_guest(**config) -> the module's shared VM for GuestConfig(**config). The test must
    leave no trace (harness.scenarios._common.hot_added) or set vm.dirty.

    The test's artifacts folder gets the console and QMP slices of its own time span (a
    second config's in a subfolder). A splat makes the test a CRASH and retires the guest;
    a guest left with DIMMs or extra blocks is retired and the test reports what it left."""
    from harness.vm.qemu_argv import GuestConfig
    used = []

    def get(**config):
        cfg = GuestConfig(**config)
        vm = _shared_guests.get(cfg)
        d = artifacts if not used else artifacts / _safe(repr(sorted(config.items())))
        ensure_dir(d)
        (d / "argv.txt").write_text((vm.log_dir / "argv.txt").read_text())
        used.append((vm, vm.console.offset(), time.time(), d))
        return vm

    yield get
    splat_text, left = "", []
    for vm, con0, t0, d in used:
        text = vm.console.text[con0:] if vm.console is not None else ""
        from harness.memory.parsers import find_splats
        if find_splats(text):
            vm.dirty = True     # a tainted kernel judges no further test
        (d / "console.log").write_text(text)
        _slice_qmp(vm.log_dir / "qmp.jsonl", d / "qmp.jsonl", t0)
        _slice_qmp(vm.log_dir / "commands.jsonl", d / "commands.jsonl", t0)
        if vm.machine.alive:
            try:
                (d / "dmesg.txt").write_text(vm.run("dmesg", timeout=15).stdout)
            except HarnessError as e:
                (d / "dmesg.txt").write_text(f"(dmesg unavailable: {e})\n")
            if not vm.dirty:
                what = _shared_guests.leftovers(vm)
                if what:
                    vm.dirty = True
                    left.append(what)
        splat_text += text
    if not request.node.get_closest_marker("allow_splats"):
        _raise_on_splats(splat_text)
    if left:
        raise LeftoverState(f"this test left {'; '.join(left)} on the shared guest (retired, not reused)")


@pytest.fixture
def shared_vm(shared_guest):
    """The module's shared guest with the default GuestConfig (memmap_on_memory=1, offline)."""
    return shared_guest()


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
        # A failure without an exception (e.g. a strict XPASS) is still a failure, never a PASS.
        new = report.classify(exc) if exc is not None else report.FAIL
        msg = _message(exc, call) if exc is not None else str(rep.longrepr)
    else:
        new, msg = report.PASS, ""
    if rep.failed and call.excinfo is not None and isinstance(call.excinfo.value, CheckFailed):
        _record_failed_checks(item, call.excinfo.value)
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


def _record_failed_checks(item, exc: CheckFailed) -> None:
    """measurements["failed_checks"]: [{name, expected, observed, rule}] per failed verdict (values as
    their repr, as the message prints them), so reports need not parse the message back."""
    verdicts = getattr(exc, "verdicts", None) or [exc]
    at = getattr(exc, "memhp_failed_at", None)   # set by _common.hot_added before its cleanup
    rows = [{"name": v.name, "expected": repr(v.expected), "observed": repr(v.observed), "rule": v.rule,
             **({"t": at} if at else {})} for v in verdicts]
    props = dict(item.user_properties)
    props["failed_checks"] = props.get("failed_checks", []) + rows
    item.user_properties[:] = list(props.items())


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


def show_outcomes(config) -> bool:
    """The "memhp outcomes" table belongs to sessions that ran memhp scenarios: `memhp run` (its
    RunOptions set live), or pytest given --kernel on its command line. memhp's own test sessions
    (make test, make unit) end with pytest's summary."""
    if getattr(config.option, "memhp_live", False):
        return True
    args = [str(a) for a in getattr(getattr(config, "invocation_params", None), "args", ()) or ()]
    return any(a == "--kernel" or a.startswith("--kernel=") for a in args)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = list(config._memhp_results.values())
    if not results or not show_outcomes(config):
        return
    terminalreporter.section("memhp outcomes")
    terminalreporter.write_line(report.table(results))
    terminalreporter.write_line(report.summary_line(results))


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("memhp_results")
    if not path:
        return
    results = session.config._memhp_results
    worker = getattr(session.config, "workerinput", {}).get("workerid")
    if worker is not None:
        # An xdist worker: its share, with the collection order, for the controller to merge.
        Path(f"{path}.{worker}").write_text(json.dumps(
            {"order": [i.nodeid for i in session.items],
             "results": {k: r.__dict__ for k, r in results.items()}}, default=str, indent=1))
        return
    rows = merge_worker_results(Path(path), {k: r.__dict__ for k, r in results.items()})
    Path(path).write_text(json.dumps(rows, default=str, indent=1))


def merge_worker_results(path: Path, own: Dict[str, dict]) -> List[dict]:
    """This session's results plus every xdist worker's (<path>.gw*), in collection order, so a
    parallel run's results file reads exactly like a serial run's. Worker files are removed."""
    order: List[str] = []
    merged = dict(own)
    for f in sorted(path.parent.glob(path.name + ".gw*")):
        part = json.loads(f.read_text())
        order = order or part["order"]
        merged.update(part["results"])
        f.unlink()
    rank = {nodeid: i for i, nodeid in enumerate(order)}
    return [merged[k] for k in sorted(merged, key=lambda k: rank.get(k, len(rank)))]
