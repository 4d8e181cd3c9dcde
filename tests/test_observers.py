"""Observers come and go without touching speech: stopped (SIGSTOP) ones do not hold a turn back,
and they go on when resumed. The Procfile's commented observer lines are real commands.
(The latencies with and without a stopped observer are measured by tests/bench_observers.py.)"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from honcho.environ import parse_procfile

from stages.commands.cli import OBSERVERS
from tests.e2e import Observer, launched
from tests.harness import ROOT

NAMES = ("transcript", "captions", "subtitles", "metrics")


def test_stopped_observers_hold_nothing_back_and_go_on_when_resumed(tmp_path: Path):
    with launched(tmp_path, avatar_kwargs={"seconds_per_char": 0.001, "min_speech": 0.02}) as world:
        observers = [Observer(world, name).start() for name in NAMES]
        try:
            for o in observers:
                o.proc.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            turns = [world.talk(f"止まっていても話せますか ({i})", timeout=20) for i in range(5)]
            while_stopped = time.monotonic() - stopped_at
            for o in observers:
                o.proc.send_signal(signal.SIGCONT)
            since = len(world.bus.envelopes)
            back = world.bus.wait_for(lambda envs: {e.body.get("stage") for e in envs[since:] if e.kind == "heartbeat"
                                                    and e.body.get("ready")} >= set(NAMES), 15)
            assert all(o.proc.poll() is None for o in observers)
        finally:
            for o in observers:
                o.stop()
    assert all(t.result["reason"] == "done" and t.spoken for t in turns)
    assert back, "an observer did not beat again after SIGCONT"
    print(f"5 turns spoken in {while_stopped:.2f} s while 4 observers were stopped")


def test_the_procfile_lists_every_observer_commented_out():
    text = (ROOT / "Procfile").read_text(encoding="utf-8")
    assert set(parse_procfile(text).processes) == {"broker", "llm", "segmenter", "sequencer"}
    uncommented = "\n".join(line[2:] if line.startswith("# ") and ": mmdagent-llm observe" in line else line
                            for line in text.splitlines())
    procs = parse_procfile(uncommented).processes
    assert {name: procs[name] for name in NAMES} == {name: f"mmdagent-llm observe {name}" for name in NAMES}
    assert set(NAMES) == set(OBSERVERS)
