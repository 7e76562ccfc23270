"""Pure parsers: kernel text in, data out.

Every function here takes text (or bytes) that a guest produced and returns
plain data. None of them raise on odd input: what can be parsed is returned,
what is missing comes back as None or an empty container. Judging the data is
the job of checks.py, and expected numbers come from expect.py.

Tested on synthetic fixtures in tests/data/synthetic/ (written from the
kernel's own printf formats, mm/vmstat.c zoneinfo_show_print,
fs/proc/meminfo.c, drivers/base/memory.c) and on real captures in
tests/data/<kernel>/ when they exist.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

# ---------------------------------------------------------------------------
# Memory blocks (/sys/devices/system/memory)

SYSFS_MEMORY = "/sys/devices/system/memory"

#: The one command the observation layer runs to read every memory block.
#: Runs under busybox sh with busybox grep and ls (no bash: no brace
#: expansion). Output format, one item per line, paths relative to
#: /sys/devices/system/memory:
#:
#:     block_size_bytes:8000000
#:     auto_online_blocks:offline
#:     memory32/state:offline
#:     memory32/online:0
#:     memory32/valid_zones:Normal Movable
#:     memory32/phys_index:00000020
#:     memory32/removable:1
#:     memory32/node0                 (from ls -d: one line per node link)
#:
#: grep -H forces the "file:" prefix even when a glob matches one file. Files
#: that do not exist on a kernel (removable is gone on some) and globs that
#: match nothing are silenced; the command always exits 0.
SYSFS_DUMP_CMD = (
    "cd /sys/devices/system/memory && "
    "grep -H . block_size_bytes auto_online_blocks "
    "memory*/state memory*/online memory*/valid_zones "
    "memory*/phys_index memory*/removable 2>/dev/null; "
    "ls -d memory*/node* 2>/dev/null; true"
)


@dataclass(frozen=True)
class MemoryBlock:
    id: int
    state: Optional[str] = None          # "online" / "offline" / "going-offline"
    online: Optional[bool] = None
    valid_zones: Tuple[str, ...] = ()
    phys_index: Optional[int] = None     # hex in sysfs ("%08x")
    removable: Optional[bool] = None
    node: Optional[int] = None


@dataclass(frozen=True)
class SysfsDump:
    """What SYSFS_DUMP_CMD printed: block size, online policy, every block."""
    block_size: Optional[int] = None
    auto_online_blocks: Optional[str] = None
    blocks: Dict[int, MemoryBlock] = field(default_factory=dict)


def _lines(text: str) -> List[str]:
    """Split text into lines, dropping the \\r a serial console adds."""
    if not text:
        return []
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _int(text: Optional[str], base: int = 10) -> Optional[int]:
    if text is None:
        return None
    try:
        return int(text.strip(), base)
    except (ValueError, TypeError):
        return None


def parse_block_size(text: str) -> Optional[int]:
    """block_size_bytes is hex without 0x: "8000000" -> 134217728."""
    return _int(text, 16)


def _block_id(name: str) -> Optional[int]:
    m = re.fullmatch(r"memory(\d+)", name.strip())
    return int(m.group(1)) if m else None


def _make_block(bid: int, f: Mapping[str, str]) -> MemoryBlock:
    state = f.get("state")
    state = state.strip() if state is not None else None
    online_raw = f.get("online")
    online = None
    if online_raw is not None and online_raw.strip() in ("0", "1"):
        online = online_raw.strip() == "1"
    zones = tuple(f.get("valid_zones", "").split())
    removable_raw = f.get("removable")
    removable = None
    if removable_raw is not None and removable_raw.strip() in ("0", "1"):
        removable = removable_raw.strip() == "1"
    node = None
    nodes = f.get("nodes")
    if nodes:
        m = re.search(r"node(\d+)", nodes)
        if m:
            node = int(m.group(1))
    return MemoryBlock(id=bid, state=state or None, online=online, valid_zones=zones,
                       phys_index=_int(f.get("phys_index"), 16),
                       removable=removable, node=node)


def parse_memory_blocks(files: Mapping[str, Mapping[str, str]]) -> Dict[int, MemoryBlock]:
    """{"memory32": {"state": "offline\\n", ..., "nodes": "node0"}} -> {32: MemoryBlock}."""
    out: Dict[int, MemoryBlock] = {}
    for name, f in (files or {}).items():
        bid = _block_id(name)
        if bid is None or not isinstance(f, Mapping):
            continue
        out[bid] = _make_block(bid, f)
    return out


_DUMP_PREFIX = SYSFS_MEMORY + "/"


def parse_sysfs_dump(text: str) -> SysfsDump:
    """Parse SYSFS_DUMP_CMD output (relative or absolute paths) into a SysfsDump."""
    files: Dict[str, Dict[str, str]] = {}
    top: Dict[str, str] = {}
    for line in _lines(text):
        line = line.strip()
        if not line:
            continue
        if line.startswith(_DUMP_PREFIX):
            line = line[len(_DUMP_PREFIX):]
        path, sep, value = line.partition(":")
        parts = path.split("/")
        if not sep:
            # ls -d output: memory32/node0
            if len(parts) == 2 and _block_id(parts[0]) is not None and re.fullmatch(r"node\d+", parts[1]):
                entry = files.setdefault(parts[0], {})
                entry["nodes"] = (entry.get("nodes", "") + " " + parts[1]).strip()
            continue
        if len(parts) == 1:
            top[parts[0]] = value
        elif len(parts) == 2 and _block_id(parts[0]) is not None:
            files.setdefault(parts[0], {})[parts[1]] = value
    auto = top.get("auto_online_blocks")
    return SysfsDump(block_size=parse_block_size(top["block_size_bytes"]) if "block_size_bytes" in top else None,
                     auto_online_blocks=auto.strip() if auto is not None else None,
                     blocks=parse_memory_blocks(files))


# ---------------------------------------------------------------------------
# /proc files

@dataclass(frozen=True)
class Zone:
    spanned: Optional[int] = None
    present: Optional[int] = None
    managed: Optional[int] = None
    free: Optional[int] = None        # "pages free"


_ZONE_HEAD = re.compile(r"^Node\s+(\d+),\s+zone\s+(\S+)")
_ZONE_FIELD = re.compile(r"^\s+(spanned|present|managed)\s+(\d+)\s*$")
_ZONE_FREE = re.compile(r"^\s+pages free\s+(\d+)\s*$")


def parse_zoneinfo(text: str) -> Dict[Tuple[int, str], Zone]:
    """/proc/zoneinfo -> {(node, zone): Zone(spanned, present, managed, free)}; other fields ignored."""
    out: Dict[Tuple[int, str], Zone] = {}
    key: Optional[Tuple[int, str]] = None
    vals: Dict[str, int] = {}

    def flush() -> None:
        if key is not None:
            out[key] = Zone(spanned=vals.get("spanned"), present=vals.get("present"),
                            managed=vals.get("managed"), free=vals.get("free"))

    for line in _lines(text):
        m = _ZONE_HEAD.match(line)
        if m:
            flush()
            key, vals = (int(m.group(1)), m.group(2)), {}
            continue
        if key is None:
            continue
        m = _ZONE_FREE.match(line)
        if m:
            vals.setdefault("free", int(m.group(1)))
            continue
        m = _ZONE_FIELD.match(line)
        if m:
            vals.setdefault(m.group(1), int(m.group(2)))
    flush()
    return out


_MEMINFO = re.compile(r"^\s*([^:\s]+(?:\s[^:\s]+)*)\s*:\s*(-?\d+)(?:\s*kB)?\s*$")


def parse_meminfo(text: str) -> Dict[str, int]:
    """/proc/meminfo (or a node's meminfo) -> {key: value}; kB fields in kB, unitless (HugePages_*) as is."""
    out: Dict[str, int] = {}
    for line in _lines(text):
        # node meminfo: "Node 1 MemTotal:       131072 kB"
        line = re.sub(r"^Node\s+\d+\s+", "", line)
        m = _MEMINFO.match(line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def parse_vmstat(text: str) -> Dict[str, int]:
    """/proc/vmstat "name value" lines -> {name: value}."""
    out: Dict[str, int] = {}
    for line in _lines(text):
        parts = line.split()
        if len(parts) == 2:
            v = _int(parts[1])
            if v is not None:
                out[parts[0]] = v
    return out


def parse_pageblock_order(pagetypeinfo_text: str) -> Optional[int]:
    """/proc/pagetypeinfo "Page block order: 9" -> 9."""
    m = re.search(r"^Page block order:\s*(\d+)", (pagetypeinfo_text or "").replace("\r", ""), re.M)
    return int(m.group(1)) if m else None


def parse_param(text: str) -> str:
    """A /sys/module/*/parameters/* file: "Y\\n" -> "Y"."""
    return (text or "").strip()


def parse_kpageflags(data: bytes) -> List[int]:
    """/proc/kpageflags bytes -> one u64 (little-endian) per pfn; a trailing partial word is dropped."""
    if not data:
        return []
    n = len(data) // 8
    return list(struct.unpack("<%dQ" % n, data[: n * 8]))


# ---------------------------------------------------------------------------
# Console and dmesg

@dataclass(frozen=True)
class Splat:
    kind: str     # panic / oops / bug / warning / bad_page / altmap
    text: str     # the trigger line and up to SPLAT_CONTEXT following lines
    line: int = 0  # 0-based index of the trigger line


SPLAT_CONTEXT = 20

# A console or dmesg line may start with a syslog level "<4>", a printk
# timestamp "[    1.234567]" and a caller id "[    T1]" (CONFIG_PRINTK_CALLER).
_PREFIX = r"^(?:<\d+>)?(?:\[\s*\d+\.\d+\]\s*)?(?:\[\s*[TC]\d+\]\s*)?"

# Order matters: the first pattern that matches a line names its kind.
_SPLAT_PATTERNS: Tuple[Tuple[str, "re.Pattern[str]"], ...] = (
    ("panic", re.compile(_PREFIX + r"Kernel panic - not syncing")),
    ("bad_page", re.compile(_PREFIX + r"(?:BUG: )?Bad page (?:state|map)")),
    ("altmap", re.compile(_PREFIX + r".*Altmap not fully unmapped")),
    ("oops", re.compile(_PREFIX + r"Oops(?::|\s+-)")),
    ("bug", re.compile(_PREFIX + r"(?:BUG: |kernel BUG at )")),
    ("warning", re.compile(_PREFIX + r"WARNING: ")),
)


def find_splats(console_text: str) -> List[Splat]:
    """Every panic/Oops/BUG/WARNING/Bad page/Altmap line at line start (after printk prefixes), with context.

    Each trigger line gives its own Splat, so one crash often yields several
    (a BUG line then an Oops line); callers usually take the first.
    """
    lines = _lines(console_text)
    out: List[Splat] = []
    for i, line in enumerate(lines):
        for kind, pat in _SPLAT_PATTERNS:
            if pat.match(line):
                text = "\n".join(lines[i:i + 1 + SPLAT_CONTEXT]).rstrip("\n")
                out.append(Splat(kind=kind, text=text, line=i))
                break
    return out


_TS = re.compile(r"^(?:<\d+>)?\[\s*(\d+\.\d+)\]")


def parse_dmesg_boot_time(dmesg: str, marker: str = "Run /init as init process") -> Optional[float]:
    """Timestamp in seconds of the first dmesg line containing marker, or None."""
    for line in _lines(dmesg):
        if marker in line:
            m = _TS.match(line.strip())
            return float(m.group(1)) if m else None
    return None


# ---------------------------------------------------------------------------
# Hot-add refusals in dmesg
#
# The guest can refuse a DIMM that QEMU accepted, and the insert OST still reports status 0
# (ORACLE: "Hot-add"). These are the kernel's own words for it, x86_64, 6.1 and 6.12:
#   mm/memory_hotplug.c check_hotplug_memory_range():
#       "Block size [%#lx] unaligned hotplug range: start %#llx, size %#llx"
#   drivers/acpi/acpi_memhotplug.c acpi_memory_enable_device(): "add_memory failed"
#   drivers/acpi/acpi_memhotplug.c acpi_memory_device_add(): "acpi_memory_enable_device() error"
ADD_REFUSAL_GENERIC = ("add_memory failed", "acpi_memory_enable_device() error")


def add_refusal_line(dmesg: str, addr: int, size: int, after_line: int = 0) -> Optional[str]:
    """The guest's refusal of the range [addr, addr+size), quoted from dmesg, or None.

    A line that names this range (start and size as the kernel prints them) wins wherever it
    is; a generic "add_memory failed" line counts only after line `after_line` (it names the
    ACPI device, not the range, so an older one may belong to another DIMM)."""
    lines = (dmesg or "").replace("\r", "").split("\n")
    ranged = f"unaligned hotplug range: start {addr:#x}, size {size:#x}"
    for line in lines:
        if ranged in line:
            return line.strip()
    for line in lines[after_line:]:
        if any(s in line for s in ADD_REFUSAL_GENERIC):
            return line.strip()
    return None
