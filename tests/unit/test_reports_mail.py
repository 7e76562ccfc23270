"""The regression email: an mbox that Python's mailbox and email modules read back, with the
subject, recipients, sections and 75-column wrap the kernel lists expect, and no memhp insides."""
from __future__ import annotations

import email
import email.policy
import mailbox
import re
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from harness.reports import load_run, render
from harness.reports.mail import _ANSI, REGRESSIONS, SECTIONS, WIDTH

from reports_helpers import BISECT, FAULTS, LEAK_FAIL, LIFECYCLE, SUITE, derived_failed_run


def _read_mbox(text: str, tmp_path: Path):
    p = tmp_path / "report.mbox"
    p.write_text(text)
    box = mailbox.mbox(str(p))
    msgs = list(box)
    box.close()
    assert len(msgs) == 1, "one message per report"
    return email.message_from_string(str(msgs[0]), policy=email.policy.default)


def _body(msg) -> str:
    return msg.get_body(preferencelist=("plain",)).get_content()


def _allowed_long(line: str, run) -> bool:
    """Lines that may pass 75 columns: console lines (verbatim), one unbreakable word of the
    QEMU command, or a commit reference."""
    s = line.strip()
    consoles = "\n".join(x.console for x in run.scenarios)
    if s and s in consoles:
        return True
    words = s.rstrip("\\").strip()
    try:
        if len(shlex.split(words)) == 1 and words in run.machine.argv:
            return True
    except ValueError:
        pass
    return s.startswith("commit ")


def _check_wrap(body: str, run) -> None:
    long = [x for x in body.splitlines() if len(x) > WIDTH and not _allowed_long(x, run)]
    assert not long, "lines over 75 columns that are not verbatim log lines:\n" + "\n".join(long)


def test_failed_run_email(tmp_path):
    run = load_run(derived_failed_run(tmp_path))
    msg = _read_mbox(render(run, "email"), tmp_path)
    assert msg["Subject"] == ("[REGRESSION] mm/memory_hotplug: block_sized_dimm_lifecycle: Movable managed delta "
                              "(6.12.117+deb12-cloud-amd64)")
    assert msg["To"] == "linux-mm@kvack.org" and msg["Cc"] == REGRESSIONS
    assert msg["Message-ID"] and msg["Date"] and msg["From"]
    body = _body(msg)
    for section in SECTIONS:
        assert f"\n{section}\n{'-' * len(section)}\n" in body, section
    # Each failed check as expected / observed / rule.
    what = body.split("What failed\n")[1].split("The kernel\n")[0]
    assert "  Movable managed delta\n    expected: 32256\n    observed: 32768\n    rule:     online_movable" in what
    assert "  MemTotal delta (kB)\n    expected: 129024\n    observed: 131072\n" in what
    kern = body.split("The kernel\n")[1].split("The machine\n")[0]
    for sym in ("CONFIG_MEMCG=y", "CONFIG_HUGETLB_PAGE=y", "CONFIG_MHP_MEMMAP_ON_MEMORY=y",
                "CONFIG_DEBUG_VM is not set"):
        assert sym in " ".join(kern.split()), sym
    assert "release:  6.12.117+deb12-cloud-amd64" in kern
    assert "x86_64-linux-gnu-gcc-12" in kern
    mach = body.split("The machine\n")[1].split("Console\n")[0]
    assert "QEMU:     7.2.22" in mach and "machine:  pc, accel tcg" in mach and "memory:   1024M" in mach
    assert "memhp run --kernel debian:6.12 -k 'dimm_lifecycle and block_sized_dimm_lifecycle'" in \
        " ".join(body.split("How to reproduce\n")[1].replace("\\\n", " ").split())
    assert "Bisection" not in body and "#regzbot" not in body
    _check_wrap(body, run)
    _no_leaks(render(run, "email"))


def test_crash_email_quotes_the_console_around_the_splat(tmp_path):
    run = load_run(FAULTS)
    msg = _read_mbox(render(run, "email"), tmp_path)
    assert msg["Subject"].startswith("[REGRESSION] mm/memory_hotplug: Kernel panic - not syncing: sysrq triggered "
                                     "crash in f1_guest_panic (+1 more) (6.12.117")
    body = _body(msg)
    console = body.split("\nConsole\n")[1].split("\nHow to reproduce\n")[0]
    crash = next(s for s in run.scenarios if s.outcome == "crash")
    lines = crash.console.splitlines()
    splat = lines[crash.splat.line]
    assert splat.endswith("Kernel panic - not syncing: sysrq triggered crash")
    # verbatim: the splat line and the lines before and after it, unchanged but for terminal escapes
    want = [_ANSI.sub("", x).rstrip() for x in lines[crash.splat.line - 3:crash.splat.line + 5]]
    assert "\n".join(want) in console
    assert "\x1b" not in console
    assert "could not run because QEMU or the host failed" in body
    _check_wrap(body, run)
    _no_leaks(render(run, "email"))


