"""The short chaos run (the full one: ``python -m tests.chaos --turns 100``, see README)."""

from __future__ import annotations

from pathlib import Path

from tests.chaos import run


def test_random_sigkills_under_supervisord_never_wedge_repeat_or_lose_a_turn(tmp_path: Path):
    report = run(tmp_path, turns=15, kill_every=3, seed=7)
    print("\n".join(report.lines()))
    assert report.wedged == 0 and report.lost == 0
    assert report.duplicated == 0 and report.out_of_turn == 0
    assert report.completed + report.notice == report.turns
    assert len(report.kills) == 5
    assert report.completed >= 10  # a kill costs at most its own turn
