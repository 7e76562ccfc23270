"""memhp bisect's pure logic: failure signatures, per-run and per-step verdicts, the flaky-bug
arithmetic, and reading git bisect's answers."""
from __future__ import annotations

import pytest

from harness.errors import CheckFailed, GuestCrash
from harness.workflows import bisect as b

SIG = [("dimm_lifecycle::block_sized_dimm_lifecycle", "fail", "Movable present delta after online_movable")]


def test_detail_of_one_failed_check_is_its_name():
    msg = str(CheckFailed("Movable present delta after online_movable", 32256, 32257, "online_movable: ..."))
    assert b.failure_detail("fail", msg) == "Movable present delta after online_movable"


def test_detail_of_several_failed_checks_lists_them():
    assert b.failure_detail("fail", "2 checks failed (a delta, b delta): expected [1, 2]") == "a delta, b delta"


def test_detail_of_a_crash_is_the_splat_title_without_timestamp_or_addresses():
    one = str(GuestCrash("Oops", "[   12.345678] BUG: unable to handle page fault for address: ffff888012345678"))
    two = str(GuestCrash("Oops", "[   99.000001] BUG: unable to handle page fault for address: ffff888087654321"))
    assert b.failure_detail("crash", one) == b.failure_detail("crash", two)
    assert b.failure_detail("crash", one).startswith("Oops: BUG: unable to handle page fault")


def test_signature_keeps_kernel_failures_only():
    results = [{"name": "a::x", "outcome": "pass", "message": ""},
               {"name": "b::y", "outcome": "infra", "message": "QEMU died"},
               {"name": "c::z", "outcome": "skip", "message": "no feature"},
               {"name": SIG[0][0], "outcome": "fail", "message": "Movable present delta after online_movable: "
                                                                 "expected 32256, observed 32257 (rule)"}]
    assert b.signature(results) == SIG


@pytest.mark.parametrize("status,failures,verdict", [
    (0, [], b.GOOD),
    (1, SIG, b.BAD),
    (1, SIG + [("other::t", "fail", "x")], b.BAD),              # the bug and something else: still the bug
    (1, [("other::t", "fail", "x")], b.SKIP),                    # another scenario
    (1, [(SIG[0][0], "fail", "Movable managed delta")], b.SKIP),  # same scenario, another check
    (1, [(SIG[0][0], "crash", "panic: Kernel panic")], b.SKIP),   # a panic instead
    (125, [], b.SKIP),                                           # infrastructure
    (128, [], b.SKIP),
])
def test_run_verdict_compares_with_the_bad_signature(status, failures, verdict):
    assert b.run_verdict(status, failures, SIG)[0] == verdict


@pytest.mark.parametrize("runs,n,verdict", [
    ([b.GOOD] * 4, 4, b.GOOD),
    ([b.GOOD, b.BAD, b.GOOD, b.GOOD], 4, b.BAD),
    ([b.BAD, b.SKIP, b.SKIP, b.SKIP], 4, b.SKIP),   # one verdict out of four: not enough
    ([b.GOOD, b.GOOD, b.SKIP, b.SKIP], 4, b.GOOD),  # exactly half gave a verdict
    ([b.GOOD, b.SKIP, b.SKIP, b.SKIP], 4, b.SKIP),
    ([b.SKIP], 1, b.SKIP),
])
def test_step_verdict_is_syzkallers_rule(runs, n, verdict):
    assert b.step_verdict(runs, n) == verdict


def test_a_step_stops_early_only_when_bad_is_certain():
    assert b.decided_early([b.BAD, b.GOOD], 4)
    assert not b.decided_early([b.BAD], 4)            # 1 of 4 decided: could still end in skip
    assert not b.decided_early([b.GOOD, b.GOOD], 4)   # good needs every run


def test_missed_probability_is_the_product_over_good_steps():
    """The issue's figure: prod over good steps of (1 - rate)^runs (values worked out by hand)."""
    assert b.missed_probability(1.0, [1, 1, 1]) == 0.0
    assert b.missed_probability(0.5, [1]) == 0.5
    assert b.missed_probability(0.5, [4, 4]) == 1 / 256          # (1/16) * (1/16)
    assert b.missed_probability(0.5, [10]) == 1 / 1024
    assert b.missed_probability(0.25, [2, 1]) == pytest.approx(0.421875)   # 0.75^2 * 0.75
    assert b.missed_probability(0.8, [3]) == pytest.approx(0.008)          # 0.2^3
    assert b.missed_probability(0.5, []) == 1.0                  # no good step: nothing ruled out


def test_any_missed_probability_is_reported_apart():
    """1 - prod(1 - (1 - rate)^runs): at least one good step would have missed a bug present there."""
    assert b.any_missed_probability(0.5, [4, 4]) == pytest.approx(31 / 256)     # 1 - (15/16)^2
    assert b.any_missed_probability(0.25, [2, 1]) == pytest.approx(0.890625)    # 1 - 0.4375 * 0.25
    assert b.any_missed_probability(1.0, [1, 1]) == 0.0
    assert b.any_missed_probability(0.5, []) == 0.0


