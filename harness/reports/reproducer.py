"""The standalone reproducer: one bash script per failed scenario, needing only bash, QEMU,
python3 (standard library) and ssh; no memhp.

It embeds the recorded QEMU argv, the replay plan (harness.reports.replaydriver.make_plan over
the scenario's qmp.jsonl and commands.jsonl), memhp's failed checks, the guest image's SSH key,
and the driver's own source. KERNEL and INITRD default to the recorded paths and can be set
in the environment. Exit: 0 the same observations came back, 1 they differ, 2 something
missing on this host, 3 QEMU, the monitor or SSH failed.
"""
from __future__ import annotations

import base64
import re
import json
import shlex
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness.reports import replaydriver
from harness.reports.rundir import RunData, Scenario, parse_argv

SCRIPT_NAME = "reproduce.sh"


def pick(run: RunData, name: Optional[str] = None) -> Optional[Scenario]:
    """The scenario named (by name or artifacts folder name), else the first failed one with a
    recorded QEMU command line, else the first with one."""
    cands = [s for s in run.scenarios if s.artifacts and s.argv]
    if name:
        return next((s for s in cands if name in (s.name, s.case, s.artifacts.name)), None)
    return next((s for s in cands if s.failed), None) or (cands[0] if cands else None)


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""


def scenario_data(s: Scenario) -> Dict[str, Any]:
    """What a replay of s needs: argv words, plan, failure time, memhp's failed checks, splats."""
    art = s.artifacts
    plan = replaydriver.make_plan(_read(art / "qmp.jsonl"), _read(art / "commands.jsonl")) if art else []
    rows = s.measurements.get("failed_checks") if isinstance(s.measurements.get("failed_checks"), list) else []
    failed_at = next((r.get("t") for r in rows if isinstance(r, dict) and r.get("t")), None)
    checks = [{"name": c.name, "expected": c.expected, "observed": c.observed, "rule": c.rule} for c in s.checks]
    return {"scenario": s.name, "outcome": s.outcome, "argv": shlex.split(s.argv), "plan": plan,
            "failed_at": failed_at, "checks": checks,
            "splats": [s.splat.text.splitlines()[0]] if s.splat and s.splat.text else []}


def ssh_key_for(argv: str) -> Optional[Path]:
    """The guest image's private key: beside the recorded initramfs."""
    initrd = parse_argv(argv).get("initrd")
    key = Path(initrd).parent / "id_ed25519" if initrd else None
    return key if key is not None and key.is_file() else None


