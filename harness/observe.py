"""Observations: raw reads of sysfs/procfs in ONE guest command, parsed into a Snapshot.

The raw text is kept in the Snapshot (and can be saved as an artifact); parsing is pure
(harness.parsers), so what was seen can always be re-judged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

from harness import parsers
from harness.parsers import MemoryBlock, Zone

SECTION = "@@memhp-section "
PROC_FILES = ("/proc/meminfo", "/proc/zoneinfo", "/proc/vmstat")


def snapshot_cmd() -> str:
    parts = [f"for f in {' '.join(PROC_FILES)}; do echo \"{SECTION}$f\"; cat $f; done",
             f"echo '{SECTION}sysfs'", f"( {parsers.SYSFS_DUMP_CMD} )"]
    return "; ".join(parts)


def split_sections(text: str) -> Dict[str, str]:
    """Split snapshot_cmd() output into {section name: text}. Pure."""
    out: Dict[str, list] = {}
    cur: Optional[str] = None
    for line in text.splitlines():
        if line.startswith(SECTION):
            cur = line[len(SECTION):].strip()
            out[cur] = []
        elif cur is not None:
            out[cur].append(line)
    return {k: "\n".join(v) + "\n" for k, v in out.items()}


@dataclass(frozen=True)
class Snapshot:
    meminfo: Dict[str, int]
    zones: Dict[Tuple[int, str], Zone]
    vmstat: Dict[str, int]
    blocks: Dict[int, MemoryBlock]
    block_size: Optional[int]
    auto_online_blocks: Optional[str]
    raw: Dict[str, str] = field(default_factory=dict, repr=False)

    def zone(self, node: int, name: str) -> Zone:
        return self.zones.get((node, name)) or Zone(0, 0, 0, 0)

    def block(self, bid: int) -> Optional[MemoryBlock]:
        return self.blocks.get(bid)


def parse_snapshot(text: str) -> Snapshot:
    sec = split_sections(text)
    dump = parsers.parse_sysfs_dump(sec.get("sysfs", ""))
    return Snapshot(meminfo=parsers.parse_meminfo(sec.get("/proc/meminfo", "")),
                    zones=parsers.parse_zoneinfo(sec.get("/proc/zoneinfo", "")),
                    vmstat=parsers.parse_vmstat(sec.get("/proc/vmstat", "")),
                    blocks=dump.blocks, block_size=dump.block_size,
                    auto_online_blocks=dump.auto_online_blocks, raw=sec)


def snapshot(guest) -> Snapshot:
    return parse_snapshot(guest.run(snapshot_cmd(), timeout=60, check=True).stdout)


# ---------------------------------------------------------------- kernel facts
FACTS_CMD = ("uname -r; echo @@; cat /sys/devices/system/memory/block_size_bytes; echo @@; "
             "grep 'Page block order' /proc/pagetypeinfo; echo @@; "
             "cat /sys/module/memory_hotplug/parameters/memmap_on_memory 2>/dev/null; echo @@; "
             "ls /sys/kernel/btf/vmlinux 2>/dev/null; echo @@; "
             "(zcat /proc/config.gz 2>/dev/null | grep -E '^CONFIG_(MEMCG|MHP_MEMMAP_ON_MEMORY)=') ; true")

_btf_cache: Dict[str, Tuple[int, str]] = {}


def parse_facts_output(text: str):
    """Split FACTS_CMD output into (release, block_size_text, pagetypeinfo_line, param, has_btf, config_lines)."""
    parts = [p.strip() for p in text.split("@@")]
    parts += [""] * (6 - len(parts))
    return parts[0], parts[1], parts[2], parts[3], bool(parts[4]), parts[5]


def gather_facts(guest, kernel=None):
    """Read the facts the expectation model needs from the running guest.

    sizeof(struct page) comes from the guest's BTF when it has one, else from the kernel
    config (host-side file, then /proc/config.gz); the source is recorded in the facts."""
    from harness import expect

    out = guest.run(FACTS_CMD, timeout=30, check=True).stdout
    release, bs, pbo, param, has_btf, cfg_lines = parse_facts_output(out)
    config_text = cfg_lines
    mhp_cfg = None
    if kernel is not None and getattr(kernel, "config", None):
        try:
            config_text = Path(kernel.config).read_text(errors="replace")
        except OSError:
            pass
    if config_text:
        mhp_cfg = "CONFIG_MHP_MEMMAP_ON_MEMORY=y" in config_text
    size, source = None, "assumed"
    if release in _btf_cache:
        size, source = _btf_cache[release]
    elif has_btf:
        try:
            data = guest.ssh.run_bytes("cat /sys/kernel/btf/vmlinux", timeout=120)[1] if guest.ssh else b""
            size = expect.struct_page_size_from_btf(data)
            source = "btf" if size else "assumed"
        except Exception:
            size = None
    if size is None and config_text:
        size, source = expect.struct_page_size_from_config(config_text), "config"
    if size is None:
        size, source = 64, "assumed"
    _btf_cache[release] = (size, source)
    return expect.KernelFacts(release=release, version=expect.parse_release(release),
                              block_size=parsers.parse_block_size(bs) or 0,
                              struct_page_size=size, struct_page_source=source,
                              pageblock_order=parsers.parse_pageblock_order(pbo) or 0,
                              param=parsers.parse_param(param), mhp_memmap_config=mhp_cfg)
