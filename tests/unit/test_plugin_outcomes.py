"""The "memhp outcomes" table is printed only by sessions that ran memhp scenarios (memhp run, or
pytest with --kernel), so memhp's own test sessions end with pytest's own summary."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from harness.plugin import show_outcomes


def _config(live=False, args=()):
    return SimpleNamespace(option=SimpleNamespace(memhp_live=live), invocation_params=SimpleNamespace(args=args))


@pytest.mark.parametrize("live,args,shown", [
    (True, (), True),                                        # memhp run
    (False, ("harness/scenarios", "--kernel", "debian:6.12"), True),
    (False, ("--kernel=debian:6.1", "-k", "hot_add"), True),
    (False, ("tests/unit", "-q"), False),                    # make unit
    (False, ("tests", "-ra", "--durations=15"), False),      # make test
    (False, ("-k", "--kernel-ish"), False),
])
def test_show_outcomes(live, args, shown):
    assert show_outcomes(_config(live, args)) is shown


def test_a_plain_pytest_session_ends_with_pytest_summary(tmp_path):
    """Real pytest, with the memhp plugin loaded through its entry point: no table, the last line
    is pytest's own."""
    t = tmp_path / "test_x.py"
    t.write_text("def test_a():\n    pass\n")
    r = subprocess.run([sys.executable, "-m", "pytest", str(t), "-q", "-p", "no:cacheprovider"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "memhp outcomes" not in r.stdout, r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("1 passed"), r.stdout
