"""Helpers shared by the scenario modules. Small on purpose; the API below is stable.

Fixtures (import them into a scenario module to use them):

    shared_guest(**spec) -> VM
        A guest reused by the tests of one module, one per distinct VMSpec (mem_mb,
        memmap_on_memory, default_state, numa_nodes, ...; defaults as harness.guest.VM).
        Only one shared guest of a module runs at a time: asking for another spec shuts
        the previous one down, so order tests by spec. The test must leave no trace
        (use hot_added()) or call mark_dirty(vm). A guest that died, was marked dirty,
        whose cleanup failed or that splatted is booted afresh for the next test.
        Console/QMP/dmesg slices go to the test's artifacts folder, and a splat on the
        console makes the test a CRASH (unless marked allow_splats).

Functions:

    facts_of(vm) -> expect.KernelFacts          gather_facts, once per VM
    facts_as_booted(vm, "1") -> KernelFacts     facts_of, after checking the parameter reads back
                                                what booting with memmap_on_memory=... implies
    hot_added(vm, size, node=None, remove=True) context manager -> DimmHandle: add, wait for
                                                the blocks; on exit offline them and remove the
                                                DIMM (shuts the VM down if that fails);
                                                remove=False keeps it and marks the VM dirty
    mark_dirty(vm)                              shared_guest will not hand vm out again
    set_states(guest, ids, state, v=None)       write state to every block; a refusal is a
                                                failed Verdict (raised at once when v is None)
    free_kb(snap) -> int                        MemFree + the per-cpu free lists, in kB
    pcp_pages(zoneinfo_text) -> int             pure: sum of the per-cpu "count:" lines
    block_states(guest, ids) -> {id: state}     the state file of each block (missing ones left out)
    owner_private_pfns(guest, pfns) -> [int]    pfns of `pfns` (a range) with kpageflags bit 37
    pfn_span(pfns) -> str                       pure: pfns rendered for a verdict
    node_list(text) -> set                      pure: "0-1,3" -> {0, 1, 3}
    node_meminfo(guest, node) -> dict           /sys/devices/system/node/nodeN/meminfo, {} if absent
"""
from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import pytest

from harness import expect
from harness.checks import Verdicts
from harness.errors import CheckFailed
from harness.hotplug import DimmHandle, add_dimm, remove_dimm, set_block_state, wait_blocks
from harness.observe import Snapshot, gather_facts
from harness.parsers import find_splats
from harness.plugin import SharedVM, _raise_on_splats, _safe, _slice_qmp

KPF_OWNER_PRIVATE = expect.KPF_OWNER_PRIVATE


# ---------------------------------------------------------------- pure helpers
_PCP_COUNT = re.compile(r"^\s+count:\s+(\d+)\s*$", re.M)


def pcp_pages(zoneinfo_text: str) -> int:
    """Pages on the per-cpu free lists: the sum of every "count:" line of /proc/zoneinfo (pcp->count, in pages)."""
    return sum(int(m) for m in _PCP_COUNT.findall((zoneinfo_text or "").replace("\r", "")))


def free_kb(snap: Snapshot, page_kb: int = 4) -> int:
    """MemFree plus the per-cpu free lists in kB: free memory that does not swing when a
    2 MiB memmap goes to or comes from a per-cpu list (see expect.add_time_free_drop_bounds_kb)."""
    return snap.meminfo.get("MemFree", 0) + page_kb * pcp_pages(snap.raw.get("/proc/zoneinfo", ""))


def pfn_span(pfns) -> str:
    """Render pfns for a verdict: "0x100000..0x1001ff (512 pages)" when contiguous, else count and the first 8."""
    pfns = list(pfns)
    if not pfns:
        return "none"
    if pfns == list(range(pfns[0], pfns[0] + len(pfns))):
        return f"{pfns[0]:#x}..{pfns[-1]:#x} ({len(pfns)} pages)"
    head = ", ".join(f"{p:#x}" for p in pfns[:8])
    return f"{len(pfns)} pages: {head}{', ...' if len(pfns) > 8 else ''}"


