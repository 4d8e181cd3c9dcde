"""tests.bench_avatars on one avatar, one measured round: the figures exist and agree with each
other (no wall-clock thresholds)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.bench_avatars import FIRST_TOKEN, measure

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_one_avatar_one_round(tmp_path: Path, own_state):
    result = measure(1, 1, tmp_path, idle=0.5)
    # the listener, the avatar's process, and its broker, llm, segmenter, sequencer
    assert result["processes"] == 6
    assert result["rss"] >= result["pss"] > 0 and result["per_avatar_rss"] < result["rss"]
    assert result["idle_cpu"] >= 0
    assert len(result["waits"]) == 1 and result["waits"][0] >= FIRST_TOKEN  # nothing before the first token
