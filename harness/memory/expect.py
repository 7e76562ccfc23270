"""First-principles expectations for memory hotplug with memmap_on_memory.

The one module that turns kernel facts (version, block size, sizeof(struct
page), pageblock order, the memory_hotplug.memmap_on_memory parameter) into
expected numbers. Nothing here is copied from a run. Each public function's
docstring starts with its rule in one line; the report prints that line as
"rule".

Kernel sources read (x86_64; the arch hook arch_supports_memmap_on_memory()
is the generic one there: IS_ALIGNED(vmemmap_size, PMD_SIZE)):

* v5.13 .. v6.5, mm/memory_hotplug.c mhp_supports_memmap_on_memory(size):
  param on && size == memory_block_size_bytes() && IS_ALIGNED(vmemmap_size,
  PMD_SIZE) && IS_ALIGNED(size - vmemmap_size, pageblock_nr_pages << PAGE_SHIFT),
  where vmemmap_size = (size / PAGE_SIZE) * sizeof(struct page). The param is a
  plain bool (kstrtobool).
* v6.6+, mm/memory_hotplug.c: memmap_mode is DISABLE / ENABLE / FORCE,
  set_memmap_mode() accepts "force"/"FORCE" and otherwise kstrtobool;
  memory_block_memmap_on_memory_pages() = PFN_UP(block_pages * sizeof(struct
  page)), rounded up with pageblock_align() in FORCE mode only;
  mhp_supports_memmap_on_memory() then requires: vmemmap_size PAGE-aligned,
  pageblock_aligned(memmap_pages), memmap_pages != block_pages, and the arch
  hook (PMD alignment of the unrounded vmemmap_size, so FORCE never rescues a
  56-byte struct page on x86_64). v6.6/6.7 still require size == one block.
* v6.8+ (create_altmaps_and_memory_blocks): the check takes no size; a range
  that is a multiple of the block size gets one altmap per block.

Version gates (each is a constant below, with the source it encodes):
  < 5.13  no memory_hotplug.memmap_on_memory at all (V_FEATURE)
  5.14 .. 5.19  the HugeTLB vmemmap optimisation (hugetlb_free_vmemmap=on, HVO)
          takes precedence over memmap_on_memory (V_HVO_COMPAT); on 5.19 the
          parameter's set hook even refuses the value, so it reads N
  >= 6.0  kpageflags bit 37 marks self-hosted vmemmap pages (V_KPF_SELF_HOSTED)
  >= 6.6  "force"/"FORCE" (V_FORCE);  >= 6.8 per-block split (V_SPLIT);
  >= 6.11 /proc/vmstat nr_memmap_pages (V_NR_MEMMAP)
Every gate compares major.minor only, so the missing sublevel of Debian's 6.1
`uname -r` ("6.1.0-56-cloud-amd64") never matters for them; kernel_version()
still takes the sublevel from /proc/version ("Debian 6.1.192-2") when uname
has none, and says which it used.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

SECTION_SIZE_X86_64 = 128 * MiB      # SECTION_SIZE_BITS = 27
KPF_OWNER_PRIVATE = 37               # include/uapi/linux/kernel-page-flags.h
KPF_RESERVED = 32

# v5.13 a08a2ae34613 "mm,memory_hotplug: allocate memmap from the added memory range":
# mm/memory_hotplug.c "module_param(memmap_on_memory, bool, 0444)" appears.
V_FEATURE = (5, 13)
# v5.14 hugetlb_free_vmemmap (HVO) arrives and takes precedence over memmap_on_memory
# (Documentation/admin-guide/kernel-parameters.txt, hugetlb_free_vmemmap: "If both
# parameters are enabled, hugetlb_free_vmemmap takes precedence"); v5.19
# mm/memory_hotplug.c memmap_on_memory_set(): "if (hugetlb_optimize_vmemmap_enabled())
# return 0;" before param_set_bool, so the parameter stays N. v6.0 66361095129b "mm:
# memory_hotplug: make hugetlb_optimize_vmemmap compatible with memmap_on_memory"
# removes the hook and adds SetPageVmemmapSelfHosted() (kpageflags bit 37).
V_HVO = (5, 14)
V_HVO_PARAM_HOOK = (5, 19)
V_HVO_COMPAT = (6, 0)
V_KPF_SELF_HOSTED = (6, 0)
V_FORCE = (6, 6)          # "force" mode, memory_block_memmap_on_memory_pages()
V_SPLIT = (6, 8)          # per-block altmaps (multi-block DIMMs)
V_NR_MEMMAP = (6, 11)     # /proc/vmstat nr_memmap_pages


def _mm(version) -> Tuple[int, int]:
    """major.minor: every gate compares these only (a missing sublevel never flips one)."""
    v = tuple(version or (0, 0))
    return (v[0], v[1]) if len(v) >= 2 else (0, 0)


def _human(nbytes: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size} {unit}"
    if nbytes >= MiB:
        return f"{nbytes / MiB:g} MiB"
    return f"{nbytes} bytes"


def parse_release(s: str) -> Tuple[int, int, int]:
    """Leading "X.Y[.Z]" of a uname -r string; anything unparsable is (0, 0, 0)."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", s or "")
    if not m:
        return (0, 0, 0)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


