"""A kernel git history with planted regressions, for memhp bisect's tests and benchmark.

Made from Debian's linux-source-6.1 (the pristine tree is the first commit), then small
realistic commits in mm/ and drivers/base/ (comments, pr_info), among them:

  BUILD_BREAK  drivers/base/memory.c stops compiling (a missing semicolon); the next commit fixes it.
               It sits where git bisect good c00 / bad main tests it (c09), so the bisect must skip it
  PLANTED      online_pages() accounts one page too many as present: dimm_lifecycle's
               "Movable present delta" check FAILs on every boot
  FLAKY        (branch `flaky`, forked before PLANTED) the same off-by-one, on about half the
               onlines (get_random_u32() & 1), so about half the boots FAIL the same check
  UNBUILDABLE  (branch `unbuildable`, forked at c08, tags u01, u02) the same off-by-one in a commit
               that also breaks the build (a pr_debug without its semicolon); u02 fixes the build.
               Bisecting c08..unbuildable leaves u01 untestable: inconclusive, u01 skipped

Built once per content of the commits below, in the memhp cache (bisect-history/<hash>/repo), made
aside and published. Run as a script, it prints the repo's path.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))

from harness import host  # noqa: E402
from harness.cache import cache_root, ensure_dir, entry_lock, is_complete, publish, scratch_dir  # noqa: E402
from harness.kernels.kbuild import source_tree  # noqa: E402

# (file, anchor line (exact, unique), "before"|"after"|"replace", text)
Edit = Tuple[str, str, str, str]
MH, MEM, SPARSE, NODE = "mm/memory_hotplug.c", "drivers/base/memory.c", "mm/sparse.c", "drivers/base/node.c"

PLANTED_SUBJECT = "mm/memory_hotplug: account the present pages of an onlined range in one call"
FLAKY_SUBJECT = "mm/memory_hotplug: sample the present-page accounting of onlined ranges"
BREAK_SUBJECT = "drivers/base/memory: report the zone a block was onlined to"
FIX_SUBJECT = "drivers/base/memory: fix the build after the zone report"

ONLINE_CALL = "\tadjust_present_page_count(pfn_to_page(pfn), group, nr_pages);"

# (subject, author, edits): applied in order on top of the pristine tree
MAIN: List[Tuple[str, str, List[Edit]]] = [
    ("mm/memory_hotplug: document online_pages_range()", "Ada Example <ada@example.org>",
     [(MH, "static void online_pages_range(unsigned long start_pfn, unsigned long nr_pages)", "before",
       "/*\n * Hand the pages of an onlined range to the buddy allocator, in the largest\n"
       " * aligned chunks possible.\n */")]),
    ("drivers/base/memory: say which block is onlined", "Ben Example <ben@example.org>",
     [(MEM, "\tmem_hotplug_begin();\n\tif (nr_vmemmap_pages) {", "before",
       "\tpr_info(\"memory: onlining block %lu\\n\", mem->start_section_nr);")]),
    ("mm/sparse: document sparse_add_section()", "Ada Example <ada@example.org>",
     [(SPARSE, "int __meminit sparse_add_section(int nid, unsigned long start_pfn,", "before",
       "/* Called with mem_hotplug_lock held; the memmap comes from altmap when one is given. */")]),
    ("mm/memory_hotplug: log the range try_remove_memory() removes", "Cai Example <cai@example.org>",
     [(MH, "\trc = walk_memory_blocks(start, size, &nid, check_memblock_offlined_cb);", "before",
       "\tpr_info(\"memory_hotplug: removing %#llx-%#llx\\n\", start, start + size - 1);")]),
    ("drivers/base/node: document __register_one_node()", "Ben Example <ben@example.org>",
     [(NODE, "int __register_one_node(int nid)", "before",
       "/* Registers node nid and links its CPUs; the memory blocks are linked later. */")]),
    ("mm/memory_hotplug: comment on the altmap granularity rule", "Cai Example <cai@example.org>",
     [(MH, "\t * We only support removing memory added with MHP_MEMMAP_ON_MEMORY in", "before",
       "\t * (The vmemmap lives in the block itself, so it goes with the block.)")]),
    ("drivers/base/memory: say which block is offlined", "Ben Example <ben@example.org>",
     [(MEM, "\tif (!mem->zone)\n\t\treturn -EINVAL;", "after",
       "\tpr_info(\"memory: offlining block %lu\\n\", mem->start_section_nr);")]),
    ("mm/sparse: document sparse_remove_section()", "Ada Example <ada@example.org>",
     [(SPARSE, "void sparse_remove_section(struct mem_section *ms, unsigned long pfn,", "before",
       "/* The reverse of sparse_add_section(); frees the memmap unless altmap hosts it. */")]),
    (BREAK_SUBJECT, "Dee Example <dee@example.org>",
     [(MEM, "\tmem->zone = zone;\nout:", "before",
       "\tpr_info(\"memory: block %lu online in %s\\n\", mem->start_section_nr, zone->name)")]),
    (FIX_SUBJECT, "Dee Example <dee@example.org>",
     [(MEM, "\tpr_info(\"memory: block %lu online in %s\\n\", mem->start_section_nr, zone->name)", "replace",
       "\tpr_info(\"memory: block %lu online in %s\\n\", mem->start_section_nr, zone->name);")]),
    (PLANTED_SUBJECT, "Eve Example <eve@example.org>",
     [(MH, ONLINE_CALL, "replace",
       "\tadjust_present_page_count(pfn_to_page(pfn), group, nr_pages + 1);")]),
    ("mm/memory_hotplug: document __add_pages()", "Cai Example <cai@example.org>",
     [(MH, "int __ref __add_pages(int nid, unsigned long pfn, unsigned long nr_pages,", "before",
       "/* Adds the sections of a range; the caller onlines them later. */")]),
    ("drivers/base/memory: log block device creation", "Ben Example <ben@example.org>",
     [(MEM, "int create_memory_block_devices(unsigned long start, unsigned long size,", "before",
       "/* One device per memory block of the range; all or nothing. */")]),
    ("drivers/base/node: document unregister_one_node()", "Ada Example <ada@example.org>",
     [(NODE, "void unregister_one_node(int nid)", "before",
       "/* The reverse of __register_one_node(). */")]),
    ("mm/memory_hotplug: document mhp_supports_memmap_on_memory()", "Eve Example <eve@example.org>",
     [(MH, "bool mhp_supports_memmap_on_memory(unsigned long size)", "before",
       "/* Whether a range of this size can host its own memmap (see the checks below). */")]),
    ("drivers/base/memory: document remove_memory_block_devices()", "Dee Example <dee@example.org>",
     [(MEM, "void remove_memory_block_devices(unsigned long start, unsigned long size)", "before",
       "/* The reverse of create_memory_block_devices(); the blocks must be offline. */")]),
    ("mm/memory_hotplug: log offline_pages() ranges", "Cai Example <cai@example.org>",
     [(MH, "int __ref offline_pages(unsigned long start_pfn, unsigned long nr_pages,", "before",
       "/* Migrates everything off the range, then takes it away from the zone. */")]),
    ("mm/sparse: note the section size", "Ada Example <ada@example.org>",
     [(SPARSE, "int __meminit sparse_add_section(int nid, unsigned long start_pfn,", "before",
       "/* Sections are PAGES_PER_SECTION pages: 128 MiB on x86_64. */")]),
]
FORK_AFTER = 5          # branch `flaky` starts at MAIN[FORK_AFTER - 1] (before BUILD_BREAK)
FLAKY: List[Tuple[str, str, List[Edit]]] = [
    ("mm/memory_hotplug: document adjust_present_page_count()", "Fay Example <fay@example.org>",
     [(MH, "void adjust_present_page_count(struct page *page, struct memory_group *group,", "before",
       "/* present_pages of the zone, node and group move together. */")]),
    (FLAKY_SUBJECT, "Fay Example <fay@example.org>",
     [(MH, ONLINE_CALL, "replace",
       "\tadjust_present_page_count(pfn_to_page(pfn), group, nr_pages + (get_random_u32() & 1));"),
      (MH, "#include <linux/memblock.h>", "after", "#include <linux/random.h>")]),
    ("mm/memory_hotplug: document online_pages()", "Fay Example <fay@example.org>",
     [(MH, "int __ref online_pages(unsigned long pfn, unsigned long nr_pages,", "before",
       "/* Onlines a range of one memory block to zone; the caller holds the hotplug lock. */")]),
    ("drivers/base/memory: document memory_block_offline()", "Fay Example <fay@example.org>",
     [(MEM, "static int memory_block_offline(struct memory_block *mem)", "before",
       "/* The caller holds the device lock of the block. */")]),
]

IDENT = {"GIT_COMMITTER_NAME": "memhp history", "GIT_COMMITTER_EMAIL": "history@memhp.invalid",
         "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z", "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
         "LC_ALL": "C"}


UNBUILDABLE_SUBJECT = "mm/memory_hotplug: account and log the present pages of an onlined range"
UNBUILDABLE_FORK = 8    # branch `unbuildable` starts at c08
UNBUILDABLE_LOG = "\tpr_debug(\"memory_hotplug: onlined %lu pages at %#lx\\n\", nr_pages, pfn)"
UNBUILDABLE: List[Tuple[str, str, List[Edit]]] = [
    (UNBUILDABLE_SUBJECT, "Gus Example <gus@example.org>",
     [(MH, ONLINE_CALL, "replace",
       "\tadjust_present_page_count(pfn_to_page(pfn), group, nr_pages + 1);\n" + UNBUILDABLE_LOG)]),
    ("mm/memory_hotplug: fix the build after the onlined-range log", "Gus Example <gus@example.org>",
     [(MH, UNBUILDABLE_LOG, "replace", UNBUILDABLE_LOG + ";")]),
]


def history_key() -> str:
    """The commits' content (not this file's bytes: a cosmetic edit must not rebuild the history)."""
    data = json.dumps(["memhp-history-1", MAIN, FORK_AFTER, FLAKY, IDENT, UNBUILDABLE_FORK, UNBUILDABLE],
                      sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def _git(repo: Path, *args: str, author: Optional[str] = None) -> str:
    env = dict(os.environ, **IDENT)
    for k in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(k, None)
    if author:
        name, mail = author.rsplit(" <", 1)
        env.update(GIT_AUTHOR_NAME=name, GIT_AUTHOR_EMAIL=mail.rstrip(">"))
    r = host.run(["git", "-c", "core.hooksPath=/dev/null", "-c", "commit.gpgSign=false", *args], cwd=repo,
                 env=env, timeout=host.GIT_TIMEOUT, what=f"git {args[0]}")
    if r.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {r.stderr.strip()[-500:]}")
    return r.stdout


def _edit(repo: Path, edit: Edit) -> None:
    rel, anchor, where, text = edit
    path = repo / rel
    src = path.read_text()
    if src.count(anchor) != 1:
        raise RuntimeError(f"anchor {anchor!r} is not unique in {rel} ({src.count(anchor)} hits)")
    new = {"before": text + "\n" + anchor, "after": anchor + "\n" + text, "replace": text}[where]
    path.write_text(src.replace(anchor, new))


def _commit(repo: Path, subject: str, author: str, edits: List[Edit]) -> str:
    for e in edits:
        _edit(repo, e)
    _git(repo, "add", "-f", "--", *sorted({e[0] for e in edits}))
    _git(repo, "commit", "-q", "-m", subject, author=author)
    return _git(repo, "rev-parse", "HEAD").strip()


def make_history(cache: Optional[Path] = None) -> Path:
    """The repo (made once per content of this file); its refs: main, flaky, and tags per commit."""
    out = cache_root(cache) / "bisect-history" / history_key()
    if is_complete(out):
        return out / "repo"
    pristine = source_tree("6.1", cache)
    with entry_lock(out):
        if is_complete(out):
            return out / "repo"
        with scratch_dir(ensure_dir(out.parent), "history") as tmp:
            repo = tmp / "repo"
            r = host.run(["cp", "-a", str(pristine), str(repo)], timeout=host.UNPACK_TIMEOUT, what="cp -a")
            if r.returncode != 0:
                raise RuntimeError(f"copying {pristine}: {r.stderr.strip()[-300:]}")
            (repo / ".memhp-source").unlink()
            _git(repo, "init", "-q", "-b", "main")
            _git(repo, "add", "-f", "-A", ".")        # Debian's .gitignore ignores the top level
            _git(repo, "commit", "-q", "-m", f"Linux {pristine.parent.name} (Debian linux-source-6.1, pristine)",
                 author="memhp history <history@memhp.invalid>")
            _git(repo, "tag", "c00")
            for i, (subject, author, edits) in enumerate(MAIN, 1):
                _commit(repo, subject, author, edits)
                _git(repo, "tag", f"c{i:02d}")
            _git(repo, "checkout", "-q", "-b", "flaky", f"c{FORK_AFTER - 1:02d}")
            for i, (subject, author, edits) in enumerate(FLAKY, 1):
                _commit(repo, subject, author, edits)
                _git(repo, "tag", f"f{i:02d}")
            _git(repo, "checkout", "-q", "-b", "unbuildable", f"c{UNBUILDABLE_FORK:02d}")
            for i, (subject, author, edits) in enumerate(UNBUILDABLE, 1):
                _commit(repo, subject, author, edits)
                _git(repo, "tag", f"u{i:02d}")
            _git(repo, "checkout", "-q", "main")
            publish(tmp, out, history_key())
    return out / "repo"


def tag_of(subject: str) -> str:
    """The tag of the commit with this subject."""
    for i, (s, _, _) in enumerate(MAIN, 1):
        if s == subject:
            return f"c{i:02d}"
    for i, (s, _, _) in enumerate(FLAKY, 1):
        if s == subject:
            return f"f{i:02d}"
    for i, (s, _, _) in enumerate(UNBUILDABLE, 1):
        if s == subject:
            return f"u{i:02d}"
    raise KeyError(subject)


if __name__ == "__main__":
    print(make_history())
