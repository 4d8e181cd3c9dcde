"""Barge-in and turn control, end to end: real stage processes, the real openai client against
the local streaming server, the fake MMDAgent-EX; the exact lines it receives, the LLM
connection, and what history holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import wire
from stages.llm.offline_responder import ChatCompletionServer, Stall
from tests.e2e import ScriptedLLM, World, launched, tokens_of

VOICE = "SYNTH_START|0|mei_voice_normal|"
SLOW_AVATAR = {"seconds_per_char": 0.08, "min_speech": 0.3, "stop_delay": 0.3, "cut_delay": 0.3}
ANSWER = "一文目です。二文目です。三文目です。"
WAIT = 15.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    server = ChatCompletionServer(ScriptedLLM(default="はい。")).start()
    try:
        with launched(tmp_path_factory.mktemp("barge"), server=server, avatar_kwargs=SLOW_AVATAR,
                      turn={"listen_timeout": 0.5}) as w:
            yield w
    finally:
        server.stop()


class Mark:
    """Where the test started reading: lines the avatar received, envelopes, requests."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.line = len(world.avatar.received)
        self.env = len(world.bus.envelopes)
        self.request = len(world.server.requests)
        self.connection = len(world.server.connections)
        self.inbox = len(world.avatar.inbox)

    def lines(self) -> list[str]:
        return [r.line for r in self.world.avatar.received[self.line:]]

    def envelopes(self) -> list[wire.Envelope]:
        return self.world.bus.envelopes[self.env:]


def utter(world: World, text: str, start: bool = True) -> int:
    """The user says ``text``; returns the turn it opened."""
    before = len(world.bus.envelopes)
    if start:
        world.avatar.send("RECOG_EVENT_START")
    world.avatar.send(f"RECOG_EVENT_STOP|{text}")
    turn = world.bus.wait_for(lambda envs: next((e.turn for e in envs[before:] if e.kind == "turn_start"
                                                  and e.body["text"] == text), 0), WAIT)
    assert turn, f"no turn for {text!r}"
    return turn


def wait_speech(world: World, turn: int, text: str, state: str = "started") -> None:
    assert world.bus.wait_for(lambda envs: any(e.kind == "speech" and e.turn == turn and e.body["text"] == text
                                               and e.body["state"] == state for e in envs), WAIT), (turn, text, state)


def wait_spoken(world: World, turn: int) -> None:
    assert world.bus.wait_for(lambda envs: any(e.kind == "spoken" and e.turn == turn for e in envs), WAIT), turn


def interrupt(world: World) -> int:
    """RECOG_EVENT_START; returns the number of lines received before it."""
    n = len(world.avatar.received)
    world.avatar.send("RECOG_EVENT_START")
    return n


def no_old_speech_after_new_turn(envs: list[wire.Envelope]) -> bool:
    newest = 0
    for e in envs:
        if e.kind == "turn_start":
            newest = max(newest, e.turn)
        elif e.kind == "written" and e.body["type"] == "SYNTH_START" and e.turn and e.turn < newest:
            return False
    return True


def no_cut_off_by_synth_start(world: World, mark: Mark) -> bool:
    """Every speech cut (LIPSYNC_STOP) came from our SYNTH_STOP, never from a SYNTH_START sent over
    speech: the extra SYNTH_EVENT_STOP after a stop was not taken as the end of the next sentence."""
    cuts = sum(1 for r in world.avatar.inbox[mark.inbox:] if r.line == "LIPSYNC_STOP|0")
    return cuts == mark.lines().count("SYNTH_STOP|0")


def history_of(world: World, request_index: int = -1) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in world.server.requests[request_index]["messages"][1:]]


def closed_by_client(world: World, mark: Mark, index: int = 0) -> bool:
    return world.server.wait_for(lambda _: len(world.server.connections) > mark.connection + index
                                 and world.server.connections[mark.connection + index].closed_by_client, WAIT)


def all_connections_closed(world: World, mark: Mark) -> bool:
    """No LLM request since ``mark`` is left open (finished, or closed by the client)."""
    return world.server.wait_for(lambda srv: all(c.closed is not None for c in srv.connections[mark.connection:]),
                                 WAIT)


def assert_clean(world: World, mark: Mark) -> None:
    """What must hold after any interruption: no request left open, no old speech after a new
    turn started, no speech cut off by a SYNTH_START."""
    assert all_connections_closed(world, mark)
    assert no_old_speech_after_new_turn(mark.envelopes())
    assert no_cut_off_by_synth_start(world, mark)


def finish_with(world: World, text: str, answer: str = "はい。") -> int:
    world.llm.queue(tokens_of(answer))
    turn = utter(world, text)
    wait_spoken(world, turn)
    return turn


