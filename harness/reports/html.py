"""One self-contained HTML page: kernel facts, the scenario table, the memmap-cost table and an
SVG memory map per step of every hot-add scenario that recorded one (harness.reports.memmap).

No network and no script: CSS and SVG are inline, details open with <details>. In each map,
every memory block present at that step is one `rect.block` (data-block = its id), coloured
by zone (or offline); blocks of a DIMM that are gone at that step, or not added yet, are
`rect.ghost`. Inside each block the first pages that hold its own memmap are a
`rect.memmap`, drawn to scale: a 128 MiB block is 128 px wide, so its 2 MiB memmap is 2 px.
"""
from __future__ import annotations

import html
import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from harness.reports.memmap import cost_device
from harness.reports.rundir import RunData, Scenario, scrub_paths

BLOCK_W, BLOCK_H, PER_ROW = 128, 46, 8
LEFT, TOP, ROW_GAP = 10, 34, 34
ZONE_COLOURS = {"DMA": "#f0b27a", "DMA32": "#f7dc6f", "Normal": "#85c1e9", "Movable": "#82e0aa",
                "mixed": "#d7bde2", "offline": "#d5d8dc", "removed": "#ffffff", "not added": "#ffffff"}
MEMMAP_COLOUR = "#922b21"
UNPLUGGED_COLOUR = "#566573"   # virtio-mem sub-blocks not plugged inside an online block
OUTCOME_COLOURS = {"pass": "#1e8449", "fail": "#c0392b", "crash": "#7b241c", "hang": "#af601a",
                   "infra": "#5d6d7e", "skip": "#7f8c8d"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1c2833;max-width:1200px}
