"""Pure kconfig logic: parse .config files and fragments, find dropped symbols,
and say why memory hotplug or memmap_on_memory cannot work with a config.

Nothing here runs a program or touches the disk; kbuild.py does that.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Tuple

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^#\s*(CONFIG_[A-Za-z0-9_]+) is not set\s*$")

HOTPLUG_SYMBOLS = ("CONFIG_MEMORY_HOTPLUG", "CONFIG_MEMORY_HOTREMOVE", "CONFIG_ACPI_HOTPLUG_MEMORY")


def parse_config(text: str) -> Dict[str, str]:
    """`CONFIG_X=y` -> {"CONFIG_X": "y"}; `# CONFIG_X is not set` -> "n".

    Values keep their quotes (`CONFIG_CMDLINE="a b"` -> '"a b"'), as .config
    writes them, so a fragment value and a .config value compare equal.
    Other lines are ignored; the last assignment of a symbol wins, as in
    merge_config.sh.
    """
    out: Dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        m = _SET.match(line)
        if m:
            out[m.group(1)] = m.group(2).strip()
            continue
        m = _UNSET.match(line)
        if m:
            out[m.group(1)] = "n"
    return out


def parse_fragment(text: str) -> Dict[str, str]:
    """A fragment has the same syntax as a .config (comments allowed)."""
    return parse_config(text)


def dropped_symbols(requested: Mapping[str, str], final: Mapping[str, str]) -> List[Tuple[str, str, str]]:
    """Symbols the fragments asked for that the final config does not have.

    Returns (sym, wanted, got) in request order; got is "n" when the symbol is
    absent from the final config. Asking for "n" and finding it absent counts
    as satisfied (kconfig omits symbols whose menu is invisible).
    """
    dropped = []
    for sym, want in requested.items():
        got = final.get(sym, "n")
        if got != want:
            dropped.append((sym, want, got))
    return dropped


def _on(config: Mapping[str, str], sym: str) -> bool:
    return config.get(sym, "n") in ("y", "m")


def missing_for_hotplug(config: Mapping[str, str]) -> List[str]:
    """Symbols that pc-dimm hot-add and hot-remove need and this config lacks."""
    return [s for s in HOTPLUG_SYMBOLS if not _on(config, s)]


def memmap_blockers(config: Mapping[str, str]) -> List[str]:
    """Human sentences, one per reason memmap_on_memory cannot apply with this config.

    An empty list means the config does not rule the feature out (the DIMM
    size and the kernel version rules still apply; see expect.py).
    """
    out = []
    if not _on(config, "CONFIG_MHP_MEMMAP_ON_MEMORY"):
        out.append("CONFIG_MHP_MEMMAP_ON_MEMORY is not set, so the kernel has no memmap_on_memory support "
                   "(it needs MEMORY_HOTPLUG, SPARSEMEM_VMEMMAP and an architecture that enables it)")
    if not _on(config, "CONFIG_MEMCG"):
        out.append("struct page is 56 bytes without CONFIG_MEMCG, so a block's vmemmap is not PMD-aligned "
                   "and memmap_on_memory never applies, although the parameter reads Y")
    if not _on(config, "CONFIG_HUGETLB_PAGE"):
        out.append("pageblock order is MAX_ORDER-1 = 10 without CONFIG_HUGETLB_PAGE, so the part of a "
                   "128 MiB block after its vmemmap is not pageblock-aligned and memmap_on_memory "
                   "never applies on 6.1")
    if not _on(config, "CONFIG_SPARSEMEM_VMEMMAP"):
        out.append("CONFIG_SPARSEMEM_VMEMMAP is not set: memmap_on_memory places the vmemmap of a block "
                   "inside the block, which needs a virtually mapped memmap")
    return out
