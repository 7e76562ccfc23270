"""Per-block invariants with memmap_on_memory=1: block attributes and valid_zones next to a Movable
zone, per-block offline of a multi-block DIMM, removing one of two adjacent DIMMs, kpageflags over
all of RAM, and the rollback after a refused offline or eject of busy Normal blocks.

Guest: one shared guest (memmap_on_memory=1, memhp_default_state=offline, 1 GiB boot RAM, all of
it below 4 GiB in DMA32, so zones Normal and Movable start empty). The first four tests leave no
trace (_common.hot_added offlines and removes, also on failure). The rollback test runs last: it
keeps DIMMs online in Normal full of unmovable pages, which is its point, and that marks the guest
dirty; the multi-block eject test after it gets a fresh guest, so the module boots twice per kernel.

Rules (kernel sources read: Debian 6.1.192 and 6.12.117; the lines cited are the same in both
unless said otherwise):
* removable reads 1 (drivers/base/memory.c removable_show(): IS_ENABLED(CONFIG_MEMORY_HOTREMOVE))
  and phys_device 0 (x86_64 has no arch_get_memory_phys_device(); the __weak one returns 0).
* valid_zones of an offline block is the default zone first, then the other allowed ones
  (valid_zones_show()). The default is mm/memory_hotplug.c default_zone_for_pfn(): the zone the
  block intersects when exactly one of Normal and Movable spans it, else Normal. So a block inside
  the span of a Movable zone (between two online Movable blocks) reads "Movable Normal", a block
  just past it "Normal Movable", and `echo online` puts the inner one in Movable.
* Per-block split (6.8+, create_altmaps_and_memory_blocks()): each block of a 1 GiB DIMM hosts its
  own memmap at its start, so offlining some blocks leaves every other block's state, its
  vmemmap pages (kpageflags bit 37) and its share of the zone untouched. The zone's present and
  managed count online blocks (block_pages, and block_pages - vmemmap pages; memory_block_online()
  adds the vmemmap pages to present); spanned runs from the lowest to the highest online block.
  Pfns of an offline block read KPF_NOPAGE only (fs/proc/page.c: pfn_to_online_page() is NULL for
  an offline section).
* kpageflags (6.0+): bit 37 is set exactly on the vmemmap pages of online self-hosting blocks,
  nowhere else in RAM. RESERVED (bit 32) on those pages: set on 6.1 (memmap_init_range() marks
  MEMINIT_HOTPLUG pages PageReserved and mhp_init_memmap_on_memory() leaves it), clear on 6.12
  (mm/mm_init.c marks them PageOffline instead, and mhp_init_memmap_on_memory() clears that). No
  other page of an online Movable block is reserved (__free_pages_core() clears it when onlining).
* A busy Normal block (a one-block DIMM, online_kernel with the feature, then slab pages placed
  in it by creating directories): an offline attempt gives EBUSY (offline_pages():
  start_isolate_page_range() fails on unmovable pages) and memory_block_offline() gives the
  vmemmap pages back to present, so state, zone counters, MemTotal and bit-37 pfns are exactly as
  before. An eject attempt (device_del) is refused with OST 132 then 130, and the same holds.
  6.1 and 6.12 allow and refuse exactly the same here: nothing in memory_block_offline() or
  offline_pages() treats a self-hosted block in Normal differently.
* Refused eject of a 3-block DIMM whose first block is busy in Normal, the second clean in Normal,
  the third clean in Movable: OST 132 then 130, and acpi_scan_try_to_offline() re-onlines the
  blocks its first pass had offlined with device_online(), i.e. MMOP_ONLINE (state_store() resets
  online_type after each write). MMOP_ONLINE's zone is default_zone_for_pfn(): by then the
  offlined blocks lie outside Normal's shrunken span and Movable is empty, so both come back in
  Normal -- the Movable block does NOT return to its original zone. Normal then spans, holds and
  manages all three blocks, Movable nothing; MemTotal and the bit-37 pfns are as before.

Slab pages land in the unmovable pageblocks the allocator already took (measured: a second Normal
DIMM onlined after a busy one got none from 24000 directories), so each busy test fills while its
block is the only Normal memory (rounds of 3000 directories until kpageflags show slab pages in
it, bounded by a 900 s deadline rather than a round count: a loaded host only makes it slower), and the two busy tests run last, each on its own guest (the
first retires the shared guest, the second gets a fresh one).
"""
from __future__ import annotations

import contextlib
import shlex
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import pytest

