"""A regression report for the kernel lists, as an mbox that `git send-email` and mail clients read.

Plain text, wrapped at 75 columns; console lines and the QEMU command's words are kept
verbatim (a console line may be longer). Sections, in the order a maintainer reads them:
what failed (expected / observed / rule per check), the kernel (with the --patch series), the
machine, the console excerpt (decoded by the tree's scripts/decode_stacktrace.sh when
harness.reports.decode found a vmlinux with debug info; else one sentence on how), how to
reproduce, and, when the run came from a bisection, the first bad commit, a good/bad
run-count table in the kernel test robot's style and a `#regzbot introduced:` paragraph of
its own. Nothing of memhp's insides: no Python traceback, no host path.

The module is named mail, not email, so it does not shadow the standard library.
"""
from __future__ import annotations

import email.policy
import email.utils
import hashlib
import re
import shlex
import textwrap
from email.message import EmailMessage
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from harness.reports import decode
from harness.reports.rundir import Kernel, RunData, Scenario, scrub_paths

WIDTH = 75
LINUX_MM = "linux-mm@kvack.org"
REGRESSIONS = "regressions@lists.linux.dev"
FROM = "memhp <memhp@localhost>"
CONFIG_SYMBOLS = ("MEMCG", "HUGETLB_PAGE", "MHP_MEMMAP_ON_MEMORY", "DEBUG_VM",
                  "MEMORY_HOTPLUG", "MEMORY_HOTREMOVE", "SPARSEMEM_VMEMMAP")
CONSOLE_BEFORE, CONSOLE_AFTER, CONSOLE_TAIL = decode.BEFORE, decode.AFTER, 20
SECTIONS = ("What failed", "The kernel", "The machine", "Console", "How to reproduce")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


class _Body:
    """Lines of the body: prose is wrapped at WIDTH, verbatim lines are not."""

    def __init__(self, run: RunData):
        self.lines: List[str] = []
        self.roots = [run.path]

    def _clean(self, text: str) -> str:
        return _ANSI.sub(" ", scrub_paths(strip_traceback(text), self.roots))

    def para(self, text: str, indent: str = "", hanging: Optional[str] = None) -> None:
        text = " ".join(self._clean(text).split())
        self.lines += textwrap.wrap(text, WIDTH, initial_indent=indent,
                                    subsequent_indent=indent if hanging is None else hanging,
                                    break_on_hyphens=False) or [""]

    def field(self, label: str, value: str, indent: str = "  ", pad: int = 10) -> None:
        text = " ".join(self._clean(value).split())
        self.lines += textwrap.wrap(text, WIDTH, initial_indent=indent + f"{label + ':':<{pad}}",
                                    subsequent_indent=indent + " " * pad, break_on_hyphens=False,
                                    break_long_words=False) or [indent + label + ":"]

    def verbatim(self, lines: Sequence[str], indent: str = "") -> None:
        self.lines += [indent + _ANSI.sub("", scrub_paths(x, self.roots)).rstrip() for x in lines]

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def heading(self, text: str) -> None:
        self.blank()
        self.lines += [text, "-" * len(text)]

    def text(self) -> str:
        while self.lines and self.lines[-1] == "":
            self.lines.pop()
        return "\n".join(self.lines) + "\n"


def strip_traceback(text: str) -> str:
    """Drop Python traceback blocks (memhp's insides), keep the exception's own line."""
    out, skipping = [], False
    for line in text.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            skipping = True
            continue
        if skipping and (line.startswith(" ") or not line.strip()):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out)


_PRINTK = re.compile(r"^(?:<\d+>)?(?:\[\s*\d+\.\d+\]\s*)?(?:\[\s*[TC]\d+\]\s*)?")


def splat_title(kind: str, text: str) -> str:
    """A splat in a few words: "WARNING at mm/memory_hotplug.c:1234", "BUG: Bad page state in process sh"."""
    first = _PRINTK.sub("", (text.strip().splitlines() or [kind])[0]).strip()
    m = re.search(r"\bat ([\w./-]+\.[ch]:\d+)", first)
    if kind == "warning" and m:
        return f"WARNING at {m.group(1)}"
    first = re.sub(r"\s+CPU: \d+.*$", "", first)
    return first[:70]


def what_failed(s: Scenario) -> str:
    """A short phrase for the subject: the check, the splat or the hang of one scenario."""
    if s.outcome == "crash" and s.splat:
        return f"{splat_title(s.splat.kind, s.splat.text)} in {s.case}"
    if s.outcome == "hang":
        return f"{s.case} hangs"
    if s.checks:
        return f"{s.case}: {s.checks[0].name}"
    first = " ".join(strip_traceback(s.message).split())
    return f"{s.case}: {first}" if first else f"{s.case} fails"