def node_list(text: str) -> Set[int]:
    """A sysfs node/cpu list ("0", "0-1,3", "") -> set of ints; junk parts are ignored."""
    out: Set[int] = set()
    for part in (text or "").strip().split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if m:
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) else lo
            out.update(range(lo, hi + 1))
    return out


# ---------------------------------------------------------------- guest helpers
def facts_of(vm) -> expect.KernelFacts:
    """gather_facts(vm.guest, vm.kernel), read once per VM."""
    facts = getattr(vm, "_memhp_facts", None)
    if facts is None:
        facts = vm._memhp_facts = gather_facts(vm.guest, vm.kernel)
    return facts


def facts_as_booted(vm, memmap_on_memory: str) -> expect.KernelFacts:
    """facts_of(vm), after checking the parameter reads back what booting with memmap_on_memory implies.

    A guest booted with a parameter the kernel ignored would silently test the wrong config."""
    facts = facts_of(vm)
    want = expect.expected_param_readback(facts.version, memmap_on_memory)
    if facts.param != want:
        raise CheckFailed(f"memory_hotplug.memmap_on_memory after booting with ={memmap_on_memory}", want,
                          facts.param, expect.expected_param_readback.__doc__.strip().splitlines()[0])
    return facts


def node_meminfo(guest, node: int) -> Dict[str, int]:
    from harness.parsers import parse_meminfo
    res = guest.run(f"cat /sys/devices/system/node/node{node}/meminfo", timeout=30)
    return parse_meminfo(res.stdout) if res.ok else {}


def owner_private_pfns(guest, pfns: range) -> List[int]:
    """The pfns in `pfns` whose /proc/kpageflags word has bit 37 (KPF_OWNER_PRIVATE) set."""
    from harness.parsers import parse_kpageflags
    if len(pfns) == 0:
        return []
    words = parse_kpageflags(guest.read_bytes("/proc/kpageflags", pfns.start * 8, len(pfns) * 8, timeout=120))
    return [pfns.start + i for i, w in enumerate(words) if w >> KPF_OWNER_PRIVATE & 1]


def set_states(guest, ids, state: str, v: Optional[Verdicts] = None) -> bool:
    """echo state > memoryN/state for each id; each refusal becomes a failed Verdict.

    With v=None the verdicts are raised at once. Returns True when every write succeeded."""
    own = v is None
    v = Verdicts() if own else v
    ok = True
    for b in ids:
        res = set_block_state(guest, b, state)
        if not res.ok:
            ok = False
            v.eq(f"echo {state} > memory{b}/state", "accepted",
                 f"status {res.status}: {(res.stderr or res.stdout).strip()}",
                 f"a valid transition to {state} succeeds")
    if own:
        v.raise_if_failed()
    return ok


def mark_dirty(vm) -> None:
    """The test leaves a trace on vm: shared_guest will not hand it out again."""
    vm._memhp_dirty = True


def _kill(vm) -> None:
    try:
        vm.close()
    except Exception:
        pass


@contextlib.contextmanager
def hot_added(vm, size: int, node: Optional[int] = None, remove: bool = True) -> Iterator[DimmHandle]:
    """Hot-add a pc-dimm of `size` bytes and wait for its blocks in sysfs.

    On exit (also after a failure) every online block is offlined and the DIMM removed, so a
    shared guest is left as it was. If that cleanup fails the VM is shut down, so no later
    test runs on a guest with leftovers; the cleanup's error is raised unless the body
    already raised (then it is added to the body's error as a note). remove=False keeps the
    DIMM (blocks online in Normal, which the guest usually cannot offline again) and marks
    the VM dirty: shared_guest boots a fresh one before the next test (plugin's shared_vm
    does not know this mark; use it with shared_guest or boot()).
    """
    dimm = add_dimm(vm.qmp, size, facts_of(vm).block_size, node=node)
    body_exc: Optional[BaseException] = None
    try:
        wait_blocks(vm.guest, dimm.block_ids)
        yield dimm
    except BaseException as e:
        body_exc = e
        raise
    finally:
        if not remove:
            mark_dirty(vm)
        else:
            try:
                _remove(vm, dimm)
            except BaseException as e:
                _kill(vm)
                if body_exc is None:
                    raise
                body_exc.add_note(f"(cleanup of {dimm.id} also failed, guest shut down: {e})")