from harness.memory import expect
from harness.memory.checks import Verdict, Verdicts
from harness.errors import CheckFailed, InfraError
from harness.memory.blocks import block_states, dimm_blocks, set_block_state, wait_blocks
from harness.memory.dimm import OST_BUSY, OST_IN_PROGRESS, add_dimm, remove_dimm
from harness.memory.observe import snapshot
from harness.memory.parsers import parse_kpageflags
from harness.scenarios._common import facts_as_booted, hot_added, memory_map, pfn_span, set_states

KPF_SLAB = 7
KPF_NOPAGE = 20
KPF_RESERVED = 32
KPF_OWNER_PRIVATE = 37
V_KPF_SELF_HOSTED = (6, 0)
V_SPLIT = (6, 8)
V_OFFLINE_NOT_RESERVED = (6, 12)
SPEC = {"memmap_on_memory": "1"}
UNMOVABLE_FILL = ("mkdir -p /tmp/memhp-unmovable/{r} && cd /tmp/memhp-unmovable/{r} && i=0; "
                  "while [ $i -lt {n} ]; do mkdir d$i; i=$((i+1)); done")


# ---------------------------------------------------------------- pure expectations
def zone_counters(facts: expect.KernelFacts, dec: expect.MemmapDecision, online: Iterable[int]) -> Dict[str, int]:
    """Counters of a zone that holds exactly the blocks `online` (and started empty): spanned from the
    lowest to the highest block, present block_pages per block, managed without the vmemmap pages."""
    ids = sorted(set(online))
    bp = facts.block_pages
    vm = dec.vmemmap_pages_per_block if dec.applies else 0
    if not ids:
        return {"spanned": 0, "present": 0, "managed": 0}
    return {"spanned": (ids[-1] - ids[0] + 1) * bp, "present": len(ids) * bp, "managed": len(ids) * (bp - vm)}


def default_zone(block: int, normal: Sequence[int], movable: Sequence[int]) -> str:
    """default_zone_for_pfn() for an offline block, given the online blocks of each zone (no
    movable_node): the zone whose span holds the block when exactly one does, else Normal."""
    def spans(ids):
        return bool(ids) and min(ids) <= block <= max(ids)
    in_k, in_m = spans(normal), spans(movable)
    if in_k != in_m:
        return "Normal" if in_k else "Movable"
    return "Normal"


def offline_valid_zones(block: int, normal: Sequence[int], movable: Sequence[int]) -> Tuple[str, ...]:
    """valid_zones_show() of an offline block: the default zone, then the other of Normal/Movable."""
    d = default_zone(block, normal, movable)
    return (d, "Movable" if d == "Normal" else "Normal")


def vmemmap_reserved(version) -> bool:
    """RESERVED on self-hosted vmemmap pages: PageReserved before 6.12, PageOffline (then cleared) since.

    Read in Debian's 6.1.192 (mm/page_alloc.c memmap_init_range(): __SetPageReserved for
    MEMINIT_HOTPLUG) and 6.12.117 (mm/mm_init.c: __SetPageOffline). The boundary, 6.12, is the
    upstream series that replaced PageReserved with PageOffline for hot-added memory ("mm/
    memory_hotplug: initialize memmap of !ZONE_DEVICE with PageOffline() instead of
    PageReserved()"), recalled, not read: kernels 6.2 to 6.11 are assumed to behave like 6.1."""
    return tuple(version[:2]) < V_OFFLINE_NOT_RESERVED


def expected_bit37(facts: expect.KernelFacts, online_selfhosted: Dict[int, expect.MemmapDecision]) -> List[int]:
    """Pfns with bit 37: the vmemmap pfns of every online block whose memmap it hosts itself."""
    out: List[int] = []
    for b in sorted(online_selfhosted):
        out.extend(expect.vmemmap_pfns(facts, online_selfhosted[b], b))
    return out


def bits(words: Dict[int, int], bit: int) -> List[int]:
    return sorted(p for p, w in words.items() if w >> bit & 1)