def test_bisected_email(tmp_path):
    run = load_run(derived_failed_run(tmp_path, BISECT))
    msg = _read_mbox(render(run, "email"), tmp_path)
    assert msg["To"] == "David Hildenbrand <david@redhat.com>, Oscar Salvador <osalvador@suse.de>"
    assert [a.strip() for a in msg["Cc"].split(",")] == ["linux-mm@kvack.org", "linux-kernel@vger.kernel.org",
                                                         REGRESSIONS]
    body = _body(msg)
    sha = BISECT["first_bad"]["sha"]
    assert f'  commit {sha[:12]} ("mm/memory_hotplug: account vmemmap pages twice")\n' in body
    # the robot's table: header with both commits, then one row per count
    assert re.search(rf"\|\s+\| {BISECT['parent']['sha'][:12]}\s+\| {sha[:12]}\s+\|", body)
    assert re.search(r"\| runs\s+\| 10\s+\| 10\s+\|", body)
    # a label too long for 75 columns continues on rows with empty count cells
    rows = [x for x in body.splitlines() if x.startswith("| ")]
    i = next(i for i, x in enumerate(rows) if x.startswith("| dimm_lifecycle::"))
    assert re.search(r"\| 0\s+\| 10\s+\|$", rows[i])
    label = "".join(x.split("|")[1].strip() for x in rows[i:i + 2])
    assert label.replace(" ", "") == "dimm_lifecycle::block_sized_dimm_lifecycleFAIL"
    assert all(len(x) <= WIDTH for x in rows)
    # regzbot: a paragraph of its own
    assert f"\n\n#regzbot introduced: {sha}\n" in body + "\n"
    _check_wrap(body, run)


def test_clean_run_is_no_regression(tmp_path):
    run = load_run(LIFECYCLE)
    msg = _read_mbox(render(run, "email"), tmp_path)
    assert not msg["Subject"].startswith("[REGRESSION]")
    assert msg["Subject"] == "[memhp] mm/memory_hotplug: all 1 scenarios passed (6.12.117+deb12-cloud-amd64)"
    assert msg["Cc"] is None
    body = _body(msg)
    assert "Nothing: every scenario passed or was skipped." in body
    _check_wrap(body, run)


def _no_leaks(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text
    assert "/.cache/" not in text and "/tmp/" not in text and "/root/" not in text


def test_tracebacks_and_cache_paths_are_stripped(tmp_path):
    run = load_run(FAULTS)
    infra = run.scenarios[2]
    hang = run.scenarios[1]
    noisy = ("InfraError: QEMU exited with status -9\nTraceback (most recent call last):\n"
             '  File "/work/main/harness/machine.py", line 10, in start\n    raise X\n'
             "InfraError: see /root/.cache/memhp/artifacts/run-1/test_x/qemu.log and /tmp/memhp-abc/qmp.sock")
    run2 = replace(run, scenarios=(run.scenarios[0], replace(hang, message=noisy), infra) + run.scenarios[3:])
    text = render(run2, "email")
    _no_leaks(text)
    assert "qemu.log" in text and "InfraError: QEMU exited with status -9" in text


@pytest.mark.parametrize("bad_body_line", ["From the console: x"])
def test_mbox_escapes_from_lines(tmp_path, bad_body_line):
    run = load_run(FAULTS)
    crash = run.scenarios[0]
    run2 = replace(run, scenarios=(replace(crash, splat=replace(crash.splat, line=-1,
                                                                text=bad_body_line + "\nmore")),))
    text = render(run2, "email")
    assert "\n>From the console: x" in text
    msg = _read_mbox(text, tmp_path)
    assert bad_body_line in _body(msg)


def test_config_differences_from_the_fragment(tmp_path):
    from harness.reports.mail import config_differences
    frag = tmp_path / "memhp.config"
    frag.write_text("CONFIG_MEMCG=y\nCONFIG_VIRTIO_MEM=y\n# CONFIG_DEBUG_VM is not set\nCONFIG_NOT_IN_DEBIAN=y\n")
    k = load_run(FAULTS).kernel
    assert config_differences(k, frag) == ["CONFIG_VIRTIO_MEM=m (memhp.config: y)",
                                           "CONFIG_NOT_IN_DEBIAN=n (memhp.config: y)"]
    assert config_differences(replace(k, config=None), frag) == []


def test_real_fail_email(tmp_path):
    run = load_run(LEAK_FAIL)
    msg = _read_mbox(render(run, "email"), tmp_path)
    subj = msg["Subject"]
    assert subj.startswith("[REGRESSION] mm/memory_hotplug: leak_add_remove_cycles: free memory given back by")
    assert subj.endswith(" (6.12.117+deb12-cloud-amd64)")
    body = _body(msg)
    for section in SECTIONS:
        assert f"\n{section}\n{'-' * len(section)}\n" in body, section
    what = body.split("What failed\n")[1].split("The kernel\n")[0]
    assert "    expected: '[-60, 68]'\n    observed: -151.4\n    rule:     0 blocks per cycle" in what
    _check_wrap(body, run)
    _no_leaks(render(run, "email"))


def test_infra_only_run_is_no_regression(tmp_path):
    run = load_run(SUITE)
    msg = _read_mbox(render(run, "email"), tmp_path)
    n, infra = len(run.scenarios), run.count("infra")
    assert infra and not run.failed
    assert msg["Subject"] == (f"[memhp] mm/memory_hotplug: no kernel failure; {infra} of {n} scenarios could not "
                              f"run (6.12.117+deb12-cloud-amd64)")
    body = _body(msg)
    assert "could not run because QEMU or the host failed (multiblock::busy_normal_blocks_roll_back)" in \
        " ".join(body.split())
    _check_wrap(body, run)
    _no_leaks(render(run, "email"))


def test_default_fragments_are_not_named_as_the_users_own():
    from harness.reports.mail import _default_fragment
    assert _default_fragment("/src/memhp/kconfigs/memhp.config")
    assert _default_fragment("/src/memhp/kconfigs/trim.config")
    assert not _default_fragment("/home/dev/my.config")
    assert not _default_fragment("/src/memhp/kconfigs/debug/debug.config")   # opt-in: the user passed it
