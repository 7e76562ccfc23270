"""Helpers shared by the scenario modules. Small on purpose; the API below is stable.

Fixtures come from the plugin (harness.plugin), nothing to import:

    shared_guest(**config) -> VM
        A guest reused by the tests of one module, one per GuestConfig (mem_mb,
        memmap_on_memory, default_state, numa_nodes, ...). Only one shared guest of a module
        runs at a time: asking for another config shuts the previous one down, so order tests
        by config. The test must leave no trace (use hot_added()) or set vm.dirty. When the
        test ends, a guest that died, is dirty, splatted, or still has a DIMM or a block it
        did not boot with is retired (the test is told what it left) and the next test boots
        a fresh one. Console/QMP/dmesg slices go to the test's artifacts folder.
    shared_vm                                   shared_guest() with the default config
    boot(**config) -> VM                        a fresh guest of the test's own

Functions:

    facts_of(vm) -> expect.KernelFacts          gather_facts, once per VM (vm.facts)
    facts_as_booted(vm) -> KernelFacts          facts_of, after checking the parameter reads back
                                                what booting with vm.config.memmap_on_memory implies
    require_feature(facts, measure)             SKIP, with the reason (also recorded), when
                                                memmap_on_memory can never apply on this kernel
    hot_added(vm, size, node=None, remove=True) context manager -> Plugged: add, wait for the
                                                blocks; on exit offline them and remove the DIMM
                                                unless the body already did (shuts the VM down
                                                if that fails); remove=False keeps it and sets
                                                vm.dirty
    set_states(guest, ids, state, v=None)       write state to every block; a refusal is a
                                                failed Verdict (raised at once when v is None)
    check_new_blocks(v, base, added, ids)       the per-block sysfs checks after an add: exactly
                                                these new blocks, phys_index, state offline,
                                                online 0, valid_zones "Normal Movable"; MemTotal
                                                unchanged
    check_zone_deltas(v, before, after, node, zone, want, what, rule)
                                                spanned/present/managed of one zone moved by want
    self_hosted_pages(before, after, node, zone) observed vmemmap pages kept out of managed
    record_self_hosted(measure, facts, pages)   measure("self_hosted_blocks", n) for the summary
    free_kb(snap) -> int                        MemFree + the per-cpu free lists, in kB
                                                (need_field: INFRA unread, FAIL absent)
    memtotal(snap) -> int                       MemTotal in kB (need_field: INFRA unread, FAIL absent)
    pcp_pages(zoneinfo_text) -> int             pure: sum of the per-cpu "count:" lines
    block_states(guest, ids) -> {id: state}     the state file of each block (missing ones left out)
    owner_private_pfns(guest, pfns) -> [int]    pfns of `pfns` (a range) with kpageflags bit 37
    check_owner_private(v, guest, facts, dec, b, n)  bit 37 on the first n pfns of block b
                                                (not judged before 6.0, said so in a verdict)
    pfn_span(pfns) -> str                       pure: pfns rendered for a verdict
    node_list(text) -> set                      pure: "0-1,3" -> {0, 1, 3}
    node_meminfo(guest, node) -> dict           /sys/devices/system/node/nodeN/meminfo, {} if absent
    memory_map(vm, measure, dec) -> MemoryMap   context manager: mm.step(name, snap, dimms) per state
                                                ("before add" ... "after removal"), mm.seen(dimm)
                                                after onlining; on exit (also after a failure) the
                                                steps go to measure("memory_map") for the HTML maps,
                                                the kernel facts to measure("facts")
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest

from harness.memory import expect, leakcheck
from harness.memory.blocks import block_states, dimm_blocks, set_block_state, wait_blocks
from harness.memory.checks import FEATURE_UNAVAILABLE_KEY, SELF_HOSTED_KEY, Verdict, Verdicts, need_field
from harness.memory.dimm import Dimm, add_dimm, memory_devices, remove_dimm
from harness.errors import CheckFailed
from harness.memory.observe import Snapshot, gather_facts
from harness.memory.observe import snapshot as observe_snapshot
from harness.memory.parsers import parse_kpageflags, parse_meminfo
from harness.reports.memmap import memory_map_step

KPF_OWNER_PRIVATE = expect.KPF_OWNER_PRIVATE


# ---------------------------------------------------------------- pure helpers
def pcp_pages(zoneinfo_text: str) -> int:
    """Pages on the per-cpu free lists: the sum of every "count:" line of /proc/zoneinfo (leakcheck.pcp_pages)."""
    return leakcheck.pcp_pages(zoneinfo_text)


def free_kb(snap: Snapshot) -> int:
    """MemFree plus the per-cpu free lists in kB (leakcheck.free_kb, the one helper): free memory that
    does not swing when a 2 MiB memmap goes to or comes from a per-cpu list (see
    expect.add_time_free_drop_bounds_kb). Never a number that could pass a check: MissingData when
    /proc/meminfo was not read, CheckFailed when it lacks MemFree (checks.need_field's rule)."""
    return leakcheck.free_kb(snap.meminfo, snap.raw.get("/proc/zoneinfo", ""))


def memtotal(snap: Snapshot) -> int:
    """MemTotal in kB: MissingData when /proc/meminfo was not read, CheckFailed when it lacks MemTotal
    (checks.need_field's rule)."""
    return need_field(snap.meminfo, "MemTotal", "/proc/meminfo",
                      "every kernel memhp targets prints MemTotal (fs/proc/meminfo.c)")


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


# ---------------------------------------------------------------- facts
def facts_of(vm) -> expect.KernelFacts:
    """gather_facts(vm.guest, vm.kernel), read once per VM and kept in vm.facts."""
    if vm.facts is None:
        vm.facts = gather_facts(vm.guest, vm.kernel)
    return vm.facts


def facts_as_booted(vm) -> expect.KernelFacts:
    """facts_of(vm), after checking the parameter reads back what booting with vm.config.memmap_on_memory implies.

    A guest whose kernel ignored the parameter would silently test the fallback path only."""
    facts = facts_of(vm)
    asked = vm.config.memmap_on_memory
    want = expect.expected_param_readback(facts.version, asked or "", facts.hugetlb_vmemmap) if asked is not None \
        else facts.param
    if facts.param != want:
        raise CheckFailed(f"memory_hotplug.memmap_on_memory after booting with ={asked}", want or "absent",
                          facts.param or "absent", expect.expected_param_readback.__doc__.strip().splitlines()[0])
    return facts


def require_feature(facts: expect.KernelFacts, measure: Optional[Callable] = None) -> None:
    """SKIP the scenario, naming the reason, when memmap_on_memory can never apply on this kernel."""
    why = expect.feature_unavailable(facts)
    if why:
        if measure is not None:
            measure(FEATURE_UNAVAILABLE_KEY, why)
        pytest.skip(f"memmap_on_memory cannot apply on this kernel: {why}")


def self_hosted_pages(before: Snapshot, after: Snapshot, node: int, zone: str) -> int:
    """Pages onlined into `zone` but not managed: the self-hosted vmemmap (present - managed delta)."""
    b, a = before.zone(node, zone), after.zone(node, zone)
    fields = (b.present, b.managed, a.present, a.managed)
    if any(x is None for x in fields):
        raise CheckFailed(f"node {node} {zone} present/managed in /proc/zoneinfo", "numbers", fields,
                          "every zone prints present and managed")
    return (a.present - b.present) - (a.managed - b.managed)


def record_self_hosted(measure: Callable, facts: expect.KernelFacts, pages: int) -> int:
    """measure("self_hosted_blocks", n): how many hot-added blocks were seen hosting their memmap."""
    per = expect.memmap_on_memory_pages(facts)
    n = pages // per if per > 0 and pages > 0 else 0
    measure(SELF_HOSTED_KEY, n)
    return n


# ---------------------------------------------------------------- guest helpers
def node_meminfo(guest, node: int) -> Dict[str, int]:
    res = guest.run(f"cat /sys/devices/system/node/node{node}/meminfo", timeout=30)
    return parse_meminfo(res.stdout) if res.ok else {}


def owner_private_pfns(guest, pfns: range) -> List[int]:
    """The pfns in `pfns` whose /proc/kpageflags word has bit 37 (KPF_OWNER_PRIVATE) set."""
    if len(pfns) == 0:
        return []
    words = parse_kpageflags(guest.read_bytes("/proc/kpageflags", pfns.start * 8, len(pfns) * 8, timeout=120))
    return [pfns.start + i for i, w in enumerate(words) if w >> KPF_OWNER_PRIVATE & 1]


def check_owner_private(v: Verdicts, guest, facts: expect.KernelFacts, dec: expect.MemmapDecision,
                        block: int, n: int) -> None:
    """kpageflags bit 37 among the first n pfns of `block`: exactly its vmemmap pfns (6.0+)."""
    rule = f"{expect.expect_owner_private.__doc__.strip().splitlines()[0]}; decision: {dec.reason}"
    if expect.expect_owner_private(facts, dec) is None:
        v.add(Verdict(f"memory{block}: kpageflags bit 37", True, "not judged", "not judged",
                      f"{facts.release} predates 6.0: {rule}"))
        return
    first = block * facts.block_pages
    want = list(expect.vmemmap_pfns(facts, dec, block))
    seen = owner_private_pfns(guest, range(first, first + n))
    v.eq(f"memory{block}: pfns with kpageflags bit 37 among its first {n}", pfn_span(want), pfn_span(seen), rule)


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


def check_new_blocks(v: Verdicts, base: Snapshot, added: Snapshot, ids, what: str = "") -> None:
    """After an add under memhp_default_state=offline: exactly `ids` are new, each offline with
    phys_index = id and valid_zones "Normal Movable"; MemTotal did not move."""
    ids = list(ids)
    v.eq(f"new memory blocks{' for ' + what if what else ''}", ids, sorted(set(added.blocks) - set(base.blocks)),
         "block N covers [N*block_size, (N+1)*block_size); ids from the DIMM's addr and size")
    for b in ids:
        blk = added.block(b)
        if blk is None:
            continue   # already a failed verdict above
        v.eq(f"memory{b}/phys_index", b, blk.phys_index, "phys_index is the block id (%08x)")
        v.eq(f"memory{b}/state", "offline", blk.state, "memhp_default_state=offline leaves new blocks offline")
        v.eq(f"memory{b}/online", False, blk.online, "online mirrors state")
        v.eq(f"memory{b}/valid_zones", ("Normal", "Movable"), tuple(blk.valid_zones),
             "an offline hot-added block may go to Normal (the default zone, listed first) or Movable")
    v.eq("MemTotal after the add (kB)", memtotal(base), memtotal(added),
         "adding without onlining does not change MemTotal")


def check_zone_deltas(v: Verdicts, before: Snapshot, after: Snapshot, node: int, zone: str,
                      want: Dict[str, int], what: str, rule: str) -> None:
    """spanned, present and managed of node's `zone` moved by want[field] between the snapshots."""
    b, a = before.zone(node, zone), after.zone(node, zone)
    for f in ("spanned", "present", "managed"):
        bv, av = getattr(b, f), getattr(a, f)
        v.eq(f"{zone} {f} delta {what}", want[f], None if bv is None or av is None else av - bv, rule)


# ---------------------------------------------------------------- hot_added
@dataclass(frozen=True)
class Plugged(Dimm):
    """A DIMM QEMU plugged, with the guest's block ids for it."""
    block_ids: Tuple[int, ...] = ()


@contextlib.contextmanager
def hot_added(vm, size: int, node: Optional[int] = None, remove: bool = True) -> Iterator[Plugged]:
    """Hot-add a pc-dimm of `size` bytes and wait for its blocks in sysfs.

    On exit (also after a failure) every online block is offlined and the DIMM removed, unless
    the body removed it already, so a shared guest is left as it was. If that cleanup fails
    the VM is shut down, so no later test runs on a guest with leftovers; the cleanup's error
    is raised unless the body already raised (then it is added to the body's error as a
    note). remove=False keeps the DIMM (blocks online in Normal, which the guest usually
    cannot offline again) and sets vm.dirty: the shared pool boots a fresh guest next time.
    """
    d = add_dimm(vm.qmp, size, node=node)
    dimm = Plugged(d.id, d.memdev, d.addr, d.size, d.slot, d.node, dimm_blocks(d, facts_of(vm).block_size))
    body_exc: Optional[BaseException] = None
    try:
        wait_blocks(vm.guest, dimm.block_ids)
        yield dimm
    except BaseException as e:
        body_exc = e
        # When the body failed, before the cleanup's commands: where a replay stops to show the state.
        with contextlib.suppress(AttributeError):
            e.memhp_failed_at = time.time()
        raise
    finally:
        if not remove:
            vm.dirty = True
        else:
            try:
                _remove(vm, dimm)
            except BaseException as e:
                vm.dirty = True
                vm.close()
                if body_exc is None:
                    raise
                body_exc.add_note(f"(cleanup of {dimm.id} also failed, guest shut down: {e})")


def _remove(vm, dimm: Plugged) -> None:
    if not vm.machine.alive or not any(d.get("id") == dimm.id for d in memory_devices(vm.qmp)):
        return   # the body removed it (or QEMU is gone: nothing left to clean)
    online = [b for b, st in block_states(vm.guest, dimm.block_ids).items() if st == "online"]
    set_states(vm.guest, online, "offline")
    res = remove_dimm(vm.qmp, dimm)
    if not res.deleted:
        raise CheckFailed(f"cleanup: remove {dimm.id} (blocks {list(dimm.block_ids)}, all offline)",
                          "DEVICE_DELETED", list(res.event_names),
                          "offline blocks are ejected: OST 132, DEVICE_DELETED, OST 0")
    wait_blocks(vm.guest, dimm.block_ids, present=False)



# ---------------------------------------------------------------- memory map
class MemoryMap:
    """The memory-map steps of one scenario (harness.reports.memmap's format), for the HTML report.

    Blocks, states, zones and DIMMs are the guest's own at each step. A DIMM block's memmap is
    placed at the add and stays until the removal, so every step with the DIMM carries the
    self-hosted pages seen after onlining (seen(): kpageflags bit 37 on the block's first
    pfns, 6.0+); a scenario that never got there carries decide()'s figure, and each step says
    which ("self_hosted_source": "kpageflags bit 37" or "expected")."""

    def __init__(self, vm, dec: expect.MemmapDecision):
        self.vm, self.dec = vm, dec
        self.steps: List[Tuple[str, Snapshot, Tuple]] = []
        self.hosted: Dict[int, int] = {}

    def step(self, name: str, snap: Snapshot, dimms=()) -> None:
        self.steps.append((name, snap, tuple(dimms)))

    def seen(self, dimm: "Plugged") -> None:
        """Count the bit-37 pfns at the start of each of dimm's blocks (online blocks only show it)."""
        facts = facts_of(self.vm)
        if expect.expect_owner_private(facts, self.dec) is None:
            return   # before 6.0 bit 37 says nothing: keep the expected figure
        n = 2 * expect.vmemmap_pages_per_block(facts) + 8   # room for force's padding
        for b in dimm.block_ids:
            first = b * facts.block_pages
            self.hosted[b] = len(owner_private_pfns(self.vm.guest, range(first, first + n)))

    def entries(self) -> List[dict]:
        want = self.dec.vmemmap_pages_per_block if self.dec.applies else 0
        out = []
        for name, snap, dimms in self.steps:
            ids = {b for d in dimms for b in d.block_ids}
            seen = ids <= set(self.hosted)
            pages = {b: (self.hosted[b] if seen else want) for b in ids}
            entry = memory_map_step(name, snap, dimms, pages, facts_of(self.vm).page_size)
            entry["self_hosted_source"] = "kpageflags bit 37" if seen else "expected"
            out.append(entry)
        return out


@contextlib.contextmanager
def memory_map(vm, measure: Callable, dec: expect.MemmapDecision, removal: bool = False) -> Iterator[MemoryMap]:
    """A MemoryMap whose steps are recorded as measure("memory_map", [...]) when the block ends,
    also after a failure (the map then shows where the scenario stopped), with the kernel facts
    they are drawn from as measure("facts", {...}) (the report's kernel facts).

    removal=True: for `with memory_map(...) as mm, hot_added(...) as dimm:`, whose DIMM is gone
    only once the block ends: after a body that did not fail, one more snapshot is the "after
    removal" step when none of the DIMMs' blocks is left in it (a kept DIMM gets no such step)."""
    mm = MemoryMap(vm, dec)
    failed = True
    try:
        yield mm
        failed = False
    finally:
        if removal and not failed and mm.steps and mm.steps[-1][0] != "after removal":
            ids = {b for _, _, dimms in mm.steps for d in dimms for b in d.block_ids}
            try:
                gone = observe_snapshot(vm.guest)
            except Exception:   # only the picture is lost; the guest's state is the next scenario's to judge
                gone = None
            if gone is not None and ids and not ids & set(gone.blocks):
                mm.step("after removal", gone)
        if mm.steps:
            f = facts_of(vm)
            measure("facts", {"release": f.release, "block_size": f.block_size, "page_size": f.page_size,
                              "struct_page": f.struct_page_size, "struct_page_source": f.struct_page_source,
                              "pageblock_order": f.pageblock_order, "param": f.param})
            measure("memory_map", mm.entries())