# ---------------------------------------------------------------- guest helpers
def kpf(vm, blocks: Iterable[int], block_pages: int) -> Dict[int, int]:
    """{pfn: kpageflags word} for every pfn of the given blocks (reads whole 4 KiB pages of the file)."""
    out: Dict[int, int] = {}
    for b in sorted(set(blocks)):
        first = b * block_pages
        nbytes = block_pages * 8
        big = getattr(vm.guest, "_bytes", None)   # whole 4 KiB pages per read() when the guest layer allows
        if big is not None and nbytes % 4096 == 0 and first * 8 % 4096 == 0:
            data = big(("dd", "if=/proc/kpageflags", "bs=4096", f"skip={first * 8 // 4096}",
                        f"count={nbytes // 4096}"), 300)
        else:
            data = vm.guest.read_bytes("/proc/kpageflags", first * 8, nbytes, timeout=300)
        words = parse_kpageflags(data)
        if len(words) != block_pages:
            raise InfraError(f"/proc/kpageflags for memory{b}: read {len(words)} words, wanted {block_pages}")
        out.update((first + i, w) for i, w in enumerate(words))
    return out


def read_attr(vm, blocks: Iterable[int], attr: str) -> Dict[int, Optional[str]]:
    cmd = ("for b in " + " ".join(f"{b:d}" for b in blocks) + "; do echo $b $(cat /sys/devices/system/memory/memory$b/"
           + shlex.quote(attr) + " 2>/dev/null || echo '?'); done")
    out: Dict[int, Optional[str]] = {}
    for line in vm.run(cmd, timeout=30, check=True).stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            out[int(parts[0])] = None if parts[1].strip() == "?" else parts[1].strip()
    return out


@dataclass(frozen=True)
class _Blocks:
    dimm: object
    block_ids: Tuple[int, ...]

    @property
    def id(self) -> str:
        return self.dimm.id


def _gate(facts: expect.KernelFacts, size: int, need_split: bool = False) -> expect.MemmapDecision:
    if tuple(facts.version[:2]) < V_KPF_SELF_HOSTED:
        pytest.skip(f"kpageflags bit 37 marks self-hosted vmemmap pages only since 6.0; this kernel is {facts.release}")
    if need_split and tuple(facts.version[:2]) < V_SPLIT:
        pytest.skip(f"per-block split of a multi-block DIMM needs 6.8+; this kernel is {facts.release}")
    dec = expect.decide(facts, size)
    if not dec.applies:
        pytest.skip(f"memmap_on_memory cannot apply to a {size >> 20} MiB DIMM here: {dec.reason}")
    return dec


def _check_zone(v: Verdicts, snap, base, zone: str, want: Dict[str, int], when: str, rule: str) -> None:
    for f in ("spanned", "present", "managed"):
        v.eq(f"{zone} {f} {when}", getattr(base.zone(0, zone), f) + want[f], getattr(snap.zone(0, zone), f), rule)


def _check_kpf(v: Verdicts, facts, words: Dict[int, int], selfhosted: Dict[int, expect.MemmapDecision],
               offline: Iterable[int], when: str, reason: str) -> None:
    """bit 37 exactly on the vmemmap pages of online self-hosting blocks; offline blocks NOPAGE only;
    RESERVED on those vmemmap pages as the version says, on no other page of those blocks."""
    want37 = expected_bit37(facts, selfhosted)
    v.eq(f"pfns with kpageflags bit 37 {when}", pfn_span(want37), pfn_span(bits(words, KPF_OWNER_PRIVATE)),
         f"bit 37 (PG_owner_priv_1 = PageVmemmapSelfHosted, set by mhp_init_memmap_on_memory()) lies on the "
         f"first vmemmap pages of each online self-hosting block and nowhere else; {reason}")
    bp = facts.block_pages
    for b in sorted(offline):
        odd = [p for p in range(b * bp, (b + 1) * bp) if words.get(p) != 1 << KPF_NOPAGE]
        v.eq(f"memory{b} (offline): pfns not reading exactly KPF_NOPAGE {when}", "none", pfn_span(odd),
             "kpageflags_read(): pfn_to_online_page() is NULL in an offline section, so the word is 1 << 20")
    res_want = vmemmap_reserved(facts.version)
    vm_pfns = set(want37)
    blocks_pfns = {p for b in selfhosted for p in range(b * bp, (b + 1) * bp)}
    want_res = sorted(vm_pfns) if res_want else []
    seen_res = sorted(p for p in blocks_pfns if words.get(p, 0) >> KPF_RESERVED & 1)
    v.eq(f"pfns with kpageflags RESERVED (bit 32) in the online self-hosting blocks {when}",
         pfn_span(want_res), pfn_span(seen_res),
         ("6.1: memmap_init_range() sets PageReserved on hot-added pages; onlining frees the rest "
          "(__free_pages_core() clears it) but the vmemmap pages are never freed, so they stay reserved"
          if res_want else
          "6.12: memmap_init_range() marks hot-added pages PageOffline, not PageReserved; "
          "mhp_init_memmap_on_memory() clears PageOffline on the vmemmap pages: no page is reserved")
         + f"; kernel {facts.release}")