h1{font-size:1.5em;margin-bottom:4px} h2{margin-top:28px;border-bottom:1px solid #d5d8dc}
table{border-collapse:collapse;margin:8px 0} th,td{border:1px solid #d5d8dc;padding:4px 8px;text-align:left;
vertical-align:top} th{background:#f4f6f7} td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;color:#fff;font-weight:600;font-size:.85em}
pre{background:#f8f9f9;border:1px solid #e5e8e8;padding:8px;overflow-x:auto;font-size:.85em;margin:4px 0}
details summary{cursor:pointer;color:#2e4053} .facts td:first-child{font-weight:600}
.map{margin:10px 0 22px} .map h4{margin:6px 0 2px} .legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:14px;height:14px;border:1px solid #566573;vertical-align:middle;margin-right:4px}
svg text{font-family:system-ui,sans-serif} .note{color:#566573;font-size:.9em}
"""



def _applies(row) -> str:
    """yes/no and why; expect.decide()'s reasons already begin with "applies:" when it applied."""
    why = str(row.get("reason") or "")
    if why.startswith("applies"):
        return _e(why)
    return f"{'yes' if row.get('applies') else 'no'}: {_e(why)}"

def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _mib(n: int) -> str:
    if n >= 1 << 30 and n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):g} MiB"
    return f"{n >> 10} KiB"


def _badge(outcome: str) -> str:
    return f'<span class="badge" style="background:{OUTCOME_COLOURS.get(outcome, "#000")}">' \
           f'{_e(outcome.upper())}</span>'


# ---------------------------------------------------------------- memory map
def _class_of(block: Mapping[str, Any]) -> str:
    if block.get("state") != "online":
        return "offline"
    z = block.get("zone") or "mixed"
    return z if z in ZONE_COLOURS else "mixed"


def _rows(ids: Sequence[int]) -> List[List[int]]:
    """Block ids laid out in rows: consecutive ids run on, PER_ROW to a row; a gap starts a new row."""
    rows: List[List[int]] = []
    for b in ids:
        if rows and rows[-1][-1] == b - 1 and len(rows[-1]) < PER_ROW:
            rows[-1].append(b)
        else:
            rows.append([b])
    return rows


def svg_map(step: Mapping[str, Any], all_steps: Sequence[Mapping[str, Any]], index: int) -> str:
    """The SVG of one step. Ghost cells come from DIMMs seen in any step of the same scenario."""
    bs = int(step.get("block_size") or 0) or int(next((s.get("block_size") for s in all_steps
                                                       if s.get("block_size")), 0) or (128 << 20))
    page = int(step.get("page_size") or 4096)
    block_pages = bs // page
    blocks = {int(b["id"]): b for b in step.get("blocks", []) if isinstance(b, dict) and "id" in b}
    dimms_here = [d for d in step.get("dimms", []) if isinstance(d, dict)]
    every_dimm: Dict[str, Mapping[str, Any]] = {}
    for s in all_steps:
        for d in s.get("dimms", []):
            if isinstance(d, dict) and d.get("id") is not None:
                every_dimm.setdefault(str(d["id"]), d)
    earlier = {int(b["id"]) for s in all_steps[:index] for b in s.get("blocks", []) if isinstance(b, dict)}
    ghosts: Dict[int, str] = {}
    for d in every_dimm.values():
        first, n = int(d["addr"]) // bs, max(1, -(-int(d["size"]) // bs))
        for b in range(first, first + n):
            if b not in blocks:
                ghosts[b] = "removed" if b in earlier else "not added"
    ids = sorted(set(blocks) | set(ghosts))
    rows = _rows(ids)
    pos: Dict[int, Tuple[float, float]] = {}
    y = TOP
    parts: List[str] = []
    for i, row in enumerate(rows):
        if i and row[0] != rows[i - 1][-1] + 1:
            lo, hi = (rows[i - 1][-1] + 1) * bs, row[0] * bs
            parts.append(f'<text x="{LEFT}" y="{y + 2}" font-size="11" fill="#566573">'
                         f'no memory blocks {lo:#x}..{hi - 1:#x} ({_e(_mib(hi - lo))})</text>')
            y += 14
        for j, b in enumerate(row):
            pos[b] = (LEFT + j * BLOCK_W, y)
        y += BLOCK_H + ROW_GAP
    height = y + 4
    width = LEFT * 2 + PER_ROW * BLOCK_W

    cells: List[str] = []
    for b in ids:
        x, yy = pos[b]
        if b in blocks:
            blk = blocks[b]
            cls = _class_of(blk)
            hosted = int(blk.get("self_hosted_pages") or 0)
            tip = (f"memory{b} at {b * bs:#x}: {blk.get('state')}"
                   + (f", zone {blk.get('zone')}" if blk.get("zone") else "")
                   + (f", node {blk.get('node')}" if blk.get("node") is not None else "")
                   + (f"; {hosted} self-hosted memmap pages ({_mib(hosted * page)} of {_mib(bs)})"
                      if hosted else "; memmap not on this block"))
            cells.append(f'<rect class="block zone-{_e(cls)}" data-block="{b}" data-zone="{_e(blk.get("zone") or "")}" '
                         f'data-state="{_e(blk.get("state") or "")}" x="{x}" y="{yy}" width="{BLOCK_W}" '
                         f'height="{BLOCK_H}" fill="{ZONE_COLOURS[cls]}" stroke="#566573" stroke-width="0.5">'
                         f'<title>{_e(tip)}</title></rect>')
            if hosted:
                w = BLOCK_W * hosted / block_pages if block_pages else 0
                cells.append(f'<rect class="memmap" data-block="{b}" data-pages="{hosted}" x="{x}" y="{yy}" '
                             f'width="{w:.3f}" height="{BLOCK_H}" fill="{MEMMAP_COLOUR}">'
                             f'<title>{_e(tip)}</title></rect>')
            cells.extend(_subblock_cells(b, blk.get("subblocks"), bs, x, yy))
            label = cls if cls != "mixed" else "DMA+DMA32"
            cells.append(f'<text x="{x + 6}" y="{yy + 18}" font-size="12" fill="#1c2833">memory{b}</text>'
                         f'<text x="{x + 6}" y="{yy + 34}" font-size="11" fill="#1c2833">{_e(label)}'
                         f'{" · memmap" if hosted else ""}</text>')
        else:
            kind = ghosts[b]
            cells.append(f'<rect class="ghost" data-block="{b}" data-state="{kind}" x="{x}" y="{yy}" '
                         f'width="{BLOCK_W}" height="{BLOCK_H}" fill="url(#hatch)" stroke="#aab7b8" '
                         f'stroke-dasharray="4 3"><title>memory{b}: {kind}</title></rect>'
                         f'<text x="{x + 6}" y="{yy + 27}" font-size="11" fill="#7f8c8d">{kind}</text>')

    # Each DIMM's extent: a bracket under its blocks, per row, and its name on the first row.
    for d in every_dimm.values():
        present = any(str(x.get("id")) == str(d.get("id")) for x in dimms_here)
        seen_before = any(str(x.get("id")) == str(d.get("id")) for st in all_steps[:index]
                          for x in st.get("dimms", []) if isinstance(x, dict))
        gone = "" if present else (" (removed)" if seen_before else " (not added yet)")
        first, n = int(d["addr"]) // bs, max(1, -(-int(d["size"]) // bs))
        span = [b for b in range(first, first + n) if b in pos]
        for k, row in enumerate(rows):
            seg = [b for b in row if b in span]
            if not seg:
                continue
            x0, yy = pos[seg[0]]
            x1 = pos[seg[-1]][0] + BLOCK_W
            yb = yy + BLOCK_H + 4
            colour = "#1c2833" if present else "#aab7b8"
            cells.append(f'<path class="dimm" data-dimm="{_e(d["id"])}" d="M{x0 + 1},{yb} v6 H{x1 - 1} v-6" '
                         f'fill="none" stroke="{colour}" stroke-width="1.5"/>')
            if seg[0] == span[0]:
                hosted = sum(int(blocks[b].get("self_hosted_pages") or 0) for b in span if b in blocks)
                text = (f"{d['id']}: {_mib(int(d['size']))} at {int(d['addr']):#x}, node {d.get('node', 0)}"
                        + gone
                        + (f" — {sum(1 for b in span if b in blocks and blocks[b].get('self_hosted_pages'))} "
                           f"self-hosted memmaps, {_mib(hosted * page)}" if hosted else
                           (" — no self-hosted memmap" if present else "")))
                cells.append(f'<text x="{x0 + 2}" y="{yb + 20}" font-size="12" fill="{colour}">{_e(text)}</text>')

    defs = ('<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="#d5d8dc" stroke-width="2"/>'
            '</pattern></defs>')
    n_hosted = sum(int(b.get("self_hosted_pages") or 0) for b in blocks.values())
    head = (f'<text x="{LEFT}" y="18" font-size="13" font-weight="600">{_e(step.get("step", f"step {index + 1}"))}: '
            f'{len(blocks)} blocks of {_e(_mib(bs))}'
            + (f", {n_hosted} self-hosted memmap pages" if n_hosted else "") + '</text>')
    return (f'<svg class="memmap-svg" data-step="{_e(step.get("step", ""))}" xmlns="http://www.w3.org/2000/svg" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            + defs + head + "".join(parts) + "".join(cells) + "</svg>")


def _subblock_cells(b: int, sb: Any, bs: int, x: float, y: float) -> List[str]:
    """virtio-mem: one `rect.subblock-unplugged` per sub-block the device has not plugged, to scale
    (harness.reports.memmap's optional "subblocks" field; nothing when it is absent or malformed)."""
    if not isinstance(sb, Mapping) or not bs:
        return []
    try:
        size, idx = int(sb.get("size") or 0), [int(i) for i in sb.get("unplugged") or []]
    except (TypeError, ValueError):
        return []
    if size <= 0:
        return []
    w = BLOCK_W * size / bs
    return [f'<rect class="subblock-unplugged" data-block="{b}" data-subblock="{i}" x="{x + i * w:.3f}" y="{y}" '
            f'width="{w:.3f}" height="{BLOCK_H}" fill="{UNPLUGGED_COLOUR}">'
            f'<title>memory{b}: virtio-mem sub-block {i} ({_e(_mib(size))} at {b * bs + i * size:#x}) not plugged'
            f'</title></rect>' for i in idx if 0 <= i < bs // size]


def legend() -> str:
    items = [(ZONE_COLOURS[z], z if z != "mixed" else "DMA+DMA32 (several zones)")
             for z in ("DMA32", "mixed", "Normal", "Movable", "offline")]
    out = "".join(f'<span><i style="background:{c}"></i>{_e(t)}</span>' for c, t in items)
    out += f'<span><i style="background:{MEMMAP_COLOUR}"></i>self-hosted memmap (to scale)</span>'
    out += '<span><i style="background:#fff;border-style:dashed"></i>removed / not added yet</span>'
    out += f'<span><i style="background:{UNPLUGGED_COLOUR}"></i>virtio-mem sub-block not plugged (to scale)</span>'
    return f'<p class="legend">{out}</p>'


# ---------------------------------------------------------------- page
def _facts(run: RunData) -> str:
    k, m, f = run.kernel, run.machine, run.facts
    rows: List[Tuple[str, str]] = [("release", k.release or "unknown"), ("spec", k.spec)]
    if k.tree:
        rows.append(("tree", scrub_paths(k.tree)))
    if k.commit:
        rows.append(("commit", k.commit + (f' ("{k.commit_subject}")' if k.commit_subject else "")))
    if k.patches:
        rows.append(("patches", "; ".join(k.patch_lines())))
        if k.patchset_hash:
            rows.append(("patchset hash", k.patchset_hash))
    if k.compiler:
        rows.append(("compiler", k.compiler))
    if k.config is not None:
        rows.append(("config", ", ".join(f"{s}={k.symbol(s)}" for s in
                                         ("MEMCG", "HUGETLB_PAGE", "MHP_MEMMAP_ON_MEMORY", "DEBUG_VM"))))
    if f:
        rows += [("memory block", _mib(int(f.get("block_size") or 0))),
                 ("struct page", f"{f.get('struct_page')} bytes (from {f.get('struct_page_source')})"),
                 ("pageblock order", str(f.get("pageblock_order"))),
                 ("memmap_on_memory", str(f.get("param")))]
    rows.append(("QEMU", f"{m.qemu_version or '?'} {m.qemu_package}".strip()))
    rows.append(("machine", f"-M {m.machine or '?'}, accel {m.accel or '?'}, -m {m.memory or '?'}, -smp {m.smp or '?'}"))
    # scrub_paths: a fact's source may name a cached file ("config (/root/.cache/...)").
    return '<table class="facts">' + "".join(f"<tr><td>{_e(a)}</td><td>{_e(scrub_paths(b))}</td></tr>"
                                             for a, b in rows if b) + "</table>"


def _detail(s: Scenario, run: RunData) -> str:
    if s.checks:
        body = ("<table><tr><th>check</th><th>expected</th><th>observed</th><th>rule</th></tr>"
                + "".join(f"<tr><td>{_e(c.name)}</td><td>{_e(c.expected)}</td><td>{_e(c.observed)}</td>"
                          f"<td>{_e(c.rule)}</td></tr>" for c in s.checks) + "</table>")
    elif s.splat:
        body = (f'<p class="note">{_e(run.decode_note)}</p><pre class="decoded">{_e(_plain(s.decoded))}</pre>'
                if s.decoded else f"<pre>{_e(_plain(s.splat.text))}</pre>")
    elif s.message:
        body = f"<pre>{_e(_plain(scrub_paths(s.message, [run.path])))}</pre>"
    else:
        body = ""
    meas = {k: v for k, v in s.measurements.items() if k not in ("memory_map", "facts")}
    if meas:
        body += "<table>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in meas.items()) + "</table>"
    if not body:
        return ""
    return f"<details><summary>details</summary>{body}</details>"


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


def _plain(text: str) -> str:
    """Console text without terminal escapes and control characters (they render as boxes)."""
    return _ANSI.sub("", text)


def _summary(message: str) -> str:
    """The message's first line (a console tail follows it in HANG and CRASH messages)."""
    first = _plain(message).strip().splitlines()[0] if message.strip() else ""
    return first if len(first) <= 160 else first[:157] + "..."


def _checks_line(s: Scenario) -> str:
    if len(s.checks) == 1:
        c = s.checks[0]
        return _summary(f"{c.name}: expected {c.expected}, observed {c.observed}")
    return _summary(f"{len(s.checks)} checks failed: " + ", ".join(c.name for c in s.checks))


def _scenarios(run: RunData) -> str:
    rows = "".join(f"<tr><td>{_e(s.name)}</td><td>{_badge(s.outcome)}</td><td class=num>{s.duration:.1f}s</td>"
                   f"<td>{_e(_summary(s.message) if not s.checks else _checks_line(s))}{_detail(s, run)}</td></tr>"
                   for s in run.scenarios)
    return ("<table><tr><th>scenario</th><th>outcome</th><th>time</th><th>detail</th></tr>" + rows + "</table>")


def _cost(run: RunData) -> str:
    rows = run.memmap_cost
    if not rows:
        return '<p class="note">No scenario recorded memmap_cost rows.</p>'
    out = ["<table><tr><th>device</th><th>size</th><th>param</th><th>MemFree + pcp drop</th><th>expected</th>"
           "<th>self-hosted pages</th><th>applies / why</th></tr>"]
    for x in rows:
        out.append(f"<tr><td>{_e(cost_device(x))}</td>"
                   f"<td class=num>{_e(x.get('dimm_mib'))} MiB</td><td>{_e(x.get('param'))}</td>"
                   f"<td class=num>{_e(x.get('memfree_drop_kb'))} kB</td><td class=num>{_e(x.get('expected_kb'))} kB</td>"
                   f"<td class=num>{_e(x.get('self_hosted_pages'))}</td>"
                   f"<td>{_applies(x)}</td></tr>")
    return "".join(out) + "</table>"


def _maps(run: RunData) -> str:
    out: List[str] = []
    for s in run.scenarios:
        steps = s.memory_map
        if not steps:
            continue
        out.append(f'<div class="map"><h3>{_e(s.name)} {_badge(s.outcome)}</h3>')
        for i, st in enumerate(steps):
            out.append(svg_map(st, steps, i))
        out.append("</div>")
    if not out:
        return '<p class="note">No scenario recorded a memory map (measurements["memory_map"]).</p>'
    return legend() + "".join(out)


def render(run: RunData) -> str:
    k = run.kernel
    counts = ", ".join(f"{run.count(o)} {o}" for o in ("pass", "fail", "crash", "hang", "infra", "skip")
                       if run.count(o))
    title = f"memhp: {k.release or k.spec or 'run'}"
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><p>{len(run.scenarios)} scenarios: {_e(counts or 'none')}; "
            f"finished {_e(run.finished.strftime('%Y-%m-%d %H:%M UTC'))}</p>"
            f"<h2>Kernel</h2>{_facts(run)}"
            f"<h2>Scenarios</h2>{_scenarios(run)}"
            f"<h2>memmap cost at hot-add</h2>{_cost(run)}"
            f"<h2>Memory maps</h2>{_maps(run)}"
            "</body></html>\n")
