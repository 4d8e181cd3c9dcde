"""The decisions about the llm stage's connection ahead of turns (:mod:`stages.llm.warm`): when to
look, when to open one, what to log. Pure: no process, no socket (see test_llm_connections.py
and test_warm_connection.py for the rest)."""

from __future__ import annotations

import logging

import pytest

from stages.llm import warm

T = 1000.0  # a monotonic time to start from


# -- which servers -------------------------------------------------------------------------
@pytest.mark.parametrize("url, worth", [
    ("https://api.openai.com/v1", True),
    ("https://127.0.0.1:8443/v1", True),            # TLS even on this machine
    ("http://192.168.1.20:8080/v1", True),          # another machine
    ("http://gpu-box.lan:8000/v1", True),
    ("http://localhost:11434/v1", False),           # Ollama here
    ("http://127.0.0.1:8080/v1", False),
    ("http://127.0.0.2:8080/v1", False),
    ("http://[::1]:8000/v1", False),
    ("http://api.localhost/v1", False),
])
def test_worth_keeping_warm_where_a_handshake_costs_something(url: str, worth: bool):
    assert warm.worth_keeping_warm(url) is worth


# -- when to look, when to open, what to log -------------------------------------------------
def opened_at_start() -> warm.Warmth:
    w = warm.Warmth("https://llm.example/v1")
    assert w.due(T, busy=False)
    assert w.looked(T, warm=False)
    assert w.opened(T + 0.1, None) is None  # the first opening says nothing
    return w


def test_at_start_it_opens_at_once_then_looks_every_few_seconds():
    w = opened_at_start()
    assert not w.due(T + 0.1 + warm.CHECK_EVERY - 0.01, busy=False)
    assert w.next_deadline() == pytest.approx(T + 0.1 + warm.CHECK_EVERY)
    now = T + 0.1 + warm.CHECK_EVERY
    assert w.due(now, busy=False)
    assert not w.looked(now, warm=True)  # open: nothing to do
    assert not w.due(now + 1, busy=False) and w.due(now + warm.CHECK_EVERY, busy=False)


def test_never_while_a_request_runs_nor_two_openings_at_a_time():
    w = warm.Warmth("x")
    assert not w.due(T, busy=True)
    assert w.looked(T, warm=False)
    assert not w.due(T + 100, busy=False)  # the opening is under way
    assert w.next_deadline() is None
    w.opened(T + 1, None)
    w.soon()
    assert not w.due(T + 2, busy=True) and w.due(T + 2, busy=False)  # waits for the turn's end


def test_the_user_starting_to_speak_makes_it_look_at_once():
    w = opened_at_start()
    w.soon()
    assert w.due(T + 0.2, busy=False)
    assert not w.looked(T + 0.2, warm=True)


def test_an_idle_connection_closed_by_the_server_is_reopened_and_said_once():
    w = opened_at_start()
    w.used(T + 10)  # a turn ended well at T + 10
    assert w.looked(T + 13, warm=False)
    level, text = w.opened(T + 13.1, None)
    assert level == logging.INFO and "closed it after 3 s idle or less" in text and "https://llm.example/v1" in text
    assert w.looked(T + 16.1, warm=False)  # closed again: reopened, silently
    assert w.opened(T + 16.2, None) is None


def test_each_cut_or_failed_request_is_followed_by_an_opening_with_a_line():
    w = opened_at_start()
    for why, words in ((warm.CUT, "cut off"), (warm.FAILED, "failed"), (warm.CUT, "cut off")):
        w.soon(why)
        assert w.due(T + 1, busy=False)
        assert w.looked(T + 1, warm=False)
        level, text = w.opened(T + 1.1, None)
        assert level == logging.INFO and words in text


def test_a_cut_that_left_another_connection_open_opens_nothing():
    w = opened_at_start()
    w.soon(warm.CUT)
    assert not w.looked(T + 1, warm=True)
    w.used(T + 5)
    assert w.looked(T + 8, warm=False)  # later closed by the server: said as that, not as the cut
    assert "closed it after" in w.opened(T + 8.1, None)[1]


def test_failures_are_said_once_and_spaced_out_until_an_opening_works():
    w = warm.Warmth("https://llm.example/v1")
    now, lines, waits = T, [], []
    for _ in range(8):
        assert w.due(now, busy=False) and w.looked(now, warm=False)
        lines.append(w.opened(now, "APIConnectionError: Connection error. ([Errno 111] Connection refused)"))
        waits.append(w.next_look - now)
        assert not w.due(w.next_look - 0.01, busy=False)
        now = w.next_look
    assert lines[0][0] == logging.WARNING and "Connection refused" in lines[0][1]
    assert lines[1:] == [None] * 7
    assert waits == [3, 6, 12, 24, 48, 60, 60, 60]
    w.soon()  # the user starts speaking: a turn is near, it tries now
    assert w.due(now - 50, busy=False) and w.looked(now - 50, warm=False)
    level, text = w.opened(now - 49.9, None)
    assert level == logging.INFO and "could not be opened before" in text
    assert w.next_look == pytest.approx(now - 49.9 + warm.CHECK_EVERY)
    assert w.looked(w.next_look, warm=False)
    assert w.opened(w.next_look, "refused again")[0] == logging.WARNING  # a new failure after success: said