# ---------------------------------------------------------------- no-trace tests
def test_block_attributes_and_valid_zones(shared_guest):
    """removable, phys_device; valid_zones inside and just past the span of a Movable zone; echo online."""
    vm = shared_guest(**SPEC)
    facts = facts_as_booted(vm)
    bs = facts.block_size
    v = Verdicts()
    base = snapshot(vm.guest)
    for zone in ("Normal", "Movable"):
        v.eq(f"{zone} spanned before the test", 0, base.zone(0, zone).spanned,
             "1 GiB of boot RAM lies below 4 GiB (DMA32) and the shared guest holds no DIMM: the rules "
             "below assume empty Normal and Movable zones")
    v.raise_if_failed()
    with contextlib.ExitStack() as st:
        dimms = [st.enter_context(hot_added(vm, bs)) for _ in range(4)]
        a, b, c, d = (dm.block_ids[0] for dm in dimms)
        v.eq("block ids of four block-sized DIMMs", [a, a + 1, a + 2, a + 3], [a, b, c, d],
             "QEMU places each DIMM right after the previous one (2 MiB alignment, block-sized DIMMs)")
        v.raise_if_failed()
        ids = [a, b, c, d]
        for attr, want, rule in (("removable", "1", "removable_show(): IS_ENABLED(CONFIG_MEMORY_HOTREMOVE), "
                                                    "which memhp requires"),
                                 ("phys_device", "0", "phys_device_show(): arch_get_memory_phys_device() is the "
                                                      "__weak one on x86_64, returning 0")):
            got = read_attr(vm, ids, attr)
            for blk in ids:
                v.eq(f"memory{blk}/{attr}", want, got.get(blk), rule)
        got = read_attr(vm, ids, "valid_zones")
        for blk in ids:
            v.eq(f"memory{blk}/valid_zones with no zone around", " ".join(offline_valid_zones(blk, [], [])),
                 got.get(blk), "default_zone_for_pfn(): no zone spans the block, so Normal first, then Movable")
        set_states(vm.guest, [a, c], "online_movable", v)
        v.raise_if_failed()
        got = read_attr(vm, ids, "valid_zones")
        rule = ("valid_zones_show(): default zone first (default_zone_for_pfn(): the one zone whose span "
                "holds the block, else Normal), then the other; an online block reads its zone")
        for blk in (b, d):
            v.eq(f"memory{blk}/valid_zones with memory{a} and memory{c} online Movable",
                 " ".join(offline_valid_zones(blk, [], [a, c])), got.get(blk), rule)
        for blk in (a, c):
            v.eq(f"memory{blk}/valid_zones (online Movable)", "Movable", got.get(blk), rule)
        set_states(vm.guest, [b], "online", v)
        v.raise_if_failed()
        onl = snapshot(vm.guest)
        want_zone = default_zone(b, [], [a, c])
        v.eq(f"memory{b}/valid_zones after echo online", want_zone,
             " ".join(onl.block(b).valid_zones) if onl.block(b) else None,
             "MMOP_ONLINE takes default_zone_for_pfn(): the Movable zone around the block")
        dec = expect.decide(facts, bs)
        _check_zone(v, onl, base, "Movable", zone_counters(facts, dec, [a, b, c]), "with three blocks online",
                    f"{expect.online_deltas.__doc__.strip().splitlines()[0]}; spanned from the lowest to the "
                    f"highest online block; {dec.reason}")
        v.raise_if_failed()


