"""Who is alive, from heartbeats: restarts, deaths, and two processes under one name."""

from __future__ import annotations

import logging

from broker.liveness import Liveness


def test_a_restart_is_reported_once_and_the_old_pid_fades(caplog):
    live = Liveness(("llm",), timeout=3.0)
    assert live.beat("llm", 10, True, 0.0) == "up"
    assert live.beat("llm", 11, True, 0.5) == "restarted"
    for t in (1.5, 2.5, 3.5, 4.5):
        assert live.beat("llm", 11, True, t) is None
        assert live.check(t) == []
    assert live.duplicates() == {}


def test_two_processes_of_one_name_are_a_duplicate_reported_once(caplog):
    caplog.set_level(logging.INFO, "mmdagent_llm")
    live = Liveness(("segmenter",), timeout=3.0)
    live.beat("segmenter", 10, True, 0.0)
    assert live.beat("segmenter", 20, True, 0.1) == "restarted"   # looks like one, until 10 beats again
    changes = []
    for t in range(1, 30):                                      # both beat every second for 29 s
        changes += [live.beat("segmenter", 10, True, t), live.beat("segmenter", 20, True, t + 0.1)]
        assert live.check(t + 0.2) == []
    assert changes == [None] * len(changes)
    assert live.duplicates() == {"segmenter": [10, 20]}
    assert caplog.text.count("two segmenter processes are on this bus, pids 20 and 10") == 1
    assert caplog.text.count("was restarted") == 1
    # pid 20 stops: 10 goes on, nobody is "gone", the duplicate is over
    for t in range(30, 40):
        assert live.beat("segmenter", 10, True, t) is None
        assert live.check(t + 0.2) == []
    assert live.duplicates() == {}
    assert "segmenter pid 20 went silent; pid 10 goes on" in caplog.text
    assert "one segmenter process is left on the bus (pid 10)" in caplog.text
    assert live.missing() == []
    # and a real death is still a death
    assert live.check(45.0) == ["segmenter"]


def test_a_later_duplicate_is_reported_again():
    live = Liveness(("llm",), timeout=3.0)
    live.beat("llm", 1, True, 0.0)
    live.beat("llm", 2, True, 0.5)
    live.beat("llm", 1, True, 1.0)
    assert live.duplicates() == {"llm": [1, 2]}
    for t in range(2, 8):
        live.beat("llm", 2, True, t)
        live.check(t)
    assert live.duplicates() == {}
    assert live.beat("llm", 3, True, 9.0) == "restarted"
    live.beat("llm", 2, True, 9.5)
    assert live.duplicates() == {"llm": [2, 3]}
