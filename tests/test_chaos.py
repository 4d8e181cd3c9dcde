"""The chaos run of issue 16 (the longer one: ``python -m tests.chaos --turns 120``, see README)."""

from __future__ import annotations

from pathlib import Path

from tests.chaos import run


def test_random_sigkills_under_supervisord_cost_no_answer(tmp_path: Path):
    """30 turns, a random stage (broker included) SIGKILLed every third turn at a random moment:
    the rest of an answer is said after a stage dies in its middle, never a sentence twice."""
    report = run(tmp_path, turns=30, kill_every=3, seed=7)
    print("\n".join(report.lines() + report.details()))
    assert report.wedged == 0 and report.lost == 0
    assert report.duplicated == 0 and report.out_of_turn == 0
    assert report.notice_after_complete == 0
    assert report.completed + report.notice == report.turns
    assert len(report.kills) == 10
    assert report.completed >= 29  # at least 95 %
