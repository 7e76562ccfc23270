"""harness.kernels.kconfig: parsers and checks on captured configs (tests/data/kconfig/)."""
from pathlib import Path

from harness.kernels.kconfig import (dropped_symbols, memmap_blockers, missing_for_hotplug, parse_config,
                             parse_fragment)

DATA = Path(__file__).resolve().parent.parent / "data" / "kconfig"
KCONFIGS = Path(__file__).resolve().parents[2] / "kconfigs"


def test_parse_config_values_and_not_set():
    text = ('#\n# Automatically generated file; DO NOT EDIT.\n#\nCONFIG_X=y\nCONFIG_M=m\n'
            '# CONFIG_NO is not set\nCONFIG_NR=64\nCONFIG_S="a b"\nCONFIG_H=0x10\n'
            'garbage line\n# comment CONFIG_Z=y\n')
    assert parse_config(text) == {"CONFIG_X": "y", "CONFIG_M": "m", "CONFIG_NO": "n", "CONFIG_NR": "64",
                                  "CONFIG_S": '"a b"', "CONFIG_H": "0x10"}


def test_parse_last_assignment_wins_and_odd_input():
    assert parse_config("CONFIG_A=y\n# CONFIG_A is not set\n") == {"CONFIG_A": "n"}
    assert parse_config("") == {}
    assert parse_config("CONFIG_=\n=y\nCONFIG_A y\n\x00\n") == {}
    assert parse_fragment("  CONFIG_A=y  \r\n") == {"CONFIG_A": "y"}


def test_captured_memhp_config():
    cfg = parse_config((DATA / "memhp-6.1.config").read_text())
    assert cfg["CONFIG_MEMORY_HOTPLUG"] == "y"
    assert missing_for_hotplug(cfg) == []
    assert memmap_blockers(cfg) == []


def test_every_fragment_symbol_survived_in_captured_config():
    """The captured 6.1 config was made from kconfigs/memhp.config: nothing dropped."""
    req = parse_fragment((KCONFIGS / "memhp.config").read_text())
    assert len(req) > 50
    final = parse_config((DATA / "memhp-6.1.config").read_text())
    assert dropped_symbols(req, final) == []


def test_dropped_symbols():
    req = {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "n", "CONFIG_D": "n", "CONFIG_E": "64"}
    final = {"CONFIG_A": "y", "CONFIG_C": "n", "CONFIG_D": "y", "CONFIG_E": "32"}
    assert dropped_symbols(req, final) == [("CONFIG_B", "y", "n"), ("CONFIG_D", "n", "y"),
                                           ("CONFIG_E", "64", "32")]
    assert dropped_symbols({"CONFIG_M": "y"}, {"CONFIG_M": "m"}) == [("CONFIG_M", "y", "m")]
    assert dropped_symbols({}, final) == []


def test_tmpfs_without_shmem_is_reported():
    # the ORACLE trap: tinyconfig drops SHMEM and olddefconfig then drops TMPFS
    final = parse_config("# CONFIG_SHMEM is not set\n")
    assert dropped_symbols({"CONFIG_TMPFS": "y"}, final) == [("CONFIG_TMPFS", "y", "n")]


def test_missing_for_hotplug():
    assert missing_for_hotplug({}) == ["CONFIG_MEMORY_HOTPLUG", "CONFIG_MEMORY_HOTREMOVE",
                                       "CONFIG_ACPI_HOTPLUG_MEMORY"]
    assert missing_for_hotplug({"CONFIG_MEMORY_HOTPLUG": "y", "CONFIG_MEMORY_HOTREMOVE": "y",
                                "CONFIG_ACPI_HOTPLUG_MEMORY": "m"}) == []


def test_memmap_blockers_name_each_reason():
    full = {s: "y" for s in ("CONFIG_MHP_MEMMAP_ON_MEMORY", "CONFIG_MEMCG", "CONFIG_HUGETLB_PAGE",
                             "CONFIG_SPARSEMEM_VMEMMAP")}
    assert memmap_blockers(full) == []
    no_memcg = dict(full, CONFIG_MEMCG="n")
    (msg,) = memmap_blockers(no_memcg)
    assert "56 bytes" in msg and "CONFIG_MEMCG" in msg and "PMD-aligned" in msg
    no_huge = {k: v for k, v in full.items() if k != "CONFIG_HUGETLB_PAGE"}
    (msg,) = memmap_blockers(no_huge)
    assert "MAX_ORDER-1 = 10" in msg and "CONFIG_HUGETLB_PAGE" in msg
    assert len(memmap_blockers({})) == 4
    assert any("SPARSEMEM_VMEMMAP" in m for m in memmap_blockers(dict(full, CONFIG_SPARSEMEM_VMEMMAP="n")))
    assert any("MHP_MEMMAP_ON_MEMORY" in m for m in memmap_blockers(dict(full, CONFIG_MHP_MEMMAP_ON_MEMORY="n")))


def test_fragment_lines_each_have_a_reason():
    """Every symbol line in kconfigs/ fragments belongs to a group that starts with a comment."""
    for frag in list(KCONFIGS.glob("*.config")) + list(KCONFIGS.glob("debug/*.config")):
        prev_kind = "blank"
        for line in frag.read_text().splitlines():
            is_sym = line.startswith("CONFIG_") or (line.startswith("# CONFIG_") and line.endswith("is not set"))
            kind = "sym" if is_sym else ("comment" if line.startswith("#") else "blank")
            if kind == "sym":
                assert prev_kind in ("comment", "sym"), f"{frag.name}: {line} has no comment saying why"
            prev_kind = kind


def test_captured_tinyconfig_rules_out_hotplug_and_the_feature():
    """`make ARCH=x86_64 tinyconfig` of 6.1.192: why memhp.config exists."""
    cfg = parse_config((DATA / "tinyconfig-6.1.config").read_text())
    assert missing_for_hotplug(cfg) == ["CONFIG_MEMORY_HOTPLUG", "CONFIG_MEMORY_HOTREMOVE",
                                        "CONFIG_ACPI_HOTPLUG_MEMORY"]
    blockers = " ".join(memmap_blockers(cfg))
    for sym in ("MHP_MEMMAP_ON_MEMORY", "CONFIG_MEMCG", "CONFIG_HUGETLB_PAGE", "SPARSEMEM_VMEMMAP"):
        assert sym in blockers
    assert cfg["CONFIG_BUG"] == "n" and cfg["CONFIG_SHMEM"] == "n"