def test_k_for_names_test_functions_without_parameters():
    sig = [("hot_add::test_add[on-128M]", "fail", "x"), ("dimm_lifecycle::block_sized_dimm_lifecycle", "fail", "y"),
           ("hot_add::test_add[off-1G]", "fail", "z")]
    assert b.k_for(sig) == "block_sized_dimm_lifecycle or test_add"


FOUND = """634c9c1e0f4b8bd1b2bd0ad0e4c2c0c0e7a5b9f1 is the first bad commit
commit 634c9c1e0f4b8bd1b2bd0ad0e4c2c0c0e7a5b9f1
Author: Eve Example <eve@example.org>
"""
ONLY_SKIPS = """There are only 'skip'ped commits left to test.
The first bad commit could be any of:
2b0817e1111111111111111111111111111111aa
cd98e71222222222222222222222222222222bbb
We cannot bisect more!
"""


def test_reading_git_bisect_answers():
    assert b._finished(FOUND) == ("634c9c1e0f4b8bd1b2bd0ad0e4c2c0c0e7a5b9f1", [])
    assert b._finished(ONLY_SKIPS) == (None, ["2b0817e1111111111111111111111111111111aa",
                                              "cd98e71222222222222222222222222222222bbb"])
    assert b._finished("Bisecting: 3 revisions left to test after this (roughly 2 steps)\n") == (None, [])


def test_detail_drops_the_exception_class_report_json_puts_first():
    msg = "CheckFailed: Movable present delta after online_movable: expected 32768, observed 32769 (rule)"
    assert b.failure_detail("fail", msg) == "Movable present delta after online_movable"


# get_maintainer.pl --no-git --no-git-fallback --roles --no-rolestats, as 6.1's prints it for mm/memory_hotplug.c
GET_MAINTAINER = """David Hildenbrand <david@redhat.com> (maintainer:MEMORY HOT(UN)PLUG)
Oscar Salvador <osalvador@suse.de> (maintainer:MEMORY HOT(UN)PLUG)
Andrew Morton <akpm@linux-foundation.org> (maintainer:MEMORY MANAGEMENT)
Some Reviewer <rev@example.org> (reviewer:MEMORY HOT(UN)PLUG,commit_signer:1/2=50%)
linux-mm@kvack.org (open list:MEMORY HOT(UN)PLUG)
linux-kernel@vger.kernel.org (open list)
David Hildenbrand <david@redhat.com> (maintainer:MEMORY HOT(UN)PLUG)
"""


def test_split_maintainers_puts_people_in_to_and_lists_in_cc():
    to, cc = b.split_maintainers(GET_MAINTAINER)
    assert to == ["David Hildenbrand <david@redhat.com>", "Oscar Salvador <osalvador@suse.de>",
                  "Andrew Morton <akpm@linux-foundation.org>", "Some Reviewer <rev@example.org>"]
    assert cc == ["linux-mm@kvack.org", "linux-kernel@vger.kernel.org"]


def test_split_maintainers_without_roles_and_noise():
    to, cc = b.split_maintainers("scripts/get_maintainer.pl: warning\nlinux-mm@kvack.org\n\n")
    assert (to, cc) == ([], ["linux-mm@kvack.org"])


def test_run_counts_is_the_robot_table_as_data():
    other = ("other::t", "fail", "x")
    parent = [{"failures": []}] * 3
    bad = [{"failures": [list(SIG[0])]}, {"failures": []}, {"failures": [list(SIG[0]), list(other)]}]
    assert b.run_counts(parent, bad, SIG) == [
        {"label": "runs", "good": 3, "bad": 3},
        {"label": "dimm_lifecycle::block_sized_dimm_lifecycle FAIL Movable present delta after online_movable",
         "good": 0, "bad": 2}]


def test_inconclusive_output_lists_the_candidates_and_why_each_was_skipped():
    a, c = "a" * 40, "c" * 40
    steps = [b.Step(c, "the bad one", "bad endpoint", b.BAD, "failed"),
             b.Step("9" * 40, "base", "good endpoint", b.GOOD, "passed"),
             b.Step(a, "breaks the build", "step", b.SKIP, "build failed: mm/x.c:1:2: error: expected ';'")]
    out = b.Outcome(b.EXIT_INCONCLUSIVE, "inconclusive: only skipped commits left", None, [a, c], "log\n", steps,
                    list(SIG), None, None, None, 1.0)
    text = b.render(out, 1)
    assert f"    {a} (skip: build failed: mm/x.c:1:2: error: expected ';')" in text
    assert f"    {c} (bad: failed)" in text
    doc = b.to_json(out)
    assert doc["status"] == 1 and doc["candidates"] == [a, c] and doc["first_bad_commit"] is None
    assert doc["skipped"] == [{"commit": a, "subject": "breaks the build",
                               "why": "build failed: mm/x.c:1:2: error: expected ';'"}]