def test_offline_some_blocks_of_1gib_dimm(shared_guest, measure):
    """6.8+: offline some blocks of a 1 GiB DIMM; the others keep state, memmap and zone share.
    Its memory map per step goes to the HTML report (_common.memory_map)."""
    vm = shared_guest(**SPEC)
    facts = facts_as_booted(vm)
    size = expect.GiB
    dec = _gate(facts, size, need_split=True)
    v = Verdicts()
    base = snapshot(vm.guest)
    v.eq("Movable spanned before the test", 0, base.zone(0, "Movable").spanned,
         "the shared guest holds no DIMM, so the Movable zone is empty")
    v.raise_if_failed()
    with memory_map(vm, measure, dec, removal=True) as mm, hot_added(vm, size) as dimm:
        mm.step("before add", base)
        ids = list(dimm.block_ids)
        set_states(vm.guest, ids, "online_movable", v)
        v.raise_if_failed()
        full = snapshot(vm.guest)
        mm.step("after online", full, [dimm])
        rule = f"{expect.online_deltas.__doc__.strip().splitlines()[0]}; spanned lowest to highest online block"
        _check_zone(v, full, base, "Movable", zone_counters(facts, dec, ids), "with every block online",
                    f"{rule}; {dec.reason}")
        words = kpf(vm, ids, facts.block_pages)
        _check_kpf(v, facts, words, {b: dec for b in ids}, [], "with every block online", dec.reason)
        v.raise_if_failed()
        # Offline an inner pair and the last block: holes inside the span, and a shrink at its end.
        off = [ids[1], ids[2], ids[-1]]
        keep = [b for b in ids if b not in off]
        set_states(vm.guest, off, "offline", v)
        v.raise_if_failed()
        part = snapshot(vm.guest)
        mm.step(f"after offline of {', '.join(f'memory{b}' for b in off)}", part, [dimm])
        for b in ids:
            blk = part.block(b)
            v.eq(f"memory{b}/state after offlining {off}", "offline" if b in off else "online",
                 blk.state if blk else None, "each block changes state on its own (per-block altmap, 6.8+)")
        _check_zone(v, part, base, "Movable", zone_counters(facts, dec, keep), f"with {off} offline",
                    f"{rule}; offlining reverses a block's own deltas only; {dec.reason}")
        v.eq(f"MemTotal with {off} offline (kB)",
             full.meminfo["MemTotal"] + expect.offline_deltas(facts, dec, len(off))["MemTotal"],
             part.meminfo.get("MemTotal"), "offlining a block subtracts its managed pages, vmemmap excluded")
        words = kpf(vm, ids, facts.block_pages)
        _check_kpf(v, facts, words, {b: dec for b in keep}, off, f"with {off} offline",
                   f"every block hosts its own memmap at its start, so the survivors' memmaps stay inside "
                   f"them; {dec.reason}")
        v.raise_if_failed()
        set_states(vm.guest, off, "online_movable", v)
        v.raise_if_failed()
        back = snapshot(vm.guest)
        mm.step("after online again", back, [dimm])
        _check_zone(v, back, base, "Movable", zone_counters(facts, dec, ids), "after onlining them again",
                    f"{rule}; {dec.reason}")
        v.eq("MemTotal after onlining them again (kB)", full.meminfo["MemTotal"], back.meminfo.get("MemTotal"),
             "online and offline deltas cancel exactly")
        v.raise_if_failed()


def test_remove_one_of_two_adjacent_dimms(shared_guest):
    """Remove one DIMM while the adjacent self-hosting DIMM stays online Movable."""
    vm = shared_guest(**SPEC)
    facts = facts_as_booted(vm)
    k = 2 if tuple(facts.version[:2]) >= V_SPLIT else 1   # the largest DIMM that self-hosts on this version
    size = k * facts.block_size
    dec = _gate(facts, size)
    v = Verdicts()
    base = snapshot(vm.guest)
    v.eq("Movable spanned before the test", 0, base.zone(0, "Movable").spanned,
         "the shared guest holds no DIMM, so the Movable zone is empty")
    v.raise_if_failed()
    first_d = add_dimm(vm.qmp, size)
    first = _Blocks(first_d, dimm_blocks(first_d, facts.block_size))
    removed = False
    try:
        wait_blocks(vm.guest, first.block_ids)
        with hot_added(vm, size) as second:
            v.eq("the second DIMM's first block", first.block_ids[-1] + 1, second.block_ids[0],
                 "QEMU places the second DIMM right after the first")
            ids = list(first.block_ids) + list(second.block_ids)
            set_states(vm.guest, ids, "online_movable", v)
            v.raise_if_failed()
            both = snapshot(vm.guest)
            res = remove_dimm(vm.qmp, first.dimm)
            removed = res.deleted
            v.eq(f"device_del {first.id} (online Movable)", True, res.deleted,
                 "the guest offlines Movable blocks itself and ejects the DIMM")
            v.raise_if_failed()
            wait_blocks(vm.guest, first.block_ids, present=False)
            after = snapshot(vm.guest)
            v.eq("memory blocks after removing the first DIMM", sorted(set(both.blocks) - set(first.block_ids)),
                 sorted(after.blocks), "the removed DIMM's blocks leave sysfs; the neighbour's stay")
            for b in second.block_ids:
                blk = after.block(b)
                v.eq(f"memory{b}/state (survivor)", "online", blk.state if blk else None, "the neighbour is untouched")
                v.eq(f"memory{b}/valid_zones (survivor)", ("Movable",), tuple(blk.valid_zones) if blk else None,
                     "the neighbour is untouched")
            _check_zone(v, after, base, "Movable", zone_counters(facts, dec, second.block_ids),
                        "after removing the neighbour",
                        f"shrink_zone_span() moves the zone start to the survivor: it spans, holds and manages the "
                        f"survivor's blocks only; {dec.reason}")
            v.eq("MemTotal after removing the neighbour (kB)",
                 base.meminfo["MemTotal"] + expect.online_deltas(facts, dec, k)["MemTotal"],
                 after.meminfo.get("MemTotal"), "only the survivor's managed pages remain counted")
            words = kpf(vm, second.block_ids, facts.block_pages)
            _check_kpf(v, facts, words, {b: dec for b in second.block_ids}, [], "of the survivor",
                       f"the survivor's memmap lives in its own blocks, so removing the neighbour leaves it; "
                       f"{dec.reason}")
            v.raise_if_failed()
    finally:
        if not removed:
            try:
                online = [b for b, s in block_states(vm.guest, first.block_ids).items() if s == "online"]
                set_states(vm.guest, online, "offline")
                if not remove_dimm(vm.qmp, first.dimm).deleted:
                    raise CheckFailed(f"cleanup: remove {first.id}", "DEVICE_DELETED", "refused", "offline blocks eject")
            except Exception:
                vm.dirty = True