def subject(run: RunData) -> str:
    rel = run.kernel.release or run.kernel.spec or "unknown kernel"
    bad = run.failed
    if not bad:
        infra = run.count("infra")
        if not infra:
            return f"[memhp] mm/memory_hotplug: all {len(run.scenarios)} scenarios passed ({rel})"
        return (f"[memhp] mm/memory_hotplug: no kernel failure; {infra} of {len(run.scenarios)} scenarios "
                f"could not run ({rel})")
    what = scrub_paths(what_failed(bad[0]))
    if len(what) > 90:
        what = what[:87].rstrip() + "..."
    more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
    return f"[REGRESSION] mm/memory_hotplug: {what}{more} ({rel})"


def recipients(run: RunData) -> Tuple[List[str], List[str]]:
    """To and Cc: the bisection's get_maintainer.pl output when there is one, linux-mm otherwise."""
    if run.bisect and (run.bisect.to or run.bisect.cc):
        to, cc = list(run.bisect.to), list(run.bisect.cc)
        if not to:
            to, cc = cc[:1], cc[1:]
    else:
        to, cc = [LINUX_MM], []
    if run.failed and REGRESSIONS not in to + cc:
        cc.append(REGRESSIONS)
    return to, cc


def config_differences(k: Kernel, fragment: Optional[Path] = None) -> List[str]:
    """The symbols kconfigs/memhp.config sets that this kernel's config has otherwise."""
    from harness.kernels.kconfig import dropped_symbols, parse_fragment
    frag = fragment or Path(__file__).resolve().parents[2] / "kconfigs" / "memhp.config"
    if k.config is None or not frag.is_file():
        return []
    # kconfig keeps string values quoted; RunData's config holds them unquoted.
    want = {s: v.strip('"') for s, v in parse_fragment(frag.read_text()).items()}
    return [f"{s}={got} (memhp.config: {w})" for s, w, got in dropped_symbols(want, k.config)]


def _quote_argv(argv: str, width: int = WIDTH) -> List[str]:
    """The QEMU command as shell lines of at most WIDTH columns, continued with backslashes.

    An option stays on the line of its value; a single word longer than the width (a long
    -append) stands alone on its line, unbroken, since breaking it would change the command."""
    try:
        words = [shlex.quote(w) for w in shlex.split(argv)]
    except ValueError:
        words = argv.split()
    units: List[str] = []
    for w in words:
        if units and units[-1].startswith("-") and " " not in units[-1] and not w.startswith("-") \
                and 4 + len(units[-1]) + 1 + len(w) + 2 <= width:
            units[-1] += " " + w
        else:
            units.append(w)
    lines: List[str] = []
    cur = ""
    for u in units:
        if not cur:
            cur = u
        elif len(cur) + 1 + len(u) + 2 <= width:
            cur += " " + u
        else:
            lines.append(cur + " \\")
            cur = "    " + u
    if cur:
        lines.append(cur)
    return lines


def _default_fragment(path: str) -> bool:
    """kconfigs/*.config, which every source build merges: not the user's --fragment."""
    from harness.kernels.kbuild import default_fragments
    return any(path.endswith(f"kconfigs/{p.name}") for p in default_fragments())


def _k_filter(s: Scenario) -> str:
    """A pytest -k expression that selects this scenario alone (parameters included)."""
    m = re.match(r"^(\w+)(?:\[(.+)\])?$", s.case)
    if not m:
        return s.case
    parts = [s.module, m.group(1)] + ([m.group(2)] if m.group(2) else [])
    return " and ".join(parts)


def robot_table(run: RunData) -> List[str]:
    """The kernel test robot's parent-vs-culprit table of run counts."""
    b = run.bisect
    assert b is not None
    left, right = (b.parent[:12] or "parent"), b.first_bad[:12]
    cw = max(12, len(left), len(right))
    w = min(max([len(c.label) for c in b.counts] + [24]), WIDTH - 2 * (cw + 3) - 4)
    sep = f"+{'-' * (w + 2)}+{'-' * (cw + 2)}+{'-' * (cw + 2)}+"
    out = [sep, f"| {'':<{w}} | {left:<{cw}} | {right:<{cw}} |", sep]
    for c in b.counts:
        # A long label continues on rows of its own, so the table stays within WIDTH.
        parts = [x.strip() for x in textwrap.wrap(c.label.replace("::", ":: "), w, break_on_hyphens=False)] or [""]
        out.append(f"| {parts[0]:<{w}} | {c.good:<{cw}} | {c.bad:<{cw}} |")
        out += [f"| {p:<{w}} | {'':<{cw}} | {'':<{cw}} |" for p in parts[1:]]
    out.append(sep)
    return out