def script(run: RunData, s: Scenario) -> str:
    data = scenario_data(s)
    av = parse_argv(s.argv)
    key = ssh_key_for(s.argv)
    key_text = _read(key) if key else ""
    blob = "\n".join(textwrap.wrap(base64.b64encode(json.dumps(data).encode()).decode(), 76))
    what = [f"#   {c['name']}: expected {c['expected']}, observed {c['observed']}" for c in data["checks"]][:6]
    if data["splats"]:
        what.append(f"#   console: {data['splats'][0][:100]}")
    spec = run.kernel.spec or "?"
    how_kernel = (f"memhp kernel fetch {spec}   (or: apt-get download linux-image-{run.kernel.release}-unsigned; "
                  f"dpkg-deb -x)" if spec.startswith("debian:") else
                  f"memhp kernel fetch {spec}, with the run's --patch and --fragment options"
                  + "".join(f" --patch {Path(p).name}" for p in run.kernel.patches))
    lines = [
        "#!/bin/bash",
        f"# Standalone reproducer for {s.name} on Linux {run.kernel.release or '?'} ({spec}), written by memhp.",
        "# Needs bash, qemu-system-x86_64, python3 (standard library only) and ssh; not memhp.",
        "# It boots the kernel with the QEMU command line memhp used, sends memhp's QMP commands over the",
        "# monitor socket and runs memhp's guest commands over ssh, in their original order, waits for the",
        "# same QMP events, prints the guest's state where memhp's check failed, and compares what the",
        "# guest shows with what memhp recorded.",
        f"# memhp's verdict: {s.outcome.upper()}" + (":" if what else ""),
        *what,
        "# KERNEL: the kernel image; to get it: " + how_kernel,
        *(["#         memhp booted the bzImage's uncompressed vmlinux through its PVH entry (the recorded path);",
           "#         the bzImage itself boots the same kernel: KERNEL=/path/to/vmlinuz or bzImage."]
          if Path(av.get("kernel", "")).name == "vmlinux" else []),
        "# INITRD: memhp's guest initramfs (busybox + dropbear), made by `memhp boot --kernel SPEC --dry-run`;",
        "#         any initramfs that prints MEMHP-GUEST-READY and runs sshd on port 22 with this key will do.",
        "# Exit: 0 the same observations came back, 1 they differ, 2 missing here, 3 QEMU/QMP/SSH failed.",
        "set -eu",
        f"KERNEL=${{KERNEL:-{shlex.quote(av.get('kernel', ''))}}}",
        f"INITRD=${{INITRD:-{shlex.quote(av.get('initrd', ''))}}}",
        f"QEMU=${{QEMU:-{shlex.quote(av.get('binary', 'qemu-system-x86_64'))}}}",
        'for x in "$QEMU" python3 ssh; do',
        '    command -v "$x" >/dev/null || { echo "$0: $x is not installed" >&2; exit 2; }',
        "done",
        '[ -f "$KERNEL" ] || { echo "$0: kernel image $KERNEL not found; set KERNEL=" >&2; exit 2; }',
        '[ -f "$INITRD" ] || { echo "$0: initramfs $INITRD not found; set INITRD=" >&2; exit 2; }',
        'WORK=$(mktemp -d "${TMPDIR:-/tmp}/memhp-repro-XXXXXX")',
        'echo "reproducer: logs (console.log, qemu.log) in $WORK"',
        'if [ -n "${SSH_KEY:-}" ]; then cp "$SSH_KEY" "$WORK/key"; else',
        "cat > \"$WORK/key\" <<'MEMHP_KEY'",
        key_text.rstrip("\n") if key_text else "",
        "MEMHP_KEY",
        "fi",
        'chmod 600 "$WORK/key"',
        "exec python3 - \"$KERNEL\" \"$INITRD\" \"$WORK\" \"$QEMU\" <<'MEMHP_PY'",
        Path(replaydriver.__file__).read_text().rstrip("\n"),
        "",
        "",
        "def _main():",
        "    kernel, initrd, work, qemu = sys.argv[1:5]",
        "    data = json.loads(__import__('base64').b64decode(''.join(DATA.split())).decode())",
        "    argv = [qemu] + data['argv'][1:]",
        "    print(f\"reproducer: {data['scenario']} (memhp said {data['outcome'].upper()})\")",
        "    try:",
        "        same, diffs = replay(argv, data['plan'], os.path.join(work, 'key'), kernel, initrd,",
        "                             data['failed_at'], data['checks'], data['splats'], workdir=work,",
        "                             preexec_fn=kill_with_parent())",
        "    except Failure as e:",
        "        print(f'reproducer: {e}')",
        "        sys.exit(3)",
        "    print(verdict(same, diffs, data['checks'], data['splats']))",
        "    sys.exit(0 if same else 1)",
        "",
        "",
        'DATA = """',
        blob,
        '"""',
        "_main()",
        "MEMHP_PY",
    ]
    return "\n".join(lines) + "\n"


def render(run: RunData) -> str:
    s = pick(run)
    if s is None:
        return "#!/bin/bash\necho 'memhp: this run recorded no QEMU command line to reproduce' >&2\nexit 2\n"
    data = scenario_data(s)
    if not replaydriver.comparable(data["plan"]) and not data["splats"]:
        return ("#!/bin/bash\necho 'memhp: this run recorded no guest output to compare (a run from before "
                "commands.jsonl kept outputs)' >&2\nexit 2\n")
    return script(run, s)


def write_all(run: RunData) -> List[Path]:
    """reproduce.sh in every failed scenario's folder, and the first one in the run folder."""
    out = []
    for s in run.failed:
        data = scenario_data(s) if s.artifacts and s.argv else None
        if data and (replaydriver.comparable(data["plan"]) or data["splats"]):
            p = s.artifacts / SCRIPT_NAME
            p.write_text(script(run, s))
            p.chmod(0o755)
            out.append(p)
    if out:
        top = run.path / SCRIPT_NAME
        top.write_text(out[0].read_text())
        top.chmod(0o755)
        out.insert(0, top)
    return out


def steps_summary(s: Scenario, width: int = 72, limit: int = 24) -> List[str]:
    """The replay's actions a reader needs, one line each: QMP commands (queries left out) and the
    guest commands that write (reads left out), in order."""
    out = []
    for st in scenario_data(s)["plan"]:
        if st["kind"] == "qmp":
            if st["execute"].startswith("query-"):
                continue
            args = " ".join(f"{k}={v}" for k, v in (st["arguments"] or {}).items())
            line = f"qmp {st['execute']} {args}".rstrip()
        else:
            if not re.match(r"^echo \S+ > /\S+$", st["cmd"]):   # a write, as Guest.write sends it
                continue
            line = f"sh  {st['cmd']}"
        out.append(line if len(line) <= width else line[:width - 3] + "...")
    return out[:limit] + (["..."] if len(out) > limit else [])