def test_kpageflags_over_all_ram(shared_guest):
    """6.0+: bit 37 only on the vmemmap pages, over every block of RAM; NOPAGE while offline; RESERVED per version."""
    vm = shared_guest(**SPEC)
    facts = facts_as_booted(vm)
    size = facts.block_size
    dec = _gate(facts, size)
    v = Verdicts()
    with hot_added(vm, size) as dimm:
        ids = list(dimm.block_ids)
        words = kpf(vm, ids, facts.block_pages)
        _check_kpf(v, facts, words, {}, ids, "before onlining", dec.reason)
        set_states(vm.guest, ids, "online_movable", v)
        v.raise_if_failed()
        allb = sorted(snapshot(vm.guest).blocks)
        words = kpf(vm, allb, facts.block_pages)
        _check_kpf(v, facts, words, {b: dec for b in ids}, [],
                   f"over all {len(allb)} blocks of RAM (memory{allb[0]}..memory{allb[-1]})", dec.reason)
        v.raise_if_failed()


# ---------------------------------------------------------------- last: keeps busy Normal DIMMs
def _slab_blocks(vm, facts, ids) -> Dict[int, int]:
    words = kpf(vm, ids, facts.block_pages)
    bp = facts.block_pages
    return {b: sum(1 for p in range(b * bp, (b + 1) * bp) if words[p] >> KPF_SLAB & 1) for b in ids}


FILL_ROUND = 3000        # directories per round: ~3000 dentries + inodes, a few MiB of slab
FILL_DEADLINE = 900.0    # s for the whole fill; a round takes 10-60 s on a loaded TCG host


def _normal_free(vm) -> Optional[int]:
    z = snapshot(vm.guest).zone(0, "Normal")
    return z.free if z else None


def _fill_until(vm, facts, ids, want_in, tag: str, deadline: float = FILL_DEADLINE) -> Dict[int, int]:
    """Create directories (dentries and inodes: slab, unmovable) until a block of want_in holds slab pages.

    Rounds go on until the kpageflags of want_in show slab pages or the deadline passes, so a slow
    (loaded) guest only takes longer. Which block the slab lands in is the allocator's choice:
    GFP_KERNEL tries ZONE_NORMAL first and claims a whole free pageblock there (ALLOC_NOFRAGMENT), so
    the callers keep exactly one Normal block while filling, or accept any block of want_in."""
    slab: Dict[int, int] = {}
    free0 = _normal_free(vm)
    end = time.monotonic() + deadline
    r = 0
    while True:
        vm.run(UNMOVABLE_FILL.format(r=shlex.quote(f"{tag}{r:d}"), n=FILL_ROUND),
               timeout=max(60.0, end - time.monotonic()), check=True)
        r += 1
        slab = _slab_blocks(vm, facts, ids)
        if any(slab[x] for x in want_in):
            return slab
        if time.monotonic() >= end:
            raise InfraError(f"no slab pages in memory{list(want_in)} after {r} x {FILL_ROUND} directories in "
                             f"{deadline:.0f} s (Normal free pages {free0} -> {_normal_free(vm)}): {slab}")