def body(run: RunData) -> str:
    k, m = run.kernel, run.machine
    b = _Body(run)
    bad = run.failed
    rel = k.release or "an unknown release"
    if bad:
        b.para(f"memhp, a test that hot-adds and removes pc-dimm memory in QEMU guests and checks "
               f"what the kernel reports in sysfs and procfs, found {len(bad)} of {len(run.scenarios)} "
               f"scenarios failing on {rel}"
               + (f" (first bad commit {run.bisect.first_bad[:12]})" if run.bisect else "") + ".")
    else:
        b.para(f"memhp ran {len(run.scenarios)} memory hotplug scenarios on {rel}; none failed "
               f"({run.count('pass')} passed, {run.count('skip')} skipped, {run.count('infra')} could not run).")

    b.heading("What failed")
    if not bad:
        b.para("Nothing: every scenario passed or was skipped.")
    for s in bad:
        b.blank()
        b.para(f"{s.name}: {s.outcome.upper()} after {s.duration:.1f}s")
        if s.checks:
            for c in s.checks:
                b.para(c.name, "  ", "    ")
                b.field("expected", c.expected, "    ")
                b.field("observed", c.observed, "    ")
                b.field("rule", c.rule, "    ")
        elif s.outcome == "crash" and s.splat:
            first = s.splat.text.strip().splitlines()[0] if s.splat.text.strip() else s.splat.kind
            b.para(f"The console shows a {s.splat.kind}:", "  ")
            b.verbatim([first], "    ")
        else:
            msg = strip_traceback(s.message).split("\n--- console tail ---")[0]
            for line in msg.splitlines()[:8]:
                b.para(line, "  ", "    ")
    infra = [s for s in run.scenarios if s.outcome == "infra"]
    if infra:
        b.blank()
        b.para(f"{len(infra)} scenario(s) could not run because QEMU or the host failed "
               f"({', '.join(s.name for s in infra)}); they say nothing about the kernel.")

    b.heading("The kernel")
    b.field("release", k.release or "unknown")
    if k.spec:
        b.field("source", k.spec)
    if k.tree:
        b.field("tree", k.tree)
    if k.commit:
        b.field("commit", f'{k.commit}' + (f' ("{k.commit_subject}")' if k.commit_subject else ""))
    if k.patches:
        b.field("patches", "; ".join(k.patch_lines()))
        if k.patchset_hash:
            b.para(f"patchset hash (KCIDB's): {k.patchset_hash}", "  ", "  ")
    if k.config is not None:
        syms = []
        for sym in CONFIG_SYMBOLS:
            v = k.symbol(sym)
            syms.append(f"CONFIG_{sym}={v}" if v != "n" else f"CONFIG_{sym} is not set")
        b.field("config", "; ".join(syms))
        diff = config_differences(k)
        if diff:
            b.field("vs memhp", "differs from kconfigs/memhp.config: " + "; ".join(diff))
    else:
        b.field("config", "not known (no .config found for this kernel)")
    if k.compiler:
        b.field("compiler", k.compiler)
    f = run.facts
    if f:
        b.field("facts", f"memory block {int(f.get('block_size', 0)) >> 20} MiB, struct page "
                         f"{f.get('struct_page')} bytes (from {f.get('struct_page_source')}), pageblock order "
                         f"{f.get('pageblock_order')}, memmap_on_memory={f.get('param')}")

    b.heading("The machine")
    mem = m.memory.split(",")
    b.field("QEMU", (m.qemu_version or "version unknown") + (f" ({m.qemu_package})" if m.qemu_package else ""))
    b.field("machine", f"{m.machine or '?'}, accel {m.accel or '?'}, cpu {m.cpu or '?'}, {m.smp or '?'} vCPUs")
    b.field("memory", f"{mem[0] or '?'}" + (f" ({', '.join(mem[1:])})" if len(mem) > 1 else ""))
    if m.cmdline:
        b.field("cmdline", m.cmdline)
    if m.argv:
        b.blank()
        b.para("The QEMU command line (kernel and initramfs named by file name):")
        b.verbatim(_quote_argv(m.argv, WIDTH - 2), "  ")

    b.heading("Console")
    shown = False
    for s in bad:
        lines = s.console.splitlines()
        if s.splat and s.splat.line >= 0:
            b.blank()
            if s.decoded:
                b.para(f"{s.name}, around the {s.splat.kind}. {run.decode_note}")
                b.verbatim(s.decoded.splitlines())
            else:
                b.para(f"{s.name}, around the {s.splat.kind}:")
                b.verbatim(s.splat_excerpt(CONSOLE_BEFORE, CONSOLE_AFTER))
                b.blank()
                b.para(run.decode_note or decode.how_to(run))
            shown = True
        elif s.splat:
            b.blank()
            b.para(f"{s.name}, the {s.splat.kind} as memhp recorded it:")
            b.verbatim(s.splat.text.splitlines()[:1 + CONSOLE_AFTER])
            shown = True
        elif lines:
            b.blank()
            b.para(f"{s.name}, the last {min(len(lines), CONSOLE_TAIL)} console lines of the scenario "
                   f"(no splat):")
            b.verbatim(lines[-CONSOLE_TAIL:])
            shown = True
    if not shown:
        b.para("No console excerpt: " + ("no scenario failed." if not bad else "nothing was captured."))

    b.heading("How to reproduce")
    b.para("With memhp (the test harness) installed:")
    spec = k.spec or "PATH/bzImage"
    for s in bad[:3] or [None]:
        cmd = f"memhp run --kernel {shlex.quote(spec)}" + "".join(
            f" --fragment {shlex.quote(f.rsplit('/', 1)[-1])}" for f in k.fragments if not _default_fragment(f)) \
            + "".join(f" --patch {shlex.quote(p.rsplit('/', 1)[-1])}" for p in k.patches)
        k_opt = f"-k {shlex.quote(_k_filter(s))}" if s else ""
        # Shell lines within the width, an option on the line of its value (long --patch names).
        b.verbatim(_quote_argv(f"{cmd} {k_opt}".rstrip(), WIDTH - 2), "  ")
    _standalone(b, run, bad)

    if run.bisect:
        bi = run.bisect
        b.heading("Bisection")
        b.para("The first bad commit is:")
        # The kernel's way to name a commit (12-char sha); a reference is never wrapped.
        b.verbatim([f'commit {bi.first_bad[:12]} ("{bi.first_bad_subject}")' if bi.first_bad_subject
                    else f"commit {bi.first_bad}"], "  ")
        if bi.parent:
            b.para(f"Its parent {bi.parent[:12]} is good. Runs on each:")
        if bi.counts:
            b.verbatim(robot_table(run))
        b.blank()
        b.lines.append(f"#regzbot introduced: {bi.first_bad}")
    return b.text()