def cue_of(world: World, turn: int, index: int) -> wire.Envelope | None:
    """The sequencer's cue (sent ahead, ``after``) for segment ``index`` of ``turn``, as mirrored on the bus."""
    return next((e for e in world.bus.of("command", turn) if e.body.get("segment") == index
                 and e.body.get("after") == index - 1), None)


def test_the_next_sentence_is_written_straight_from_the_stop_of_the_one_before(world: World):
    """No hop between sentences: each later SYNTH_START was cued ahead and written by the bridge
    from the very SYNTH_EVENT_STOP line that ended the sentence before (the same origin)."""
    mark = Mark(world)
    world.llm.queue(tokens_of(ANSWER, delay=0.0))  # all of it streamed while the first is spoken
    turn = utter(world, "質問ゼロ")
    wait_spoken(world, turn)
    assert mark.lines() == [VOICE + s for s in ("一文目です。", "二文目です。", "三文目です。")]
    stops = [e for e in mark.envelopes() if e.kind == "mmd" and e.body["type"] == "SYNTH_EVENT_STOP"]
    written = [e for e in world.bus.of("written", turn) if e.body["type"] == "SYNTH_START"]
    for index in (1, 2):
        assert cue_of(world, turn, index), f"segment {index} was not cued"
        assert written[index].origin in {e.origin for e in stops}, f"segment {index} waited for a hop"
    assert_clean(world, mark)


def test_interruption_during_the_first_segment(world: World):
    mark = Mark(world)
    world.llm.queue(tokens_of(ANSWER))
    old = utter(world, "質問一")
    wait_speech(world, old, "一文目です。")
    # the second sentence is held by the bridge (its cue), and must not survive the interruption
    assert world.bus.wait_for(lambda _: cue_of(world, old, 1), WAIT)
    interrupt(world)
    finish_with(world, "割り込み一")
    assert mark.lines() == [VOICE + "一文目です。", "SYNTH_STOP|0", VOICE + "はい。"]
    assert ("user", "質問一") in history_of(world) and ("assistant", "一文目です。 [interrupted]") in history_of(world)
    assert_clean(world, mark)


def test_interruption_during_a_later_segment(world: World):
    mark = Mark(world)
    world.llm.queue(tokens_of(ANSWER))
    old = utter(world, "質問二")
    wait_speech(world, old, "二文目です。")
    interrupt(world)
    finish_with(world, "割り込み二")
    assert mark.lines() == [VOICE + "一文目です。", VOICE + "二文目です。", "SYNTH_STOP|0", VOICE + "はい。"]
    assert ("assistant", "一文目です。二文目です。 [interrupted]") in history_of(world)
    assert_clean(world, mark)


def test_interruption_while_the_llm_is_still_streaming_closes_the_connection(world: World):
    mark = Mark(world)
    # the stream pauses right after the first sentence: it is spoken anyway ([segmenter] pause_release)
    world.llm.queue(tokens_of("一文目です。") + [Stall(60)])
    old = utter(world, "質問三")
    wait_speech(world, old, "一文目です。")
    interrupt(world)
    assert closed_by_client(world, mark)
    finish_with(world, "割り込み三")
    assert mark.lines() == [VOICE + "一文目です。", "SYNTH_STOP|0", VOICE + "はい。"]
    assert ("assistant", "一文目です。 [interrupted]") in history_of(world)
    assert [e.body["reason"] for e in world.bus.of("turn_result", old)] == ["interrupted"]
    assert_clean(world, mark)


def test_interruption_before_the_first_token(world: World):
    mark = Mark(world)
    world.llm.queue([Stall(60)])
    old = utter(world, "質問四")
    assert world.server.wait_for(lambda _: len(world.server.requests) > mark.request, WAIT)
    interrupt(world)
    assert closed_by_client(world, mark)
    finish_with(world, "割り込み四")
    assert mark.lines() == [VOICE + "はい。"]  # nothing was speaking: no SYNTH_STOP
    assert len(world.server.requests) == mark.request + 2  # the cut request was not retried
    assert ("user", "質問四") in history_of(world) and ("assistant", "[interrupted]") in history_of(world)
    assert not [e for e in world.bus.of("written", old)]
    assert_clean(world, mark)


def test_cancel_overtakes_a_long_queue_of_tokens_and_segments(world: World):
    mark = Mark(world)
    long_answer = "".join(f"これは{i}番目の文です。" for i in range(300))
    world.llm.queue(tokens_of(long_answer, delay=0.0))  # all of it at once: queues fill up
    old = utter(world, "長い答え")
    wait_speech(world, old, "これは0番目の文です。")
    interrupt(world)
    finish_with(world, "止まって")
    assert mark.lines() == [VOICE + "これは0番目の文です。", "SYNTH_STOP|0", VOICE + "はい。"]
    assert ("assistant", "これは0番目の文です。 [interrupted]") in history_of(world)
    assert_clean(world, mark)


