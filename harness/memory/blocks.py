"""Memory blocks, the guest's side of hotplug: which blocks a DIMM covers, state writes, and
waits on /sys/devices/system/memory with a deadline.

When a deadline runs out, a guest that still answers a trivial command has simply not done
what was awaited: that is a FAIL (CheckFailed: expected, the last state observed, the rule).
Only a guest that does not answer is a HANG (with the console's last lines).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, Tuple

from harness.memory import expect
from harness.memory.dimm import Dimm
from harness.errors import CheckFailed, GuestRefused, Hang
from harness.memory.parsers import add_refusal_line

MEMORY_SYSFS = "/sys/devices/system/memory"
ANSWER_S = 15.0        # a guest that cannot run `true` within this has stopped answering
CONSOLE_TAIL_LINES = 30


def block_path(block_id: int, attr: str = "") -> str:
    return f"{MEMORY_SYSFS}/memory{block_id}" + (f"/{attr}" if attr else "")


def dimm_blocks(dimm: Dimm, block_size: int) -> Tuple[int, ...]:
    """The ids of the memory blocks the DIMM's range covers (expect.block_ids). Pure."""
    return tuple(expect.block_ids(dimm.addr, dimm.size, block_size))


def set_block_state(guest, block_id: int, state: str, timeout: float = 120.0):
    """echo state > memoryN/state. Returns the CommandResult; EINVAL shows as status != 0 and
    'Invalid argument' in stderr/stdout."""
    return guest.write(block_path(block_id, "state"), state, timeout=timeout)


def block_states(guest, ids: Iterable[int]) -> Dict[int, str]:
    """{block id: state} for the given blocks; a block missing from sysfs is left out."""
    ids = list(ids)
    if not ids:
        return {}
    cmd = ("for b in " + " ".join(str(b) for b in ids) +
           f"; do [ -e {MEMORY_SYSFS}/memory$b ] && echo $b $(cat {MEMORY_SYSFS}/memory$b/state); done; true")
    out: Dict[int, str] = {}
    for line in guest.run(cmd, timeout=30, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            out[int(parts[0])] = parts[1]
    return out


def guest_answers(guest) -> bool:
    """The guest runs a trivial command within ANSWER_S. A crash or QEMU's exit is raised as such."""
    try:
        return guest.run("true", timeout=ANSWER_S).ok
    except Hang:
        return False


def deadline_passed(guest, what: str, expected: str, observed: str, rule: str, timeout: float) -> BaseException:
    """The error for a deadline that ran out: CheckFailed if the guest still answers, else Hang with the console tail."""
    if guest is not None and guest_answers(guest):
        return CheckFailed(f"{what} (within {timeout:.0f} s)", expected, observed, rule)
    console = getattr(getattr(guest, "machine", None), "console", None)
    tail = console.tail(CONSOLE_TAIL_LINES) if console is not None else ""
    return Hang(what, last_seen=observed[:300], console_tail=tail, timeout=timeout)


def wait_until(probe: Callable[[], object], what: str, timeout: float = 30.0, interval: float = 0.1,
               guest=None, expected: str = "", rule: str = "",
               describe: Callable[[object], str] = repr):
    """Poll probe() until it returns a truthy value, and return it. When the deadline runs out:
    deadline_passed() (FAIL when `guest` still answers, else HANG), naming what was awaited and
    describe(last value seen)."""
    deadline = time.monotonic() + timeout
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise deadline_passed(guest, what, expected or what, describe(last), rule, timeout)
        time.sleep(interval)
        interval = min(interval * 1.5, 1.0)


def describe_blocks(ids: Iterable[int], states: Dict[int, str]) -> str:
    """"memory32 present (state offline), memory33 absent". Pure."""
    return ", ".join(f"memory{b} present (state {states[b]})" if b in states else f"memory{b} absent"
                     for b in ids)


def wait_blocks(guest, ids: Iterable[int], present: bool = True, timeout: float = 30.0,
                rule: str = "") -> None:
    """Wait until every memoryN folder exists (present=True) or is gone (present=False)."""
    ids = list(ids)
    last: Dict[int, str] = {}

    def probe() -> bool:
        last.clear()
        last.update(block_states(guest, ids))
        return set(last) == set(ids) if present else not last

    word = "present" if present else "gone"
    rule = rule or ("a hot-added DIMM's blocks appear in sysfs" if present
                    else "after DEVICE_DELETED the DIMM's blocks leave sysfs")
    wait_until(probe, f"memory blocks {ids} {word} in sysfs", timeout, guest=guest,
               expected=f"{', '.join(f'memory{b}' for b in ids)} {word}", rule=rule,
               describe=lambda _: describe_blocks(ids, last))


def dmesg_lines(guest) -> int:
    """How many lines dmesg holds now; pass it to confirm_add as since_line."""
    return len(guest.dmesg().split("\n")) - 1


def confirm_add(guest, dimm: Dimm, block_size: int, timeout: float = 30.0, since_line: int = 0) -> Tuple[int, ...]:
    """Wait until every block of `dimm` is in sysfs and return their ids. If the guest's dmesg
    shows it refused the range first, raise GuestRefused quoting the kernel's line."""
    ids = dimm_blocks(dimm, block_size)
    states: Dict[int, str] = {}

    def probe():
        states.clear()
        states.update(block_states(guest, ids))
        if set(states) == set(ids):
            return ("present", "")
        line = add_refusal_line(guest.dmesg(), dimm.addr, dimm.size, since_line)
        return ("refused", line) if line else None

    kind, line = wait_until(probe, f"memory blocks {list(ids)} of {dimm.id} to appear in sysfs, "
                                   f"or the guest to refuse them in dmesg", timeout, guest=guest,
                            expected=f"{', '.join(f'memory{b}' for b in ids)} present, or a refusal in dmesg",
                            rule="the guest either creates a hot-added DIMM's blocks or says why not",
                            describe=lambda _: describe_blocks(ids, states) + "; no refusal in dmesg")
    if kind == "refused":
        err = GuestRefused(f"the guest refused {dimm.id} ({dimm.size:#x} bytes at {dimm.addr:#x}): {line}")
        err.kernel_line = line  # type: ignore[attr-defined]
        err.dimm = dimm         # type: ignore[attr-defined]
        raise err
    return ids


def present_blocks(guest) -> Tuple[int, ...]:
    """The ids of every memoryN folder in sysfs, sorted."""
    out = guest.run(f"ls {MEMORY_SYSFS}", timeout=30, check=True).stdout.split()
    return tuple(sorted(int(n[6:]) for n in out if n.startswith("memory") and n[6:].isdigit()))
