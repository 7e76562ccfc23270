"""Reports rendered from a finished run's folder: email (mbox), KTAP v1, KCIDB v5, HTML, JSON.

    from harness.reports import load_run, render
    run = load_run("~/.cache/memhp/artifacts/run-.../")     # report.json + artifacts
    text = render(run, "ktap")                              # str; every format returns str

Each renderer is pure: RunData in, text out; nothing boots and nothing is fetched.
"""
from __future__ import annotations

import importlib
import json
from typing import Callable, Dict

from harness.reports.rundir import RunData, RunDirError, load_run

FORMATS = ("email", "ktap", "kcidb", "html", "json")
_MODULES: Dict[str, str] = {"email": "mail", "ktap": "ktap", "kcidb": "kcidb", "html": "html"}


def render(run: RunData, fmt: str) -> str:
    """Render `run` as fmt (one of FORMATS). ValueError for an unknown format."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(run.raw, indent=2, default=str) + "\n"
    module = importlib.import_module(f"harness.reports.{_MODULES[fmt]}")
    fn: Callable[[RunData], str] = module.render
    return fn(run)


__all__ = ["FORMATS", "RunData", "RunDirError", "load_run", "render"]