def block_states(guest, ids) -> Dict[int, str]:
    """{block id: state} for the given blocks; a block missing from sysfs is left out."""
    cmd = ("for b in " + " ".join(str(b) for b in ids) +
           "; do echo $b $(cat /sys/devices/system/memory/memory$b/state 2>/dev/null); done")
    out: Dict[int, str] = {}
    for line in guest.run(cmd, timeout=30, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[int(parts[0])] = parts[1]
    return out


def _remove(vm, dimm: DimmHandle) -> None:
    online = [b for b, st in block_states(vm.guest, dimm.block_ids).items() if st == "online"]
    set_states(vm.guest, online, "offline")
    res = remove_dimm(vm.qmp, dimm)
    if not res.deleted:
        raise CheckFailed(f"cleanup: remove {dimm.id} (blocks {list(dimm.block_ids)}, all offline)",
                          "DEVICE_DELETED", list(res.event_names),
                          "offline blocks are ejected: OST 132, DEVICE_DELETED, OST 0")
    wait_blocks(vm.guest, dimm.block_ids, present=False)


# ---------------------------------------------------------------- shared guests per spec
def _spec_name(spec: dict) -> str:
    return _safe("-".join(f"{k}={v}" for k, v in sorted(spec.items())) or "default")


class _Pool(dict):
    def __init__(self, kernel, image, accel: str, root: Path, module: str):
        super().__init__()
        self.kernel, self.image, self.accel, self.root, self.module = kernel, image, accel, root, module

    def get_vm(self, spec: dict):
        name = _spec_name(spec)
        for other, h in self.items():
            if other != name:
                h.close()      # one shared guest per module at a time: the machine is shared
        h = self.get(name)
        if h is None:
            h = self[name] = SharedVM(self.kernel, self.image, self.accel, self.root,
                                      f"{self.module}-{name}", spec)
        return name, h.get()


@pytest.fixture(scope="module")
def _shared_guests(request, pytestconfig, memhp_kernel, memhp_image, artifacts_root):
    pool = _Pool(memhp_kernel, memhp_image, pytestconfig.getoption("accel"), artifacts_root,
                 _safe(request.module.__name__))
    yield pool
    for h in pool.values():
        h.close()


@pytest.fixture
def shared_guest(request, _shared_guests, artifacts):
    """shared_guest(**spec) -> the module's shared VM for that spec (see the module docstring)."""
    used = []

    def get(**spec):
        name, vm = _shared_guests.get_vm(spec)
        d = artifacts if not used else artifacts / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "argv.txt").write_text((vm.log_dir / "argv.txt").read_text())
        used.append((vm, vm.console, vm.console.offset(), time.time(), d))
        return vm

    yield get
    splat_text = ""
    for vm, console, con0, t0, d in used:
        text = console.text[con0:] if console is not None else ""
        if find_splats(text):
            mark_dirty(vm)     # a tainted kernel judges no further test
        (d / "console.log").write_text(text)
        _slice_qmp(vm.log_dir / "qmp.jsonl", d / "qmp.jsonl", t0)
        if vm.machine.alive:
            try:
                (d / "dmesg.txt").write_text(vm.run("dmesg", timeout=15).stdout)
            except Exception as e:
                (d / "dmesg.txt").write_text(f"(dmesg unavailable: {e})\n")
        splat_text += text
    if not request.node.get_closest_marker("allow_splats"):
        _raise_on_splats(splat_text)
