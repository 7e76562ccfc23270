"""Observations: raw reads of sysfs/procfs in ONE guest command, parsed into a Snapshot.

The raw text is kept in the Snapshot (and can be saved as an artifact); parsing is pure
(harness.memory.parsers), so what was seen can always be re-judged.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

from harness.memory import expect, parsers
from harness.errors import InfraError
from harness.memory.parsers import MemoryBlock, Zone

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
PARAM_FILE = "/sys/module/memory_hotplug/parameters/memmap_on_memory"
BTF_FILE = "/sys/kernel/btf/vmlinux"
HVO_SYSCTL = "/proc/sys/vm/hugetlb_optimize_vmemmap"
ABSENT = "@absent"
CONFIG_MARK = "@config"
_CONFIG_SYMS = "MEMCG|MHP_MEMMAP_ON_MEMORY|HUGETLB_PAGE_FREE_VMEMMAP_DEFAULT_ON|HUGETLB_PAGE_OPTIMIZE_VMEMMAP_DEFAULT_ON"
# Sections split by "@@", in this order: uname -r, block_size_bytes, pageblock order, the parameter
# (ABSENT when the file does not exist), the BTF file, /proc/config.gz lines (CONFIG_MARK first when
# the file exists), /proc/version, /proc/cmdline, the HVO sysctl.
FACTS_CMD = ("uname -r; echo @@; cat /sys/devices/system/memory/block_size_bytes; echo @@; "
             "grep 'Page block order' /proc/pagetypeinfo; echo @@; "
             f"cat {PARAM_FILE} 2>/dev/null || echo {ABSENT}; echo @@; "
             f"ls {BTF_FILE} 2>/dev/null; echo @@; "
             f"if [ -e /proc/config.gz ]; then echo {CONFIG_MARK}; "
             f"zcat /proc/config.gz | grep -E '^CONFIG_({_CONFIG_SYMS})='; fi; echo @@; "
             f"cat /proc/version; echo @@; cat /proc/cmdline; echo @@; "
             f"cat {HVO_SYSCTL} 2>/dev/null; true")


class FactUnavailable(InfraError):
    """A kernel fact memhp could not establish; the message names where it looked."""


@dataclass(frozen=True)
class FactsOutput:
    """FACTS_CMD output, split. Pure data."""
    release: str
    block_size: str
    pagetypeinfo: str
    param: Optional[str]          # None: no such parameter file
    has_btf: bool
    config: Optional[str]         # None: no /proc/config.gz
    proc_version: str = ""
    cmdline: str = ""
    hvo_sysctl: str = ""


def parse_facts_output(text: str) -> FactsOutput:
    """Split FACTS_CMD output into its sections (missing trailing sections come back empty). Pure."""
    parts = [p.strip() for p in (text or "").replace("\r", "").split("@@")]
    parts += [""] * (9 - len(parts))
    cfg = parts[5]
    config = cfg[len(CONFIG_MARK):].strip() if cfg.startswith(CONFIG_MARK) else (cfg or None)
    return FactsOutput(release=parts[0], block_size=parts[1], pagetypeinfo=parts[2],
                       param=None if parts[3] == ABSENT else parsers.parse_param(parts[3]),
                       has_btf=bool(parts[4]), config=config, proc_version=parts[6], cmdline=parts[7],
                       hvo_sysctl=parts[8])


def hugetlb_vmemmap_enabled(version, cmdline: str, sysctl: str, config: Optional[str]) -> Optional[bool]:
    """Whether the HugeTLB vmemmap optimisation is on, where it matters (5.14 .. 5.19); None elsewhere or unknown.

    5.19: the vm.hugetlb_optimize_vmemmap sysctl tells. 5.14 .. 5.18: the
    hugetlb_free_vmemmap=on|off boot parameter, else the config's
    HUGETLB_PAGE_FREE_VMEMMAP_DEFAULT_ON (HUGETLB_PAGE_OPTIMIZE_VMEMMAP_DEFAULT_ON
    on 5.19). Pure.
    """
    mm = tuple(version)[:2]
    if not expect.V_HVO <= mm < expect.V_HVO_COMPAT:
        return None
    if sysctl.strip() in ("0", "1"):
        return sysctl.strip() == "1"
    m = re.search(r"(?:^|\s)hugetlb_free_vmemmap=(\S+)", cmdline or "")
    if m:
        return m.group(1) in ("on", "1", "y", "Y")
    if config is not None:
        return bool(re.search(r"^CONFIG_HUGETLB_PAGE_(FREE|OPTIMIZE)_VMEMMAP_DEFAULT_ON=y", config, re.M))
    return None


def facts_from(out: FactsOutput, btf_size: Optional[int], host_config: Optional[str],
               host_config_path: str = "") -> expect.KernelFacts:
    """KernelFacts from FACTS_CMD output, the struct page size read from BTF (None: no BTF or no struct
    page in it) and the host-side config text. Raises FactUnavailable naming where memhp looked. Pure."""
    version, version_source = expect.kernel_version(out.release, out.proc_version)
    if version == (0, 0, 0):
        raise FactUnavailable(f"kernel version: uname -r printed {out.release!r}")
    block_size = parsers.parse_block_size(out.block_size)
    if not block_size:
        raise FactUnavailable(f"memory block size: /sys/devices/system/memory/block_size_bytes read {out.block_size!r}")
    order = parsers.parse_pageblock_order(out.pagetypeinfo)
    if order is None:
        raise FactUnavailable(f"pageblock order: no 'Page block order' line in /proc/pagetypeinfo ({out.pagetypeinfo!r})")
    config, where = (host_config, host_config_path or "the config beside the kernel image") \
        if host_config is not None else (out.config, "/proc/config.gz")
    looked = [f"{BTF_FILE} ({'no struct page in it' if out.has_btf else 'absent'})"]
    if btf_size is not None:
        size, source = btf_size, "btf"
    elif config is not None:
        size, source = expect.struct_page_size_from_config(config), f"config ({where})"
    else:
        looked += ["no config beside the kernel image", "no /proc/config.gz"]
        raise FactUnavailable("sizeof(struct page): " + "; ".join(looked))
    mhp_cfg = None if config is None else "CONFIG_MHP_MEMMAP_ON_MEMORY=y" in config
    hvo = hugetlb_vmemmap_enabled(version, out.cmdline, out.hvo_sysctl, config)
    if hvo is None and expect.V_HVO <= tuple(version)[:2] < expect.V_HVO_COMPAT:
        raise FactUnavailable(f"whether the HugeTLB vmemmap optimisation is on ({out.release}, where it disables "
                              f"memmap_on_memory): no {HVO_SYSCTL}, no hugetlb_free_vmemmap= on the command line, "
                              f"no kernel config")
    return expect.KernelFacts(release=out.release, version=version, version_source=version_source,
                              block_size=block_size, struct_page_size=size, struct_page_source=source,
                              pageblock_order=order, param=out.param or "", mhp_memmap_config=mhp_cfg,
                              hugetlb_vmemmap=hvo)


_btf_cache: Dict[Tuple[str, str], Optional[int]] = {}


def gather_facts(guest, kernel=None) -> expect.KernelFacts:
    """Read the facts the expectation model needs from the running guest (FactUnavailable when one cannot be established).

    sizeof(struct page) comes from the guest's BTF when it has one, else from the kernel
    config (host-side file, then /proc/config.gz); the source is recorded in the facts."""
    out = parse_facts_output(guest.run(FACTS_CMD, timeout=30, check=True).stdout)
    key = (out.release, out.proc_version)
    if key not in _btf_cache:
        _btf_cache[key] = (expect.struct_page_size_from_btf(guest.read_file_bytes(BTF_FILE))
                           if out.has_btf else None)
    host_config, path = None, ""
    if kernel is not None and getattr(kernel, "config", None) and Path(kernel.config).is_file():
        path = str(kernel.config)
        host_config = Path(path).read_text(errors="replace")
    return facts_from(out, _btf_cache[key], host_config, path)