_DEBIAN_VERSION = re.compile(r"\bDebian (\d+)\.(\d+)\.(\d+)")


def kernel_version(release: str, proc_version: str = "") -> Tuple[Tuple[int, int, int], str]:
    """(version, where it came from): uname -r, unless it has no sublevel and /proc/version names Debian's package version.

    Debian's 6.1 ABI names read "6.1.0-56-cloud-amd64" (sublevel always 0);
    the real one is in /proc/version: "... #1 SMP PREEMPT_DYNAMIC Debian
    6.1.192-2 (...)". When neither tells, memhp assumes the sublevel is 0,
    the oldest of the line: no rule memhp applies depends on a sublevel
    (every gate is major.minor, see the module docstring).
    """
    v = parse_release(release)
    if v[2] == 0:
        for m in _DEBIAN_VERSION.finditer(proc_version or ""):   # the compiler's "(Debian 12.2.0-14)" comes first
            if (int(m.group(1)), int(m.group(2))) == v[:2]:
                return (v[0], v[1], int(m.group(3))), "/proc/version (Debian package version)"
        return v, "uname -r (no sublevel known: assumed .0)"
    return v, "uname -r"


# ---------------------------------------------------------------------------
# sizeof(struct page)

_BTF_MAGIC = 0xEB9F
# kind -> (fixed extra bytes, extra bytes per vlen), include/uapi/linux/btf.h
_BTF_KIND_EXTRA = {
    1: (4, 0),    # INT
    2: (0, 0),    # PTR
    3: (12, 0),   # ARRAY
    4: (0, 12),   # STRUCT
    5: (0, 12),   # UNION
    6: (0, 8),    # ENUM
    7: (0, 0),    # FWD
    8: (0, 0),    # TYPEDEF
    9: (0, 0),    # VOLATILE
    10: (0, 0),   # CONST
    11: (0, 0),   # RESTRICT
    12: (0, 0),   # FUNC
    13: (0, 8),   # FUNC_PROTO
    14: (4, 0),   # VAR
    15: (0, 12),  # DATASEC
    16: (0, 0),   # FLOAT
    17: (4, 0),   # DECL_TAG
    18: (0, 0),   # TYPE_TAG
    19: (0, 12),  # ENUM64
}
BTF_KIND_STRUCT = 4


def struct_page_size_from_btf(btf_bytes: bytes, name: str = "page") -> Optional[int]:
    """Size of the BTF STRUCT called `name` in raw BTF (/sys/kernel/btf/vmlinux); None if absent or malformed."""
    data = bytes(btf_bytes or b"")
    if len(data) < 24:
        return None
    for endian in ("<", ">"):
        if struct.unpack(endian + "H", data[:2])[0] == _BTF_MAGIC:
            break
    else:
        return None
    hdr_len, type_off, type_len, str_off, str_len = struct.unpack(endian + "5I", data[4:24])
    types_start = hdr_len + type_off
    types_end = types_start + type_len
    strs_start = hdr_len + str_off
    if types_end > len(data) or strs_start + str_len > len(data):
        return None
    strings = data[strs_start:strs_start + str_len]
    want = name.encode()

    def name_at(off: int) -> bytes:
        if off >= len(strings):
            return b""
        end = strings.find(b"\0", off)
        return strings[off:end if end >= 0 else len(strings)]

    pos = types_start
    while pos + 12 <= types_end:
        name_off, info, size_or_type = struct.unpack(endian + "3I", data[pos:pos + 12])
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        extra = _BTF_KIND_EXTRA.get(kind)
        if extra is None:
            return None   # unknown kind: cannot know its length, stop rather than misparse
        if kind == BTF_KIND_STRUCT and name_at(name_off) == want:
            return size_or_type
        pos += 12 + extra[0] + extra[1] * vlen
    return None


