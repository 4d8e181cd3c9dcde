"""The pacing policy (:mod:`stages.segmenter.pacing`): which waiting pieces go out, and when.

Exact examples of :func:`release`, the speaking clock's estimates, and a discrete-event run of
the cutter, the policy and an avatar that speaks at its own rate, over random streams: the first
segment is the first clause, the avatar is never silent while a clause waits, sentences are
whole whenever the stream keeps ahead of the voice, and nothing is lost or said twice.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import pytest
from hypothesis import given, settings, strategies as st

from stages.segmenter.pacing import CAUTION, LEAD, SpeakingClock, join, next_segment, release, unheard
from stages.segmenter.sentences import Piece, SentenceCutter, letters


def whole_answer(pieces: Sequence[Piece], merge_chars: int = 40, max_bytes: int = 600) -> list[Piece]:
    """The segments :func:`release` gives an answer whose pieces are all known at once (a burst, or the answer
    over): the first piece, then sentence-sized segments. Each is given as a :class:`Piece`
    (its text joined, the tags of its first piece)."""
    out, waiting = [], list(pieces)
    while waiting:
        n = release(waiting, first=not out, final=True, free_in=0.0, merge_chars=merge_chars, max_bytes=max_bytes)
        out.append(Piece(join(waiting[:n]), waiting[n - 1].ends, waiting[0].spaced, waiting[0].tags))
        waiting = waiting[n:]
    return out


def P(text: str, ends: bool = False, spaced: bool = False, tags: tuple[str, ...] = ()) -> Piece:
    return Piece(text, ends, spaced, tags)


CLAUSES = [P("今日は晴れて、"), P("午後は風が強くなるので、"), P("上着を持ってね。", True), P("夕方は寒いです。", True)]


def test_the_first_segment_is_the_first_piece_alone() -> None:
    assert release(CLAUSES, first=True, final=False, free_in=5.0, merge_chars=40, max_bytes=600) == 1


def test_a_whole_sentence_goes_out_at_once_while_the_avatar_talks() -> None:
    assert release(CLAUSES, first=False, final=False, free_in=5.0, merge_chars=40, max_bytes=600) == 3
    assert release(CLAUSES[3:], first=False, final=False, free_in=5.0, merge_chars=40, max_bytes=600) == 1


def test_clauses_of_an_unfinished_sentence_wait_until_the_avatar_nears_its_end() -> None:
    waiting = CLAUSES[:2]
    assert release(waiting, first=False, final=False, free_in=LEAD + 0.01, merge_chars=40, max_bytes=600) == 0
    assert release(waiting, first=False, final=False, free_in=LEAD, merge_chars=40, max_bytes=600) == 2
    assert release(waiting, first=False, final=False, free_in=0.0, merge_chars=40, max_bytes=600) == 2
    assert release(waiting, first=False, final=True, free_in=9.0, merge_chars=40, max_bytes=600) == 2
    assert release([], first=False, final=True, free_in=0.0, merge_chars=40, max_bytes=600) == 0


def test_a_long_sentence_goes_in_parts_and_limits_hold() -> None:
    assert next_segment(CLAUSES, merge_chars=10, max_bytes=600) == (2, True)   # 7 chars < 10: one more clause
    assert next_segment(CLAUSES, merge_chars=5, max_bytes=600) == (1, True)
    assert next_segment(CLAUSES[:1], merge_chars=40, max_bytes=600) == (1, False)
    assert next_segment(CLAUSES, merge_chars=40, max_bytes=40) == (1, True)    # 2 clauses would be 57 bytes
    tagged = [P("はい、"), P("そうです。", True, tags=("happy",))]
    assert next_segment(tagged, merge_chars=40, max_bytes=600) == (1, True)    # a tag opens a sentence


def test_join_keeps_spacing_as_written() -> None:
    assert join([P("Well,"), P("I think so,", spaced=True), P("はい、", spaced=True), P("そう。", True)]) == \
        "Well, I think so, はい、そう。"


def test_a_burst_gives_the_first_clause_then_sentences() -> None:
    got = whole_answer(CLAUSES)
    assert [p.text for p in got] == ["今日は晴れて、", "午後は風が強くなるので、上着を持ってね。", "夕方は寒いです。"]


def test_the_clock_learns_the_rate_and_estimates_the_end() -> None:
    clock = SpeakingClock(rate=0.1)
    assert clock.free_at() is None and clock.free_in(100.0) == 0.0
    clock.sent(0, 10, now=100.0)
    assert clock.free_at() == pytest.approx(100.0 + CAUTION * 1.0)  # not started: from when it was sent
    clock.speech(0, "started", at=100.2, voice="v")
    clock.sent(1, 5, now=100.3)
    assert clock.free_at() == pytest.approx(100.2 + CAUTION * (1.0 + 0.5))
    clock.speech(0, "finished", at=102.2, voice="v")          # 2 s for 10 characters
    assert clock.rates["v"] == pytest.approx(0.1 + 0.3 * (0.2 - 0.1))
    assert clock.free_at() == pytest.approx(100.3 + CAUTION * 5 * clock.rates["v"])  # 1 had not started
    clock.speech(1, "timeout", at=103.0)
    assert clock.free_at() is None
    clock.sent(2, 4, now=104.0)
    clock.speech(2, "dropped", at=104.1)
    clock.speech(7, "started", at=104.2)                       # not ours: ignored
    assert clock.free_at() is None
    clock.sent(3, 4, now=105.0)
    clock.reset()
    assert clock.free_at() is None


# -- a discrete-event run: tokens arriving, the policy, an avatar speaking at its own rate ---------

def run(tokens: list[tuple[float, str]], seconds_per_char: float, guess: float = 0.1) -> dict:
    """Feed ``tokens`` (arrival time, text) through the cutter and the policy; the avatar speaks one
    segment at a time for ``seconds_per_char`` per character, reporting start and end to the clock
    as the sequencer does. Returns the segments, and the time the avatar was silent while a piece
    waited (between its first start and its last end)."""
    cutter, clock = SentenceCutter(), SpeakingClock(rate=guess)
    waiting: list[Piece] = []
    segments: list[str] = []
    queue: list[str] = []           # sent, not spoken yet (the sequencer's queue)
    speaking_until: float | None = None
    silent_waiting, silent_since = 0.0, None
    events = [(t, 0, i, text) for i, (t, text) in enumerate(tokens)]
    heapq.heapify(events)
    final = False
    now = 0.0

    def pace() -> None:
        nonlocal speaking_until
        while True:
            n = release(waiting, first=not segments, final=final, free_in=clock.free_in(now),
                        merge_chars=40, max_bytes=600)
            if not n:
                break
            text = join(waiting[:n])
            del waiting[:n]
            clock.sent(len(segments), len(text), now)
            segments.append(text)
            queue.append(text)
        if speaking_until is None and queue:
            index = len(segments) - len(queue)
            text = queue.pop(0)
            clock.speech(index, "started", now)
            speaking_until = now + seconds_per_char * len(text)
            heapq.heappush(events, (speaking_until, 1, index, ""))
        free_at = clock.free_at()
        if waiting and free_at is not None and free_at - LEAD > now:
            heapq.heappush(events, (free_at - LEAD, 2, 0, ""))

    while events:
        now, kind, index, text = heapq.heappop(events)
        if kind == 0:
            waiting += cutter.feed(text)
            if index == len(tokens) - 1:
                waiting += cutter.flush()
                final = True
        elif kind == 1:
            clock.speech(index, "finished", now)
            speaking_until = None
        if silent_since is not None:
            silent_waiting += now - silent_since
        pace()
        silent_since = now if speaking_until is None and waiting else None
    return {"segments": segments, "silent_waiting": silent_waiting, "left": waiting}


def stream(text: str, sizes: list[int], first: float, gap: float) -> list[tuple[float, str]]:
    out, pos, k = [], 0, 0
    while pos < len(text):
        size = sizes[k % len(sizes)]
        out.append((first + k * gap, text[pos:pos + size]))
        pos, k = pos + size, k + 1
    return out


ANSWER = ("はい、今日の東京はよく晴れていて、午後から少し風が強くなりそうなので、お出かけの際は上着があると安心です。"
          "夕方には気温も下がりますので、暖かくしてくださいね。")


def test_fast_stream_first_clause_then_whole_sentences() -> None:
    got = run(stream(ANSWER, [2, 1, 3], first=0.4, gap=0.03), seconds_per_char=0.13)
    assert got["segments"][0] == "はい、"
    # はい、 ends before the next sentence is complete: its first clause follows, then whole sentences
    assert got["segments"][1:] == ["今日の東京はよく晴れていて、", "午後から少し風が強くなりそうなので、お出かけの際は上着があると安心です。",
                                   "夕方には気温も下がりますので、暖かくしてくださいね。"]
    assert got["silent_waiting"] == 0.0


def test_slow_stream_speaks_clauses_as_they_come() -> None:
    got = run(stream(ANSWER, [2, 1, 3], first=0.4, gap=0.3), seconds_per_char=0.13)
    assert got["segments"][:2] == ["はい、", "今日の東京はよく晴れていて、"]
    assert got["silent_waiting"] == 0.0


def test_a_burst_is_the_first_clause_then_sentences() -> None:
    got = run([(0.4, ANSWER[:30]), (0.7, ANSWER[30:])], seconds_per_char=0.13)
    assert got["segments"][0] == "はい、" and got["silent_waiting"] == 0.0
    assert "お出かけの際は上着があると安心です。" in got["segments"] or \
        "午後から少し風が強くなりそうなので、お出かけの際は上着があると安心です。" in got["segments"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["はい、", "今日は晴れていて、", "東京、大阪", "です。", "Well, ", "I think so. ",
                                 "午後から風が強くなるので、", "上着を持ってね。", "1,000円", "「そう、ね」", "！"]),
                min_size=1, max_size=15),
       st.lists(st.integers(1, 4), min_size=1, max_size=5), st.sampled_from([0.005, 0.03, 0.12, 0.5]),
       st.sampled_from([0.02, 0.13, 0.3]), st.sampled_from([0.05, 0.1, 0.4]))
def test_never_silent_while_a_clause_waits_and_nothing_lost(parts, sizes, gap, rate, guess) -> None:
    text = "".join(parts)
    got = run(stream(text, sizes, first=0.4, gap=gap), seconds_per_char=rate, guess=guess)
    cutter = SentenceCutter()
    pieces = cutter.feed(text) + cutter.flush()
    assert letters("".join(got["segments"])) == letters("".join(p.text for p in pieces))
    assert not got["left"]
    if pieces:
        assert got["segments"][0] == pieces[0].text
    assert got["silent_waiting"] == 0.0
    # every segment is whole pieces, in order
    flat = [p.text for p in pieces]
    i = 0
    for segment in got["segments"]:
        j = i + 1
        while j <= len(flat) and letters("".join(flat[i:j])) != letters(segment):
            j += 1
        assert j <= len(flat), (segment, flat[i:])
        i = j


def test_a_resumed_answer_skips_the_pieces_the_user_heard() -> None:
    assert unheard(P("はい、"), 5) == (None, 3)
    assert unheard(P("そうです。", True), 4) == (None, 0)
    assert unheard(P("そうです。", True), 0)[0] == P("そうです。", True)
    # a cut that moved (the settings changed): the unheard end is said, from a letter
    assert unheard(P("はい、そうです。", True), 2) == (P("そうです。", True), 0)
