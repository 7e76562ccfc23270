"""pytest imports test modules by basename (rootdir imports, no __init__.py): two test files with
the same name in different folders stop the whole collection. Guard against it."""
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_file_basenames_are_unique():
    names = Counter(p.name for p in TESTS.rglob("test_*.py") if "fault_scenarios" not in p.parts)
    assert names, "no test files found: the walker is broken"
    dup = sorted(n for n, c in names.items() if c > 1)
    assert not dup, f"test files share a basename: {dup}"