def _refused_busy(v: Verdicts, what: str, res) -> None:
    text = " ".join(((res.stderr or "") + " " + (res.stdout or "")).split())
    v.add(Verdict(what, (not res.ok) and "busy" in text.lower(), "refused with EBUSY (Device or resource busy)",
                  f"status {res.status}: {text}" if not res.ok else f"accepted (status 0) {text}".strip(),
                  "offline_pages(): start_isolate_page_range() fails on a pageblock holding slab pages "
                  "(has_unmovable_pages()), reason \"failure to isolate range\", -EBUSY"))


def _same_as_before(v: Verdicts, vm, facts, before, before_words, ids, when: str) -> None:
    after = snapshot(vm.guest)
    for b in ids:
        blk = after.block(b)
        v.eq(f"memory{b}/state {when}", "online", blk.state if blk else None, "a refused offline changes nothing")
        v.eq(f"memory{b}/valid_zones {when}", ("Normal",), tuple(blk.valid_zones) if blk else None,
             "back online in its original zone: MMOP_ONLINE's default zone is Normal, whose span holds the block")
    for f in ("spanned", "present", "managed"):
        v.eq(f"Normal {f} {when}", getattr(before.zone(0, "Normal"), f), getattr(after.zone(0, "Normal"), f),
             "memory_block_offline() re-adds the vmemmap pages to present when offline_pages() fails; a block "
             "the eject had offlined comes back with the same deltas")
    v.eq(f"MemTotal {when} (kB)", before.meminfo.get("MemTotal"), after.meminfo.get("MemTotal"),
         "managed pages are only subtracted when offline_pages() succeeds")
    words = kpf(vm, ids, facts.block_pages)
    v.eq(f"pfns with kpageflags bit 37 {when}", pfn_span(bits(before_words, KPF_OWNER_PRIVATE)),
         pfn_span(bits(words, KPF_OWNER_PRIVATE)),
         "the vmemmap pages keep PageVmemmapSelfHosted (a re-onlined block sets it again)")


def test_busy_normal_block_rolls_back(shared_guest, measure):
    """online_kernel with the feature; slab pages inside; offline -> EBUSY and eject -> OST 130 leave everything as it was."""
    vm = shared_guest(**SPEC)
    facts = facts_as_booted(vm)
    one = facts.block_size
    dec1 = _gate(facts, one)
    measure("decision", dec1.reason)
    v = Verdicts()
    base = snapshot(vm.guest)
    with hot_added(vm, one, remove=False) as a:
        set_states(vm.guest, a.block_ids, "online_kernel", v)
        v.raise_if_failed()
        onl = snapshot(vm.guest)
        _check_zone(v, onl, base, "Normal", zone_counters(facts, dec1, a.block_ids), "after online_kernel",
                    f"online_kernel puts the block in Normal with the same deltas as Movable; {dec1.reason}")
        v.raise_if_failed()
        ids = list(a.block_ids)
        slab = _fill_until(vm, facts, ids, ids, "a")
        measure("slab_pages_per_block", slab)
        words = kpf(vm, ids, facts.block_pages)
        _check_kpf(v, facts, words, {x: dec1 for x in ids}, [], "after online_kernel and the fill", dec1.reason)
        v.raise_if_failed()
        before = snapshot(vm.guest)
        before_words = kpf(vm, ids, facts.block_pages)
        busy = ids[0]
        _refused_busy(v, f"echo offline > memory{busy}/state ({slab[busy]} slab pages, self-hosted memmap)",
                      set_block_state(vm.guest, busy, "offline"))
        _same_as_before(v, vm, facts, before, before_words, ids, "after the refused offline")
        v.raise_if_failed()
        res = remove_dimm(vm.qmp, a, timeout=180)
        measure("events", list(res.event_names))
        v.eq(f"device_del {a.id} (online in Normal, slab pages inside): events",
             [f"ACPI_DEVICE_OST:{OST_IN_PROGRESS}", f"ACPI_DEVICE_OST:{OST_BUSY}"], list(res.event_names),
             "acpi_scan_try_to_offline() cannot offline a block holding unmovable pages: OST 132, then 130")
        v.eq(f"DEVICE_DELETED for {a.id}", False, res.deleted, "a refused eject deletes nothing")
        v.raise_if_failed()
        _same_as_before(v, vm, facts, before, before_words, ids, f"after the refused eject of {a.id}")
        v.raise_if_failed()


