"""First-principles arithmetic: every case the product cares about, each computed, not looked up."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import pytest

from harness.memory import expect as E
from harness.memory.expect import GiB, MiB

V61, V66, V68, V612 = (6, 1, 176), (6, 6, 0), (6, 8, 0), (6, 12, 117)


def facts(version=V612, block=128 * MiB, sps=64, order=9, param="Y", config=True, hugetlb_vmemmap=None):
    return E.KernelFacts(release="%d.%d.%d" % version, version=version, block_size=block,
                         struct_page_size=sps, struct_page_source="btf", pageblock_order=order,
                         param=param, mhp_memmap_config=config, hugetlb_vmemmap=hugetlb_vmemmap)


# --- parse_release -----------------------------------------------------------

@pytest.mark.parametrize("s,want", [
    ("6.12.117+deb12-cloud-amd64", (6, 12, 117)), ("6.1.0-56-cloud-amd64", (6, 1, 0)),
    ("6.1.192", (6, 1, 192)), ("6.8", (6, 8, 0)), ("6.18.44-fc-v509", (6, 18, 44)),
    ("6.12.0-rc3", (6, 12, 0)), ("junk", (0, 0, 0)), ("", (0, 0, 0)), (None, (0, 0, 0)),
])
def test_parse_release(s, want):
    assert E.parse_release(s) == want


# --- BTF ---------------------------------------------------------------------

def _btf(types, strings: bytes, endian="<") -> bytes:
    """Encode raw BTF: header, then a type section of (name_off, kind, vlen, size, extra) and strings."""
    body = b""
    for name_off, kind, vlen, size, extra in types:
        body += struct.pack(endian + "3I", name_off, (kind << 24) | vlen, size) + extra
    hdr = struct.pack(endian + "HBB5I", 0xEB9F, 1, 0, 24, 0, len(body), len(body), len(strings))
    return hdr + body + strings


STRS = b"\0int\0page\0x\0pages\0f\0"   # offsets: int=1 page=5 x=10 pages=12 f=18


def test_btf_int_then_struct_page():
    blob = _btf([(1, 1, 0, 4, struct.pack("<I", 32)),
                 (5, 4, 1, 64, struct.pack("<3I", 10, 1, 0))], STRS)
    assert E.struct_page_size_from_btf(blob) == 64


def test_btf_skips_every_kind_correctly():
    # One of each kind with vlen 2 where it matters, before "page": any wrong
    # trailing size shifts the cursor and the struct is never found.
    v = 2
    types = [
        (1, 1, 0, 4, b"\0" * 4),            # INT
        (0, 2, 0, 1, b""),                  # PTR
        (0, 3, 0, 0, b"\0" * 12),           # ARRAY
        (12, 4, v, 56, b"\0" * 12 * v),     # STRUCT "pages" (not "page")
        (0, 5, v, 8, b"\0" * 12 * v),       # UNION
        (0, 6, v, 4, b"\0" * 8 * v),        # ENUM
        (5, 7, 0, 0, b""),                  # FWD "page": not a STRUCT, ignored
        (0, 8, 0, 1, b""), (0, 9, 0, 1, b""), (0, 10, 0, 1, b""), (0, 11, 0, 1, b""),
        (18, 12, 0, 13, b""),               # FUNC
        (0, 13, v, 1, b"\0" * 8 * v),       # FUNC_PROTO
        (10, 14, 0, 1, b"\0" * 4),          # VAR
        (0, 15, v, 0, b"\0" * 12 * v),      # DATASEC
        (0, 16, 0, 8, b""),                 # FLOAT
        (0, 17, 0, 1, b"\0" * 4),           # DECL_TAG
        (0, 18, 0, 1, b""),                 # TYPE_TAG
        (0, 19, v, 8, b"\0" * 12 * v),      # ENUM64
        (5, 4, 0, 72, b""),                 # STRUCT "page"
    ]
    assert E.struct_page_size_from_btf(_btf(types, STRS)) == 72


def test_btf_big_endian_and_bad_input():
    blob = _btf([(5, 4, 0, 56, b"")], STRS, endian=">")
    assert E.struct_page_size_from_btf(blob) == 56
    assert E.struct_page_size_from_btf(b"") is None
    assert E.struct_page_size_from_btf(b"\x00" * 64) is None
    assert E.struct_page_size_from_btf(_btf([(1, 1, 0, 4, b"\0" * 4)], STRS)) is None   # no struct page
    assert E.struct_page_size_from_btf(_btf([(0, 31, 0, 0, b""), (5, 4, 0, 64, b"")], STRS)) is None
    good = _btf([(5, 4, 0, 64, b"")], STRS)
    assert E.struct_page_size_from_btf(good[:30]) is None   # truncated


@pytest.mark.skipif(not os.access("/sys/kernel/btf/vmlinux", os.R_OK), reason="host has no BTF")
def test_btf_of_this_host():
    size = E.struct_page_size_from_btf(Path("/sys/kernel/btf/vmlinux").read_bytes())
    want = 64
    if os.path.exists("/proc/config.gz"):
        want = E.struct_page_size_from_config(gzip.open("/proc/config.gz", "rt").read())
    assert size == want


def test_struct_page_size_from_config():
    assert E.struct_page_size_from_config("CONFIG_X=y\nCONFIG_MEMCG=y\n") == 64
    assert E.struct_page_size_from_config("# CONFIG_MEMCG is not set\n") == 56
    assert E.struct_page_size_from_config("CONFIG_MEMCG_KMEM=y\n") == 56
    assert E.struct_page_size_from_config("") == 56


# --- arithmetic ----------------------------------------------------------------

@pytest.mark.parametrize("block,sps,pages", [(128 * MiB, 64, 512), (128 * MiB, 56, 448),
                                             (2 * GiB, 64, 8192), (1 * GiB, 64, 4096)])
def test_vmemmap_pages_per_block(block, sps, pages):
    assert E.vmemmap_pages_per_block(facts(block=block, sps=sps)) == pages


def test_vmemmap_pages_rounds_up():
    f = E.KernelFacts("x", V612, 128 * MiB, 60, "assumed", 9, "Y")  # 32768*60 = 480 pages exactly
    assert E.vmemmap_pages_per_block(f) == 480
    f = E.KernelFacts("x", V612, 2 * MiB, 60, "assumed", 9, "Y")    # 512*60/4096 = 7.5 -> 8
    assert E.vmemmap_pages_per_block(f) == 8


@pytest.mark.parametrize("addr,size,bs,want", [
    (0x100000000, 128 * MiB, 128 * MiB, [32]),
    (0x100000000, 1 * GiB, 128 * MiB, list(range(32, 40))),
    (0x108000000, 256 * MiB, 128 * MiB, [33, 34]),
    (0x100000000, 2 * GiB, 2 * GiB, [2]),
    (0, 0, 128 * MiB, []), (0, 1, 0, []),
])
def test_block_ids(addr, size, bs, want):
    assert E.block_ids(addr, size, bs) == want


# --- decide ------------------------------------------------------------------

def test_6_1_128m_applies():
    d = E.decide(facts(V61), 128 * MiB)
    assert d == E.MemmapDecision(True, 512, 1, d.reason)
    assert d.reason.startswith("applies: ") and "512-page (2 MiB)" in d.reason


def test_6_1_1g_does_not_apply():
    d = E.decide(facts(V61), 1 * GiB)
    assert not d.applies and d.blocks == 8 and d.vmemmap_pages_per_block == 0
    assert d.reason == "DIMM spans 8 blocks and this kernel predates the per-block split (6.8)"


def test_6_12_1g_applies_per_block():
    d = E.decide(facts(V612), 1 * GiB)
    assert d.applies and d.blocks == 8 and d.vmemmap_pages_per_block == 512
    assert "each of the 8 128 MiB blocks" in d.reason


def test_6_8_is_where_the_split_starts():
    assert E.decide(facts((6, 7, 12)), 256 * MiB).applies is False
    assert E.decide(facts(V68), 256 * MiB).applies is True


@pytest.mark.parametrize("version", [V61, V66, V612])
def test_param_n(version):
    d = E.decide(facts(version, param="N"), 128 * MiB)
    assert not d.applies and d.reason == "memory_hotplug.memmap_on_memory is N"


def test_config_off():
    d = E.decide(facts(config=False), 128 * MiB)
    assert not d.applies and "CONFIG_MHP_MEMMAP_ON_MEMORY" in d.reason


@pytest.mark.parametrize("version", [V61, V612])
def test_struct_page_56_never_applies(version):
    for param in ("Y", "force"):
        d = E.decide(facts(version, sps=56, param=param), 128 * MiB)
        assert not d.applies
    d = E.decide(facts(version, sps=56), 128 * MiB)
    assert "struct page is 56 bytes, so the vmemmap of a 128 MiB block" in d.reason
    assert "not PMD-aligned" in d.reason


def test_pageblock_order_10_on_6_1():
    d = E.decide(facts(V61, order=10), 128 * MiB)
    assert not d.applies
    assert d.reason == ("pageblock order is 10 (4 MiB), so the 126 MiB after the vmemmap "
                        "is not pageblock-aligned")


def test_pageblock_order_10_on_6_12_y_vs_force():
    d = E.decide(facts(V612, order=10, param="Y"), 128 * MiB)
    assert not d.applies and "pageblock order is 10 (4 MiB)" in d.reason
    d = E.decide(facts(V612, order=10, param="force"), 128 * MiB)
    assert d.applies and d.vmemmap_pages_per_block == 1024        # 512 padded to one 1024-page pageblock
    assert "512 of them padding from force mode" in d.reason


def test_force_on_6_1_is_off():
    d = E.decide(facts(V61, param="force"), 128 * MiB)
    assert not d.applies and "predates (6.6)" in d.reason


def test_force_on_6_6_with_aligned_vmemmap_adds_no_padding():
    d = E.decide(facts(V66, param="force"), 128 * MiB)
    assert d.applies and d.vmemmap_pages_per_block == 512
    assert not E.decide(facts(V66, param="force"), 256 * MiB).applies   # 6.6 still one block only


def test_2g_blocks():
    f = facts(V612, block=2 * GiB)
    assert f.block_pages == 524288
    assert E.vmemmap_bytes_per_block(f) == 32 * MiB
    d = E.decide(f, 2 * GiB)
    assert d.applies and d.vmemmap_pages_per_block == 8192 and d.blocks == 1
    assert E.decide(facts(V61, block=2 * GiB), 2 * GiB).applies
    assert not E.decide(f, 1 * GiB).applies      # not a block multiple


def test_unaligned_dimm_is_refused():
    d = E.decide(facts(V612), 192 * MiB)
    assert not d.applies and "not a multiple of the 128 MiB block" in d.reason


# --- param readback -------------------------------------------------------------

@pytest.mark.parametrize("written,v61,v612", [
    ("1", "Y", "Y"), ("y", "Y", "Y"), ("Y", "Y", "Y"), ("on", "Y", "Y"), ("true", "Y", "Y"),
    ("0", "N", "N"), ("n", "N", "N"), ("off", "N", "N"), ("N", "N", "N"),
    ("force", "N", "force"), ("FORCE", "N", "force"), ("bogus", "N", "N"), ("", "N", "N"),
])
def test_expected_param_readback(written, v61, v612):
    assert E.expected_param_readback(V61, written) == v61
    assert E.expected_param_readback(V612, written) == v612


def test_force_readback_boundary_is_6_6():
    assert E.expected_param_readback((6, 5, 13), "force") == "N"
    assert E.expected_param_readback(V66, "force") == "force"


# --- deltas ------------------------------------------------------------------

def test_online_deltas_with_feature():
    f = facts(V61)
    d = E.decide(f, 128 * MiB)
    assert E.online_deltas(f, d, 1) == {"spanned": 32768, "present": 32768, "managed": 32256,
                                        "MemTotal": 129024}
    assert E.offline_deltas(f, d, 1) == {"spanned": -32768, "present": -32768, "managed": -32256,
                                         "MemTotal": -129024}


def test_online_deltas_without_feature():
    f = facts(V61, param="N")
    d = E.decide(f, 128 * MiB)
    assert E.online_deltas(f, d, 1)["managed"] == 32768
    assert E.online_deltas(f, d, 1)["MemTotal"] == 131072


def test_online_deltas_6_12_1g():
    f = facts(V612)
    d = E.decide(f, 1 * GiB)
    out = E.online_deltas(f, d, 8)
    assert out["present"] == 262144 and out["managed"] == 258048


def test_online_deltas_force_padding_is_not_managed():
    f = facts(V612, order=10, param="force")
    assert E.online_deltas(f, E.decide(f, 128 * MiB), 1)["managed"] == 32768 - 1024


def test_add_time_memfree_cost():
    on = facts(V61)
    assert E.add_time_memfree_cost_kb(on, E.decide(on, 128 * MiB), 128 * MiB) == 0
    off = facts(V61, param="N")
    assert E.add_time_memfree_cost_kb(off, E.decide(off, 128 * MiB), 128 * MiB) == 2048
    one_g = E.decide(on, 1 * GiB)     # 6.1, 1 GiB: not applicable, 8 blocks of 2 MiB memmap
    assert E.add_time_memfree_cost_kb(on, one_g, 1 * GiB) == 16384


def test_nr_memmap_pages_delta():
    assert E.nr_memmap_pages_delta(facts(V61), 1) is None
    assert E.nr_memmap_pages_delta(facts((6, 10, 0)), 1) is None
    assert E.nr_memmap_pages_delta(facts((6, 11, 0)), 1) == 512
    assert E.nr_memmap_pages_delta(facts(V612), 8) == 4096
    assert E.nr_memmap_pages_delta(facts(V612, param="N"), 1) == 512   # counted with or without the feature
    assert E.nr_memmap_pages_delta(facts(V612, block=2 * GiB), 1) == 8192
    assert E.nr_memmap_pages_delta(facts(V612, sps=56), 1) == 448


def test_kpageflags_expectations():
    f = facts(V612)
    d = E.decide(f, 128 * MiB)
    assert E.vmemmap_pfns(f, d, 32) == range(32 * 32768, 32 * 32768 + 512)
    assert E.expect_owner_private(f, d) is True
    off = E.decide(facts(V612, param="N"), 128 * MiB)
    assert E.vmemmap_pfns(f, off, 32) == range(32 * 32768, 32 * 32768)
    assert E.expect_owner_private(f, off) is False


# --- scenario-suite additions ------------------------------------------------

def test_add_time_free_drop_bounds_tell_on_from_off():
    on, off = facts(V61), facts(V61, param="N")
    noise = 3 * E.FREE_NOISE_KB
    extra = E.PER_BLOCK_OVERHEAD_KB + E.PER_DIMM_PAGE_TABLES_KB
    memmap = 32768 * 64 // 1024                    # one block's memmap in kB, from its definition
    assert E.add_time_free_drop_bounds_kb(on, E.decide(on, 128 * MiB), 128 * MiB) == (-noise, extra + noise)
    lo_off, hi_off = E.add_time_free_drop_bounds_kb(off, E.decide(off, 128 * MiB), 128 * MiB)
    assert (lo_off, hi_off) == (memmap - noise, memmap + extra + noise)
    assert extra + noise < lo_off                  # on and off can be told apart
    one_g = E.decide(on, 1 * GiB)                  # 6.1: 8 blocks of memmap from existing RAM
    assert E.add_time_free_drop_bounds_kb(on, one_g, 1 * GiB) == (
        8 * memmap - noise, 8 * memmap + 8 * E.PER_BLOCK_OVERHEAD_KB + E.PER_DIMM_PAGE_TABLES_KB + noise)
    on612 = facts(V612)                            # 6.12: the same DIMM self-hosts, flat again
    lo, hi = E.add_time_free_drop_bounds_kb(on612, E.decide(on612, 1 * GiB), 1 * GiB)
    assert lo < 0 < hi < memmap


def test_cycle_free_return_band_is_noise_only_and_catches_one_unfreed_memmap():
    lo, hi = E.cycle_free_return_bounds_kb()
    assert (lo, hi) == (-3 * E.FREE_NOISE_KB, 3 * E.FREE_NOISE_KB)
    memmap = 32768 * 64 // 1024                    # one 128 MiB block's memmap never freed: 2048 kB short
    assert not lo <= -memmap <= hi and lo <= 0 <= hi


def test_no_fitted_band_and_no_aliases():
    """The 2x band "fitted to what a real guest showed" and the alias of KPF_OWNER_PRIVATE are gone."""
    assert not hasattr(E, "add_time_memfree_bounds_kb")
    assert not hasattr(E, "kpageflags_owner_private_bit")


@pytest.mark.parametrize("policy,zone", [("offline", None), ("online", "Normal"),
                                         ("online_kernel", "Normal"), ("online_movable", "Movable")])
def test_auto_online_zone(policy, zone):
    assert E.auto_online_zone(policy) == zone


def test_auto_online_zone_rejects_unknown_policy():
    with pytest.raises(ValueError, match="online_movable"):
        E.auto_online_zone("movable")


# --- version gates: one test per kernel line, each citing the source it encodes --------------

def _gates(version, **kw):
    f = facts(version, **kw)
    return {"feature": E.feature_unavailable(f),
            "1block": E.decide(f, 128 * MiB).applies,
            "2blocks": E.decide(f, 256 * MiB).applies,
            "force": E.expected_param_readback(version, "force"),
            "Force": E.expected_param_readback(version, "Force"),
            "bit37": E.expect_owner_private(f, E.decide(f, 128 * MiB)),
            "nr_memmap": E.nr_memmap_pages_delta(f, 1)}


def test_gate_5_10_has_no_feature():
    # v5.10 mm/memory_hotplug.c: no memmap_on_memory at all (it arrives with a08a2ae34613 in v5.13).
    g = _gates((5, 10, 0), param="")
    assert g["feature"].startswith("feature not present in this kernel") and "5.13" in g["feature"]
    assert not g["1block"] and g["force"] == "" and E.expected_param_readback((5, 10, 0), "1") == ""
    assert g["bit37"] is None and g["nr_memmap"] is None


def test_gate_5_15_bool_param_one_block_hvo_takes_precedence():
    # v5.15 mm/memory_hotplug.c: "module_param(memmap_on_memory, bool, 0444)" (param_set_bool ->
    # kstrtobool) and mhp_supports_memmap_on_memory(): "size == memory_block_size_bytes()";
    # kernel-parameters.txt hugetlb_free_vmemmap: "hugetlb_free_vmemmap takes precedence".
    g = _gates((5, 15, 0))
    assert g["feature"] is None and g["1block"] and not g["2blocks"]
    assert g["force"] == "N" and g["Force"] == "N"       # kstrtobool: leading f/F is false
    assert g["bit37"] is None                            # SetPageVmemmapSelfHosted() is 6.0
    hvo = facts((5, 15, 0), hugetlb_vmemmap=True)
    assert "HugeTLB vmemmap optimisation" in E.feature_unavailable(hvo)
    assert E.expected_param_readback((5, 15, 0), "1", hugetlb_vmemmap=True) == "Y"   # no set hook before 5.19
    assert E.expected_param_readback((5, 19, 0), "1", hugetlb_vmemmap=True) == "N"   # 5.19 memmap_on_memory_set()


def test_gate_6_0_bit37_and_hvo_compatible():
    # v6.0 66361095129b: mhp_init_memmap_on_memory() "SetPageVmemmapSelfHosted(pfn_to_page(pfn + i))"
    # and the HVO hook in memmap_on_memory_set() removed.
    g = _gates((6, 0, 0), hugetlb_vmemmap=True)
    assert g["feature"] is None and g["1block"] and g["bit37"] is True
    assert E.expected_param_readback((6, 0, 0), "1", hugetlb_vmemmap=True) == "Y"


def test_gate_6_5_still_bool():
    # v6.5 mm/memory_hotplug.c: still module_param(memmap_on_memory, bool, 0444).
    g = _gates((6, 5, 13))
    assert g["force"] == "N" and g["1block"] and not g["2blocks"] and g["nr_memmap"] is None


def test_gate_6_6_force_exact_spellings():
    # v6.6 set_memmap_mode(): 'if (sysfs_streq(val, "force") || sysfs_streq(val, "FORCE"))', else kstrtobool.
    g = _gates(V66)
    assert g["force"] == "force" and E.expected_param_readback(V66, "FORCE") == "force"
    assert g["Force"] == "N" and E.expected_param_readback(V66, "fOrCe") == "N"
    assert not g["2blocks"]                              # size == memory_block_size_bytes() until 6.8


def test_gate_6_8_per_block_split():
    # v6.8 create_altmaps_and_memory_blocks(): one altmap per memory block of the range.
    g = _gates(V68)
    assert g["1block"] and g["2blocks"] and g["nr_memmap"] is None


def test_gate_6_11_nr_memmap_pages():
    # v6.11 mm/sparse-vmemmap.c __populate_section_memmap():
    # memmap_pages_add(DIV_ROUND_UP(nr_pages * sizeof(struct page), PAGE_SIZE)).
    assert _gates((6, 11, 0))["nr_memmap"] == 512
    assert _gates((6, 10, 14))["nr_memmap"] is None


def test_gate_6_18_style_release():
    # A 6.18-style release string: every gate above is on (parse_release reads the leading X.Y.Z).
    v = E.parse_release("6.18.44-fc-v509")
    g = _gates(v)
    assert g["feature"] is None and g["1block"] and g["2blocks"] and g["bit37"] is True
    assert g["force"] == "force" and g["Force"] == "N" and g["nr_memmap"] == 512


def test_kernel_version_takes_debian_sublevel_from_proc_version():
    pv = ("Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14) 12.2.0) "
          "#1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2 (2025-11-01)")
    assert E.kernel_version("6.1.0-56-cloud-amd64", pv) == ((6, 1, 192), "/proc/version (Debian package version)")
    v, src = E.kernel_version("6.1.0-56-cloud-amd64", "")
    assert v == (6, 1, 0) and "assumed .0" in src
    assert E.kernel_version("6.12.117+deb12-cloud-amd64", pv) == ((6, 12, 117), "uname -r")
    assert E.kernel_version("6.12.0-1-amd64", pv)[0] == (6, 12, 0)   # another line's Debian version is not taken


def test_feature_unavailable_names_the_kernel_reason():
    assert E.feature_unavailable(facts(V612)) is None
    assert E.feature_unavailable(facts(V612, param="N")) is None       # the parameter is the user's choice
    why = E.feature_unavailable(facts(V612, sps=56, param="N"))
    assert why and "struct page is 56 bytes" in why and "not PMD-aligned" in why
    assert "pageblock order is 10" in E.feature_unavailable(facts(V61, order=10))
    assert "CONFIG_MHP_MEMMAP_ON_MEMORY" in E.feature_unavailable(facts(V612, config=False))