def test_two_interruptions_in_a_row(world: World):
    mark = Mark(world)
    world.llm.queue(tokens_of(ANSWER), tokens_of("二回目の答えです。まだ続きます。"))
    first = utter(world, "質問五")
    wait_speech(world, first, "一文目です。")
    interrupt(world)
    second = utter(world, "割り込み五")
    wait_speech(world, second, "二回目の答えです。")
    interrupt(world)
    finish_with(world, "割り込み六")
    assert mark.lines() == [VOICE + "一文目です。", "SYNTH_STOP|0", VOICE + "二回目の答えです。", "SYNTH_STOP|0",
                            VOICE + "はい。"]
    history = history_of(world)
    assert ("assistant", "一文目です。 [interrupted]") in history
    assert ("assistant", "二回目の答えです。 [interrupted]") in history
    assert_clean(world, mark)


def test_new_utterance_supersedes_a_running_turn(world: World):
    mark = Mark(world)
    world.llm.queue(tokens_of(ANSWER))
    old = utter(world, "質問七")
    wait_speech(world, old, "一文目です。")
    world.llm.queue(tokens_of("新しい答えです。"))
    new = utter(world, "質問八", start=False)  # a result with no RECOG_EVENT_START before it
    wait_spoken(world, new)
    assert mark.lines() == [VOICE + "一文目です。", "SYNTH_STOP|0", VOICE + "新しい答えです。"]
    assert [e.body["reason"] for e in world.bus.of("cancel", old)] == ["superseded"]
    assert ("assistant", "一文目です。 [interrupted]") in history_of(world)
    assert history_of(world)[-1] == ("user", "質問八")
    assert_clean(world, mark)


def test_a_noise_without_a_result_loses_nothing(world: World):
    mark = Mark(world)
    world.llm.queue(tokens_of(ANSWER))
    old = utter(world, "質問九")
    wait_speech(world, old, "一文目です。")
    interrupt(world)  # ...and no RECOG_EVENT_STOP follows: listen_timeout 0.5 s
    assert world.bus.wait_for(lambda envs: any(e.kind == "heartbeat" and e.body["stage"] == "bridge"
                                               and e.body["info"]["state"] == "idle" and e.ts > envs[mark.env].ts
                                               for e in envs[mark.env:]), WAIT)
    finish_with(world, "次の質問")
    assert mark.lines() == [VOICE + "一文目です。", "SYNTH_STOP|0", VOICE + "はい。"]
    assert ("assistant", "一文目です。 [interrupted]") in history_of(world)
    assert_clean(world, mark)
    # the noise while idle changes nothing either
    mark = Mark(world)
    world.avatar.send("RECOG_EVENT_START")
    finish_with(world, "もう一つ")
    assert mark.lines() == [VOICE + "はい。"]


def test_away_pauses_answering_until_it_is_off(world: World):
    mark = Mark(world)
    world.avatar.send("RECOG_EVENT_AWAY|ON")
    world.avatar.send("RECOG_EVENT_START")
    world.avatar.send("RECOG_EVENT_STOP|留守中の声")
    world.avatar.send("RECOG_EVENT_AWAY|OFF")
    finish_with(world, "戻りました")
    assert mark.lines() == [VOICE + "はい。"]
    assert not any(e.kind == "turn_start" and e.body["text"] == "留守中の声" for e in mark.envelopes())


def test_ignore_policy_does_not_answer_its_own_voice(tmp_path: Path):
    server = ChatCompletionServer(ScriptedLLM(default="はい。")).start()
    try:
        with launched(tmp_path, server=server, avatar_kwargs=SLOW_AVATAR,
                      turn={"barge_in": "ignore", "echo_grace": 0.5}) as world:
            mark = Mark(world)
            world.llm.queue(tokens_of(ANSWER))
            turn = utter(world, "質問")
            wait_speech(world, turn, "一文目です。")
            world.avatar.send("RECOG_EVENT_START")              # the microphone hears the avatar
            world.avatar.send("RECOG_EVENT_STOP|一文目です")
            wait_spoken(world, turn)
            world.avatar.send("RECOG_EVENT_STOP|三文目です")      # the echo of the last sentence, in the grace time
            world.llm.queue(tokens_of("本当の答えです。"))
            spoken_at = world.bus.of("spoken", turn)[0].ts
            assert world.bus.wait_for(lambda envs: any(e.kind == "heartbeat" and e.body["stage"] == "bridge"
                                                       and e.ts > spoken_at + 0.6 for e in envs), WAIT)
            real = utter(world, "本当の質問")
            wait_spoken(world, real)
            lines = mark.lines()
            texts = [e.body["text"] for e in mark.envelopes() if e.kind == "turn_start"]
            history = history_of(world)
    finally:
        server.stop()
    assert lines == [VOICE + s for s in ("一文目です。", "二文目です。", "三文目です。", "本当の答えです。")]
    assert texts == ["質問", "本当の質問"]
    assert history[-1] == ("user", "本当の質問") and ("assistant", ANSWER) in history