def test_refused_eject_of_3block_dimm_rolls_back(shared_guest, measure):
    """Eject of a 3-block DIMM (Normal busy, Normal clean, Movable clean) is refused; the rollback
    re-onlines the two blocks it had offlined, both in Normal (MMOP_ONLINE's default zone)."""
    vm = shared_guest(**SPEC)
    facts = facts_as_booted(vm)
    size = 3 * facts.block_size
    dec = expect.decide(facts, size)
    measure("decision", dec.reason)
    v = Verdicts()
    base = snapshot(vm.guest)
    for zone in ("Normal", "Movable"):
        v.eq(f"{zone} spanned before the test", 0, base.zone(0, zone).spanned,
             "a fresh guest (the previous test retired its guest): boot RAM lies in DMA32 only")
    v.raise_if_failed()
    with hot_added(vm, size, remove=False) as c:
        c0, c1, c2 = c.block_ids
        set_states(vm.guest, [c0], "online_kernel", v)
        v.raise_if_failed()
        slab = _fill_until(vm, facts, [c0], [c0], "c")          # c0 is the only Normal block: slab lands there
        set_states(vm.guest, [c1], "online_kernel", v)
        set_states(vm.guest, [c2], "online_movable", v)
        v.raise_if_failed()
        slab = _slab_blocks(vm, facts, list(c.block_ids))
        measure("slab_pages_per_block", slab)
        before = snapshot(vm.guest)
        before_words = kpf(vm, c.block_ids, facts.block_pages)
        for b, z in ((c0, "Normal"), (c1, "Normal"), (c2, "Movable")):
            blk = before.block(b)
            v.eq(f"memory{b}/valid_zones before the eject", (z,), tuple(blk.valid_zones) if blk else None,
                 "the state written")
        v.raise_if_failed()
        res = remove_dimm(vm.qmp, c, timeout=240)
        measure("events", list(res.event_names))
        v.eq(f"device_del {c.id} (memory{c0} holds {slab[c0]} slab pages): events",
             [f"ACPI_DEVICE_OST:{OST_IN_PROGRESS}", f"ACPI_DEVICE_OST:{OST_BUSY}"], list(res.event_names),
             "acpi_scan_try_to_offline(): both passes fail on the busy block: OST 132, then 130")
        v.eq(f"DEVICE_DELETED for {c.id}", False, res.deleted, "a refused eject deletes nothing")
        v.raise_if_failed()
        after = snapshot(vm.guest)
        rule = ("acpi_scan_try_to_offline() re-onlines what it offlined with device_online(): "
                "memory_subsys_online() uses MMOP_ONLINE (state_store() had reset online_type), whose zone is "
                "default_zone_for_pfn(): the offlined blocks left Normal's span (shrink_zone_span()) and the "
                "Movable zone is empty, so neither zone spans them and the kernel zone wins: Normal. "
                "The Movable block does NOT return to Movable")
        for b in c.block_ids:
            blk = after.block(b)
            v.eq(f"memory{b}/state after the refused eject", "online", blk.state if blk else None, rule)
            v.eq(f"memory{b}/valid_zones after the refused eject", ("Normal",),
                 tuple(blk.valid_zones) if blk else None, rule)
        want_n = zone_counters(facts, dec, c.block_ids)
        _check_zone(v, after, base, "Normal", want_n, "after the refused eject", f"all three blocks in Normal; {rule}")
        _check_zone(v, after, base, "Movable", zone_counters(facts, dec, []), "after the refused eject",
                    f"nothing is left in Movable; {rule}")
        v.eq("MemTotal after the refused eject (kB)", before.meminfo.get("MemTotal"), after.meminfo.get("MemTotal"),
             "the same blocks are online with the same managed pages, whichever zone")
        words = kpf(vm, c.block_ids, facts.block_pages)
        v.eq("pfns with kpageflags bit 37 after the refused eject", pfn_span(bits(before_words, KPF_OWNER_PRIVATE)),
             pfn_span(bits(words, KPF_OWNER_PRIVATE)),
             f"re-onlining sets PageVmemmapSelfHosted again on each self-hosted block; {dec.reason}")
        v.raise_if_failed()