def _standalone(b: "_Body", run: RunData, bad: Sequence[Scenario]) -> None:
    """The standalone reproducer: where it is, what it needs, and the steps it replays."""
    from harness.reports import reproducer
    s = next((x for x in bad if x.artifacts and x.argv), None)
    if s is None:
        b.para("No standalone reproducer: memhp recorded no QEMU command line for a failed scenario.")
        return
    b.para(f"Without memhp: {reproducer.SCRIPT_NAME} (memhp report RUN_DIR --format reproducer writes it; "
           f"memhp run leaves one in each failed scenario's folder) needs only bash, QEMU, python3 and ssh. "
           f"It boots the kernel with the QEMU command line above, replays the steps below in their "
           f"order (QMP over the monitor socket, shell commands over ssh), waits for the same QMP "
           f"events, prints the guest's state where the check failed, and says whether the same "
           f"observations came back:")
    b.verbatim([f"KERNEL={scrub_paths(reproducer.parse_argv(s.argv).get('kernel', 'bzImage'))} \\",
                f"    INITRD=initramfs.cpio.gz bash {reproducer.SCRIPT_NAME}"], "  ")
    steps = reproducer.steps_summary(s, WIDTH - 4)
    if steps:
        b.para(f"The steps of {s.name} (reads left out):")
        b.verbatim(steps, "  ")


def message(run: RunData) -> EmailMessage:
    to, cc = recipients(run)
    msg = EmailMessage(policy=email.policy.default)
    msg["From"] = FROM
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject(run)
    msg["Date"] = email.utils.format_datetime(run.finished)
    digest = hashlib.sha256(json_key(run).encode()).hexdigest()[:20]
    msg["Message-ID"] = f"<memhp-{digest}@localhost>"
    msg.set_content(body(run), charset="utf-8", cte="8bit")
    return msg


def json_key(run: RunData) -> str:
    import json
    return json.dumps(run.raw, sort_keys=True, default=str)


def render(run: RunData) -> str:
    """One message in mbox form (a `From ` separator line, as git format-patch writes it)."""
    text = message(run).as_string(policy=email.policy.default.clone(linesep="\n", max_line_length=WIDTH + 3))
    # mbox: a body line starting with "From " would be read as the next message.
    text = re.sub(r"(?m)^From ", ">From ", text)
    return "From memhp Mon Sep 17 00:00:00 2001\n" + text
