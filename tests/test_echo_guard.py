"""The echo guard and backchannels end to end: real stage processes, the real openai client
against the local streaming server, and the fake MMDAgent-EX feeding the avatar's own speech
back as recognition results (its ``echo`` option: a loudspeaker the microphone hears)."""

from __future__ import annotations

import pytest

from stages.llm.offline_responder import ChatCompletionServer
from tests.e2e import ScriptedLLM, World, launched, tokens_of, words
from tests.test_barge_in import Mark, history_of, utter, wait_speech, wait_spoken

ECHOING = {"seconds_per_char": 0.01, "min_speech": 0.08, "stop_delay": 0.1, "cut_delay": 0.1,
           "echo": True, "echo_delay": 0.03, "echo_tail": 0.1, "echo_errors": 0.1}
LONG = ("今日はとても良い天気なので、公園を散歩するのがおすすめです。桜もきれいに咲いていますよ。"
        "お弁当を持って行くのもいいですね。")
WAIT = 15.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    server = ChatCompletionServer(ScriptedLLM(default="はい、わかりました。")).start()
    try:
        with launched(tmp_path_factory.mktemp("echo"), server=server, avatar_kwargs=ECHOING,
                      turn={"echo_guard": True, "backchannels": True, "listen_timeout": 2.0}) as w:
            yield w
    finally:
        server.stop()


def echoes_settled(world: World, mark: Mark, said: int) -> bool:
    """Every sentence played since ``mark`` came back as a result (besides the ``said`` of the
    user), and the bridge has taken each (its ``mmd`` event is published after turn control decided)."""
    played = sum(1 for r in world.avatar.inbox[mark.inbox:] if r.line == "SYNTH_EVENT_START|0")
    results = sum(1 for r in world.avatar.inbox[mark.inbox:] if r.line.startswith("RECOG_EVENT_STOP|"))
    taken = sum(1 for e in mark.envelopes() if e.kind == "mmd" and e.body["type"] == "RECOG_EVENT_STOP")
    return results >= played + said and taken >= results


def test_twenty_turns_with_its_own_voice_heard_and_no_answer_to_it(world: World):
    mark = Mark(world)
    asked = [f"質問{i}番です" for i in range(20)]
    for i, text in enumerate(asked):
        world.llm.queue(tokens_of(f"はい、{i}番のご質問ですね。", delay=0.0))
        turn = world.talk(text)
        assert turn.result["reason"] == "done", (text, turn.result)
    assert world.bus.wait_for(lambda _: echoes_settled(world, mark, len(asked)), WAIT), "the echoes did not all come back"
    envs = mark.envelopes()
    assert [e.body["text"] for e in envs if e.kind == "turn_start"] == asked  # no turn of its own words
    assert sum(1 for e in envs if e.kind == "spoken") == 20
    assert not [e for e in envs if e.kind == "cancel"] and "SYNTH_STOP|0" not in mark.lines()
    played = [r for r in world.avatar.inbox[mark.inbox:] if r.line == "SYNTH_EVENT_START|0"]
    results = [r for r in world.avatar.inbox[mark.inbox:] if r.line.startswith("RECOG_EVENT_STOP|")]
    assert len(played) >= 40 and len(results) == len(played) + 20  # every sentence heard, and the questions


def test_a_backchannel_while_it_speaks_interrupts_nothing(world: World):
    mark = Mark(world)
    world.llm.queue(tokens_of(LONG))
    turn = utter(world, "今日は何をしたらいい")
    wait_speech(world, turn, "今日はとても良い天気なので、")
    world.avatar.send("RECOG_EVENT_START")
    world.avatar.send("RECOG_EVENT_STOP|うん")
    wait_spoken(world, turn)
    assert "SYNTH_STOP|0" not in mark.lines()
    said = [line.split("|", 3)[3] for line in mark.lines() if line.startswith("SYNTH_START|")]
    assert words(said) == words([LONG])
    assert [e.body["text"] for e in mark.envelopes() if e.kind == "turn_start"] == ["今日は何をしたらいい"]


def test_other_words_while_it_speaks_stop_it(world: World):
    mark = Mark(world)
    world.llm.queue(tokens_of(LONG), tokens_of("はい、待ちます。"))
    old = utter(world, "おすすめは")
    wait_speech(world, old, "今日はとても良い天気なので、")
    new = utter(world, "ちょっと待って")
    assert world.avatar.wait_line("SYNTH_STOP|0", WAIT, after=mark.line)
    wait_spoken(world, new)
    assert [e.body["reason"] for e in world.bus.of("cancel", old)] == ["interrupted"]
    assert [e.body["text"] for e in mark.envelopes() if e.kind == "turn_start"] == ["おすすめは", "ちょっと待って"]
    assert ("user", "ちょっと待って") == history_of(world)[-1]
    assert any(role == "assistant" and text.endswith("[interrupted]") for role, text in history_of(world))