def struct_page_size_from_config(config_text: str) -> int:
    """sizeof(struct page) on x86_64 is 64 with CONFIG_MEMCG=y (memcg_data word), else 56.

    Limits: this is the only config knob that changes it on the kernels memhp
    targets. KMSAN, page_ext, page_owner and PAGE_POOL keep their data outside
    struct page; LAST_CPUPID falls back to page->_last_cpupid only when it
    does not fit in page->flags (not the case on x86_64 defconfig-like builds);
    WANT_PAGE_VIRTUAL is off on x86_64. Prefer BTF when the guest has it.
    """
    for line in (config_text or "").splitlines():
        if line.strip() == "CONFIG_MEMCG=y":
            return 64
    return 56


# ---------------------------------------------------------------------------
# Facts and the decision

@dataclass(frozen=True)
class KernelFacts:
    release: str
    version: Tuple[int, int, int]
    block_size: int
    struct_page_size: int
    struct_page_source: str      # where it was read: "btf" | "config" (the gatherer never assumes one)
    pageblock_order: int
    param: str                   # readback of memory_hotplug.memmap_on_memory: "Y" / "N" / "force"; "" = no such parameter
    page_size: int = 4096
    pmd_size: int = 2 * MiB
    mhp_memmap_config: Optional[bool] = None   # CONFIG_MHP_MEMMAP_ON_MEMORY, None = unknown
    hugetlb_vmemmap: Optional[bool] = None     # HugeTLB vmemmap optimisation on (matters 5.14 .. 5.19); None = unknown
    version_source: str = "uname -r"

    @property
    def param_present(self) -> bool:
        return bool(self.param)

    @property
    def block_pages(self) -> int:
        return self.block_size // self.page_size

    @property
    def pageblock_pages(self) -> int:
        return 1 << self.pageblock_order

    @property
    def pageblock_bytes(self) -> int:
        return self.page_size << self.pageblock_order


def vmemmap_bytes_per_block(facts: KernelFacts) -> int:
    """memmap of one block = block_pages * sizeof(struct page) bytes."""
    return facts.block_pages * facts.struct_page_size


