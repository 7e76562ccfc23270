"""Reports rendered from a finished run's folder: email (mbox), KTAP v1, KCIDB v5, HTML, JSON.

    from harness.reports import load_run, render
    run = load_run("~/.cache/memhp/artifacts/run-.../")     # report.json + artifacts
    text = render(run, "ktap")                              # str; every format returns str

Each renderer is pure: RunData in, text out; nothing boots and nothing is fetched. A run on
several kernels (load_runs -> RunSet) renders as one document holding every kernel (KTAP: one
subtest per kernel; KCIDB: a checkout and build per kernel; email: one message per kernel;
markdown: the kernel x scenario table); HTML is one page per kernel (each kernel's own folder).
"""
from __future__ import annotations

import importlib
import json
from typing import Callable, Dict, Union

from harness.reports.rundir import RunData, RunDirError, RunSet, load_run, load_runs

FORMATS = ("email", "ktap", "kcidb", "html", "json", "junit", "markdown", "reproducer")
_MODULES: Dict[str, str] = {"email": "mail", "ktap": "ktap", "kcidb": "kcidb", "html": "html",
                            "reproducer": "reproducer"}


def render(run: Union[RunData, RunSet], fmt: str) -> str:
    """Render `run` (one kernel, or a RunSet of one or more) as fmt (one of FORMATS).
    ValueError for an unknown format, or for html of several kernels."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; valid: {', '.join(FORMATS)}")
    runs = run.runs if isinstance(run, RunSet) else (run,)
    if fmt == "json":
        return json.dumps(run.raw, indent=2, default=str) + "\n"
    if fmt in ("junit", "markdown"):
        from harness.reports import matrixtable, report
        if fmt == "markdown":
            return matrixtable.markdown(runs)
        return report.junit_text([(f"memhp.{r.kernel.spec or r.kernel.release or 'kernel'}", r.scenarios)
                                  for r in runs])
    if fmt == "ktap" and len(runs) > 1:
        from harness.reports import ktap
        return ktap.render_many(runs)
    if fmt == "kcidb" and len(runs) > 1:
        from harness.reports import kcidb
        return kcidb.render_many(runs)
    if fmt in ("html", "reproducer") and len(runs) > 1:
        raise ValueError(f"{fmt} is one file per kernel and this run holds {len(runs)}: render each kernel's "
                         f"folder ({', '.join(str(r.path.name) for r in runs)})")
    module = importlib.import_module(f"harness.reports.{_MODULES[fmt]}")
    fn: Callable[[RunData], str] = module.render
    return "\n".join(fn(r) for r in runs)     # email: mbox messages follow each other after a blank line


__all__ = ["FORMATS", "RunData", "RunDirError", "RunSet", "load_run", "load_runs", "render"]