def vmemmap_pages_per_block(facts: KernelFacts) -> int:
    """PFN_UP(block_pages * sizeof(struct page)): pages the memmap of one block needs (no force rounding)."""
    return -(-vmemmap_bytes_per_block(facts) // facts.page_size)


def memmap_on_memory_pages(facts: KernelFacts) -> int:
    """memory_block_memmap_on_memory_pages(): PFN_UP(memmap), rounded up to a pageblock in force mode (6.6+)."""
    n = vmemmap_pages_per_block(facts)
    if facts.param == "force" and _mm(facts.version) >= V_FORCE:
        pb = facts.pageblock_pages
        n = -(-n // pb) * pb
    return n


@dataclass(frozen=True)
class MemmapDecision:
    applies: bool
    vmemmap_pages_per_block: int   # pages reserved at the start of each block (incl. force waste); 0 if not applied
    blocks: int                    # memory blocks the DIMM spans
    reason: str


def param_is_on(facts: KernelFacts) -> bool:
    """The mode is on when the parameter reads Y, or force on 6.6+."""
    return facts.param == "Y" or (facts.param == "force" and _mm(facts.version) >= V_FORCE)


def decide(facts: KernelFacts, dimm_size: int) -> MemmapDecision:
    """Whether hot-adding dimm_size bytes uses memmap_on_memory, per mhp_supports_memmap_on_memory() of that version."""
    bs = facts.block_size
    blocks = dimm_size // bs if bs > 0 else 0
    bs_h = _human(bs)

    def no(reason: str) -> MemmapDecision:
        return MemmapDecision(False, 0, blocks, reason)

    if _mm(facts.version) < V_FEATURE:
        return no(f"feature not present in this kernel ({facts.release}): memory_hotplug.memmap_on_memory "
                  f"arrived in 5.13")
    if facts.mhp_memmap_config is False:
        return no("CONFIG_MHP_MEMMAP_ON_MEMORY is not set")
    if not facts.param_present:
        return no(f"feature not present in this kernel ({facts.release}): it has no "
                  f"memory_hotplug.memmap_on_memory parameter")
    if V_HVO <= _mm(facts.version) < V_HVO_COMPAT and facts.hugetlb_vmemmap:
        return no("the HugeTLB vmemmap optimisation (hugetlb_free_vmemmap) is enabled, and before 6.0 it "
                  "takes precedence over memmap_on_memory")
    if facts.param == "force" and _mm(facts.version) < V_FORCE:
        return no("memory_hotplug.memmap_on_memory is force, which this kernel predates (6.6), so it is off")
    if not param_is_on(facts):
        return no(f"memory_hotplug.memmap_on_memory is {facts.param or 'absent'}")
    if bs <= 0 or dimm_size <= 0 or dimm_size % bs:
        return no(f"DIMM of {_human(dimm_size)} is not a multiple of the {bs_h} block, so the add itself fails")
    if _mm(facts.version) < V_SPLIT and dimm_size != bs:
        return no(f"DIMM spans {blocks} blocks and this kernel predates the per-block split (6.8)")

    vm_bytes = vmemmap_bytes_per_block(facts)
    sps = facts.struct_page_size
    failures: List[str] = []
    if _mm(facts.version) < V_FORCE:
        nr = vm_bytes // facts.page_size
        if vm_bytes % facts.pmd_size:
            failures.append(f"struct page is {sps} bytes, so the vmemmap of a {bs_h} block "
                            f"({_human(vm_bytes)}) is not PMD-aligned")
        rest = bs - vm_bytes
        if rest % facts.pageblock_bytes:
            failures.append(f"pageblock order is {facts.pageblock_order} ({_human(facts.pageblock_bytes)}), "
                            f"so the {_human(rest)} after the vmemmap is not pageblock-aligned")
    else:
        nr = memmap_on_memory_pages(facts)
        if vm_bytes % facts.page_size:
            failures.append(f"the vmemmap of a {bs_h} block ({vm_bytes} bytes) is not a whole number of pages")
        if nr % facts.pageblock_pages:
            failures.append(f"pageblock order is {facts.pageblock_order} ({_human(facts.pageblock_bytes)}), "
                            f"so a {nr}-page vmemmap is not pageblock-aligned (force mode would pad it)")
        if nr >= facts.block_pages:
            failures.append(f"the vmemmap ({nr} pages) would fill the whole block")
        if vm_bytes % facts.pmd_size:
            failures.append(f"struct page is {sps} bytes, so the vmemmap of a {bs_h} block "
                            f"({_human(vm_bytes)}) is not PMD-aligned")
    if failures:
        return no("; ".join(failures))

    waste = nr - vmemmap_pages_per_block(facts)
    extra = f", {waste} of them padding from force mode" if waste else ""
    if blocks == 1:
        what = f"the {bs_h} block hosts its own {nr}-page ({_human(nr * facts.page_size)}) vmemmap{extra}"
    else:
        what = f"each of the {blocks} {bs_h} blocks hosts its own {nr}-page ({_human(nr * facts.page_size)}) vmemmap{extra}"
    return MemmapDecision(True, nr, blocks, "applies: " + what)


def feature_unavailable(facts: KernelFacts) -> Optional[str]:
    """Why memmap_on_memory can never apply on this kernel, whatever the DIMM and the parameter; None when it can.

    decide() for a one-block DIMM with the parameter taken as on: what still
    refuses it is the kernel itself (no such parameter, the config, struct
    page size, pageblock order, HVO before 6.0).
    """
    f = facts if param_is_on(facts) or not facts.param_present else replace(facts, param="Y")
    d = decide(f, facts.block_size)
    return None if d.applies else d.reason


def _kstrtobool(w: str) -> Optional[bool]:
    """lib/kstrtox.c kstrtobool(): first character y/Y/t/T/1 true, n/N/f/F/0 false, o/O then n/N true, f/F false."""
    c = w[:1]
    if c in ("y", "Y", "t", "T", "1"):
        return True
    if c in ("n", "N", "f", "F", "0"):
        return False
    if c in ("o", "O") and w[1:2] in ("n", "N"):
        return True
    if c in ("o", "O") and w[1:2] in ("f", "F"):
        return False
    return None


def expected_param_readback(version: Tuple[int, int, int], written: str,
                            hugetlb_vmemmap: Optional[bool] = None) -> str:
    """What memory_hotplug.memmap_on_memory reads back after booting with it set to `written` ("" = no such parameter).

    Before 5.13 the parameter does not exist. 5.13 .. 6.5: a bool
    (param_set_bool -> kstrtobool, lib/kstrtox.c: first character y/Y/t/T/1
    true, n/N/f/F/0 false, "on"/"off"), so "force" and "Force" read N; 5.19
    with HVO on: memmap_on_memory_set() returns before setting it, so N.
    6.6+ set_memmap_mode(): exactly sysfs_streq "force" or "FORCE" reads
    "force"; anything else ("Force" included) goes through kstrtobool.
    An unrecognised value is rejected and the default, N, stays.
    """
    mm = _mm(version)
    if mm < V_FEATURE:
        return ""
    w = (written or "").strip()
    if mm >= V_FORCE and w in ("force", "FORCE"):
        return "force"
    if V_HVO_PARAM_HOOK <= mm < V_HVO_COMPAT and hugetlb_vmemmap:
        return "N"
    return "Y" if _kstrtobool(w) else "N"


# ---------------------------------------------------------------------------
# Deltas

def online_deltas(facts: KernelFacts, decision: MemmapDecision, blocks_onlined: int) -> Dict[str, int]:
    """Per onlined block: spanned/present += block_pages, managed += block_pages - vmemmap pages, MemTotal += managed in kB."""
    bp = facts.block_pages
    vm = decision.vmemmap_pages_per_block if decision.applies else 0
    managed = blocks_onlined * (bp - vm)
    return {
        "spanned": blocks_onlined * bp,
        "present": blocks_onlined * bp,
        "managed": managed,
        "MemTotal": managed * facts.page_size // KiB,
    }


def offline_deltas(facts: KernelFacts, decision: MemmapDecision, blocks_offlined: int) -> Dict[str, int]:
    """Offlining reverses online_deltas exactly."""
    return {k: -v for k, v in online_deltas(facts, decision, blocks_offlined).items()}


def add_time_memfree_cost_kb(facts: KernelFacts, decision: MemmapDecision, dimm_size: int) -> int:
    """kB of existing memory the memmap takes at hot-add: 0 when self-hosted, else blocks * memmap bytes / 1024.

    The memmap alone; what else a hot-add allocates is bounded in
    add_time_free_drop_bounds_kb.
    """
    if decision.applies:
        return 0
    blocks = dimm_size // facts.block_size if facts.block_size else 0
    return blocks * vmemmap_bytes_per_block(facts) // KiB


def nr_memmap_pages_delta(facts: KernelFacts, blocks: int) -> Optional[int]:
    """6.11+: nr_memmap_pages += PFN_UP(section_pages * sizeof(struct page)) per hot-added section, self-hosted or not.

    Source: mm/sparse.c section_activate() calls memmap_pages_add(
    DIV_ROUND_UP(nr_pages * sizeof(struct page), PAGE_SIZE)) for every
    hot-added section and section_deactivate() subtracts it (6.12, after
    "mm: fix accounting of memmap pages"; in 6.11 the same number was added
    in mm/sparse-vmemmap.c __populate_section_memmap()). Neither looks at the
    altmap, so the counter rises by the memmap size whether or not
    memmap_on_memory applies. page_ext tables (only when page_owner and the
    like are enabled) would add to it. None before 6.11.
    """
    if _mm(facts.version) < V_NR_MEMMAP:
        return None
    section = min(SECTION_SIZE_X86_64, facts.block_size)
    sections_per_block = facts.block_size // section
    per_section = -(-(section // facts.page_size) * facts.struct_page_size // facts.page_size)
    return blocks * sections_per_block * per_section


def block_ids(addr: int, size: int, block_size: int) -> List[int]:
    """Block N covers [N*block_size, (N+1)*block_size): the ids a range [addr, addr+size) touches."""
    if block_size <= 0 or size <= 0:
        return []
    first = addr // block_size
    last = (addr + size - 1) // block_size
    return list(range(first, last + 1))


def vmemmap_pfns(facts: KernelFacts, decision: MemmapDecision, block_id: int) -> range:
    """PFNs at the start of a block that hold its self-hosted vmemmap (empty when not applied)."""
    start = block_id * facts.block_pages
    n = decision.vmemmap_pages_per_block if decision.applies else 0
    return range(start, start + n)


def expect_owner_private(facts: KernelFacts, decision: MemmapDecision) -> Optional[bool]:
    """kpageflags bit 37 (OWNER_PRIVATE = PageVmemmapSelfHosted) marks the vmemmap pages of an online block iff the feature applied (6.0+; None = not judged before).

    Source: mm/memory_hotplug.c mhp_init_memmap_on_memory() calls
    SetPageVmemmapSelfHosted() on every one of the nr_vmemmap_pages (force
    padding included), since v6.0 (66361095129b); fs/proc/page.c exports
    PG_owner_priv_1 as KPF_OWNER_PRIVATE. Before 6.0 the pages are only
    PageReserved, so bit 37 says nothing there. 6.1 also left them
    PageReserved (KPF_RESERVED, bit 32: 0x2100000000); 6.12 no longer
    reserves them (0x2000000000). So test bit 37 only.
    """
    if _mm(facts.version) < V_KPF_SELF_HOSTED:
        return None
    return decision.applies


# ---------------------------------------------------------------------------
# Added for the scenario suite (hot-add cost with per-cpu lists, online policies)

# Noise floor of MemFree + per-cpu free lists (leakcheck.free_kb) on an idle guest, measured and
# recomputed by scripts/measure-noise-floor.py (a guest per Debian kernel booted as hot_add boots
# it, settled, then 30 reads 2 s apart). Measured 2026-11-26 on the 2-core TCG host (loaded):
#   debian:6.1  (6.1.0-56):   largest step between consecutive reads 96 kB, spread 176 kB
#   debian:6.12 (6.12.117):   largest step 80 kB, spread 120 kB
# FREE_NOISE_KB is the largest spread (176 kB) rounded up to a power of two: 256 kB. The band
# allows three times that on each side (the hot-add's reads are not idle: SSH, udev, sysfs).
FREE_NOISE_KB = 256
# Besides the memmap, a hot-add allocates per memory block a struct memory_block with its
# device, kobject and about a dozen sysfs attribute nodes, and the section's
# mem_section_usage (drivers/base/memory.c add_memory_block(), mm/sparse.c
# section_activate()): well under 4 pages; and per DIMM at most one page-table page for the
# direct map and one for the vmemmap mapping (arch/x86/mm/init_64.c: one PMD table maps
# 1 GiB, and the vmemmap of 1 GiB needs 16 MiB, i.e. 8 PMD entries).
PER_BLOCK_OVERHEAD_KB = 16
PER_DIMM_PAGE_TABLES_KB = 8


def add_time_free_drop_bounds_kb(facts: KernelFacts, decision: MemmapDecision, dimm_size: int) -> Tuple[int, int]:
    """Band for the drop of MemFree + per-cpu free lists at hot-add: [memmap - 3 * noise, memmap + blocks * 16 kB + 8 kB + 3 * noise], noise = 256 kB (idle spread measured by scripts/measure-noise-floor.py: 176 kB on 6.1, 120 kB on 6.12).

    Why per-cpu lists: NR_FREE_PAGES (MemFree) does not count pages parked on
    the per-cpu free lists (mm/page_alloc.c free_unref_page_commit() adds
    1 << order to pcp->count, not to NR_FREE_PAGES; /proc/zoneinfo prints
    pcp->count as "count:" per cpu). Per-cpu lists also hold pageblock-order
    pages, so a hot-add can take its 2 MiB memmap from a per-cpu list and
    leave MemFree flat: MemFree alone swings by whole memmaps, MemFree +
    sum(count) * PAGE_SIZE does not. Above the memmap come the per-block
    structures and page tables (PER_BLOCK_OVERHEAD_KB, PER_DIMM_PAGE_TABLES_KB,
    derived above); on both sides 3 * FREE_NOISE_KB, the measured noise floor
    (256 kB >= the largest idle spread scripts/measure-noise-floor.py measured:
    176 kB on 6.1, 120 kB on 6.12; largest step 96 / 80 kB; see FREE_NOISE_KB).
    """
    cost = add_time_memfree_cost_kb(facts, decision, dimm_size)
    blocks = dimm_size // facts.block_size if facts.block_size else 0
    noise = 3 * FREE_NOISE_KB
    return (cost - noise, cost + blocks * PER_BLOCK_OVERHEAD_KB + PER_DIMM_PAGE_TABLES_KB + noise)


def cycle_free_return_bounds_kb() -> Tuple[int, int]:
    """Band for free memory (MemFree + per-cpu free lists) after a whole add/online/offline/remove cycle against before it: [-3 * noise, 3 * noise], noise = 256 kB.

    Everything the cycle allocated from boot RAM is freed by its end (the memmap by
    depopulate_section_memmap(), the per-block structures by remove_memory_block_devices(),
    a node's kswapd/kcompactd and zone pagesets when its last block goes offline), once the
    node has been brought up before (once-only node structures stay). What remains is the
    read-to-read noise on both sides; a memmap never freed leaves a whole memmap (2 MiB per
    128 MiB block with a 64-byte struct page) below the band."""
    noise = 3 * FREE_NOISE_KB
    return (-noise, noise)


AUTO_ONLINE_POLICIES = ("offline", "online", "online_kernel", "online_movable")


def auto_online_zone(policy: str) -> Optional[str]:
    """Zone a hot-added block lands in under memhp_default_state=policy: online/online_kernel -> Normal, online_movable -> Movable, offline -> None.

    Source: mm/memory_hotplug.c zone_for_pfn_range(): MMOP_ONLINE_KERNEL takes
    default_kernel_zone_for_pfn() (ZONE_NORMAL on x86_64 above 4 GiB),
    MMOP_ONLINE_MOVABLE takes ZONE_MOVABLE, and MMOP_ONLINE takes
    default_zone_for_pfn(), which picks the kernel zone unless the range
    intersects only ZONE_MOVABLE or movable_node is set. Assumes the default
    memory_hotplug.online_policy (contig-zones, 5.15+), no movable_node and
    no Movable zone already spanning the block, as in a fresh guest whose
    hot-plug area lies above all boot RAM. auto_online_blocks reads back the
    policy name (online_type_to_str[]).
    """
    if policy not in AUTO_ONLINE_POLICIES:
        raise ValueError(f"memhp_default_state must be one of {', '.join(AUTO_ONLINE_POLICIES)}, not {policy!r}")
    return {"offline": None, "online": "Normal", "online_kernel": "Normal", "online_movable": "Movable"}[policy]


# ===========================================================================
# virtio-mem (issue 15): a second way memory is hot-plugged, with its own memmap rule.
#
# Source, read in both Debian trees:
#   linux-source-6.1 (6.1.192) drivers/virtio/virtio_mem.c:647-648
#   linux-source-6.12 (6.12.117) drivers/virtio/virtio_mem.c:654-655
#       rc = add_memory_driver_managed(vm->mgid, addr, size, vm->resource_name,
#                                      MHP_MERGE_RESOURCE | MHP_NID_IS_MGID);
# No MHP_MEMMAP_ON_MEMORY anywhere in drivers/virtio/ of either tree, and mm/memory_hotplug.c
# add_memory_resource() only sets up an altmap when that flag is passed: a virtio-mem block's
# memmap always comes from memory already online, whatever memory_hotplug.memmap_on_memory says.
# Sub-blocks the device has not plugged stay "fake offline" inside an online block: onlining
# gives only the plugged ones to the buddy (virtio_mem_online_page_cb), and unplugging from an
# online block takes pages with alloc_contig_range() and lowers managed by the same count
# (virtio_mem_fake_offline(): adjust_managed_page_count(..., -nr_pages), 6.12 line 1255).

VIRTIO_MEM_ADD_SOURCE = {
    (6, 1): "linux-source-6.1 drivers/virtio/virtio_mem.c:647-648",
    (6, 12): "linux-source-6.12 drivers/virtio/virtio_mem.c:654-655",
}
VIRTIO_MEM_ADD_FLAGS = ("MHP_MERGE_RESOURCE", "MHP_NID_IS_MGID")


def virtio_mem_rule(facts: KernelFacts) -> str:
    """The one-line rule for a virtio-mem block's memmap on this kernel, with the source cited."""
    src = VIRTIO_MEM_ADD_SOURCE.get(_mm(facts.version))
    where = src or ("read in 6.1 and 6.12 (" + "; ".join(VIRTIO_MEM_ADD_SOURCE.values()) + ")")
    return (f"virtio-mem adds memory with add_memory_driver_managed(..., {' | '.join(VIRTIO_MEM_ADD_FLAGS)}) "
            f"and no MHP_MEMMAP_ON_MEMORY ({where}), so its memmap comes from existing memory whatever "
            f"memory_hotplug.memmap_on_memory is ({facts.param or 'absent'})")


def virtio_mem_decision(facts: KernelFacts, plugged: int) -> MemmapDecision:
    """MemmapDecision for virtio-mem memory: never self-hosted (no MHP_MEMMAP_ON_MEMORY in 6.1 and 6.12)."""
    blocks = -(-plugged // facts.block_size) if facts.block_size > 0 and plugged > 0 else 0
    return MemmapDecision(False, 0, blocks, virtio_mem_rule(facts))


def virtio_mem_blocks(addr: int, plugged: int, block_size: int) -> List[int]:
    """Memory blocks a virtio-mem device that grew from 0 to `plugged` bytes has added: it plugs from its start
    address upwards and adds a whole memory block before plugging into it, so ceil(plugged / block) blocks."""
    if plugged <= 0 or block_size <= 0:
        return []
    return block_ids(addr, -(-plugged // block_size) * block_size, block_size)


def virtio_mem_online_deltas(facts: KernelFacts, blocks_onlined: int, plugged_in_them: int) -> Dict[str, int]:
    """Onlining virtio-mem blocks: spanned/present += block_pages each, managed += the plugged pages only (no vmemmap kept out), MemTotal += managed in kB."""
    bp = facts.block_pages
    managed = plugged_in_them // facts.page_size
    return {"spanned": blocks_onlined * bp, "present": blocks_onlined * bp, "managed": managed,
            "MemTotal": managed * facts.page_size // KiB}


def virtio_mem_unplug_managed_delta(facts: KernelFacts, unplugged: int) -> int:
    """Unplugging sub-blocks of an online block: managed -= the unplugged pages exactly; spanned and present stay."""
    return -(unplugged // facts.page_size)


def virtio_mem_memmap_cost_kb(facts: KernelFacts, blocks: int) -> int:
    """kB of existing memory the memmap of `blocks` virtio-mem blocks takes at plug: all of it, never self-hosted."""
    return blocks * vmemmap_bytes_per_block(facts) // KiB


# Sub-blocks a virtio-mem device has not plugged, inside an online memory block, are "fake
# offline": virtio_mem_set_fake_offline() __SetPageOffline()s every page (6.1
# drivers/virtio/virtio_mem.c:1091, 6.12 :1157), and /proc/kpageflags reports PageOffline as
# KPF_OFFLINE (include/uapi/linux/kernel-page-flags.h:35; fs/proc/page.c 6.1:177, 6.12:170).
KPF_OFFLINE = 23


def virtio_mem_unplugged_subblocks(words: List[int], pages_per_subblock: int) -> List[int]:
    """Indices of the sub-blocks of one online block whose every page has KPF_OFFLINE (fake-offline, unplugged). Pure.

    A sub-block with only some pages offline is not counted: the driver
    fake-offlines whole sub-blocks, so that would show as a mismatch.
    """
    out = []
    for i in range(0, len(words) // pages_per_subblock):
        chunk = words[i * pages_per_subblock:(i + 1) * pages_per_subblock]
        if chunk and all(w >> KPF_OFFLINE & 1 for w in chunk):
            out.append(i)
    return out
