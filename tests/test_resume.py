"""A stage killed in the middle of an answer costs nothing of it (issue 16): the avatar finishes
the sentence it is saying, the rest of the answer follows, each sentence once and in order, and
history keeps the whole answer. The llm killed mid-stream: the rest is asked for with what was
heard as the answer's beginning (``[llm] prefill``), or the turn ends with the notice."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from stages.llm.offline_responder import Token
from tests.e2e import World, managed, speech_pattern_ok, tokens_of
from tests.test_restart import pid_of, restarted

# the second, said when a stage is killed, lasts longer than a restart; the others are short
SENTENCES = ["はじめの文です。", "二つ目の文はゆっくりと長めに話します。", "三つ目です。", "おわりです。"]
ANSWER = "".join(SENTENCES)
VOICE = "SYNTH_START|0|mei_voice_normal|"
# a sentence lasts longer than a stage takes to restart: a restarted sequencer is handed the next
# segment while the avatar still says the last (seen on a real MMDAgent-EX: it cut it off)
SLOW_AVATAR = {"seconds_per_char": 0.15, "min_speech": 0.3}


def reply(body: dict) -> list[Token]:
    """The answer, the last half slowly (still streaming while the second sentence is said); a
    request that ends with the answer's beginning gets the rest of it, as llama.cpp would."""
    messages = body["messages"]
    if messages[-1]["content"] == "ありがとう":
        return tokens_of("はい。")
    if messages[-1]["role"] == "assistant":
        assert ANSWER.startswith(messages[-1]["content"]), messages[-1]
        return tokens_of(ANSWER[len(messages[-1]["content"]):])
    half = len(SENTENCES[0]) + len(SENTENCES[1])
    return [*tokens_of(ANSWER[:half]), *(Token(t.text, 0.3) for t in tokens_of(ANSWER[half:], seed=2))]


def ask(world: World) -> tuple[int, int]:
    """Ask; return where the avatar's received lines and the bus stood before."""
    start, since = len(world.avatar.received), len(world.bus.envelopes)
    world.avatar.send("RECOG_EVENT_START")
    world.avatar.send("RECOG_EVENT_STOP|長い話をして")
    return start, since


def kill_while_saying(world: World, stage: str, since: int, index: int) -> None:
    """SIGKILL ``stage`` once the avatar has begun sentence ``index`` (the sequencer says so)."""
    assert world.bus.wait_for(lambda envs: any(e.kind == "speech" and e.body["state"] == "started"
                                               and e.body["index"] == index for e in envs[since:]), 20)
    old = pid_of(world, stage)
    os.kill(old, signal.SIGKILL)
    assert restarted(world, stage, old)


def said(world: World, start: int) -> list[str]:
    return [r.line[len(VOICE):] for r in world.avatar.received[start:] if r.line.startswith(VOICE)]


def wait_said(world: World, start: int, since: int, last: str, timeout: float = 30.0) -> list[str]:
    """What the avatar was given to say once ``last`` was, and the turn is over (all spoken)."""
    world.avatar.wait_for(lambda lines: any(r.line == VOICE + last for r in lines[start:]), timeout)
    world.bus.wait_for(lambda envs: any(e.kind == "spoken" for e in envs[since:]), timeout)
    return said(world, start)


@pytest.mark.parametrize("stage", ["sequencer", "segmenter", "broker"])
def test_the_rest_of_the_answer_is_said_after_a_stage_dies_in_its_middle(tmp_path: Path, stage: str):
    with managed(tmp_path, reply=reply, avatar_kwargs=SLOW_AVATAR, bus={"peer_timeout": 2.5}) as world:
        start, since = ask(world)
        kill_while_saying(world, stage, since, 1)
        got = wait_said(world, start, since, SENTENCES[-1])
        assert got == SENTENCES, got                                        # each once, in order
        assert not any(r.line.startswith("SYNTH_STOP") for r in world.avatar.received[start:])
        assert speech_pattern_ok(world.avatar), "a sentence was cut off"
        assert world.talk("ありがとう").spoken == ["はい。"]  # the conversation goes on
        history = [m for m in world.server.requests[-1]["messages"] if m["role"] == "assistant"]
        assert history[-1]["content"] == ANSWER                            # all of it was heard


def test_the_llm_killed_mid_stream_is_asked_for_the_rest_with_prefill(tmp_path: Path):
    with managed(tmp_path, reply=reply, avatar_kwargs=SLOW_AVATAR, bus={"peer_timeout": 2.5},
                 llm={"prefill": True}) as world:
        start, since = ask(world)
        kill_while_saying(world, "llm", since, 1)
        got = wait_said(world, start, since, SENTENCES[-1])
        assert got == SENTENCES, got
        continued = world.server.requests[-1]["messages"]
        assert continued[-1]["role"] == "assistant" and ANSWER.startswith(continued[-1]["content"])
        assert len(continued[-1]["content"]) >= len(SENTENCES[0] + SENTENCES[1])   # what was written, at least


def test_the_llm_killed_mid_stream_without_prefill_ends_with_the_notice(tmp_path: Path):
    with managed(tmp_path, reply=reply, avatar_kwargs=SLOW_AVATAR, bus={"peer_timeout": 2.5}) as world:
        notice = world.cfg["turn"]["failure_notice"]
        start, since = ask(world)
        kill_while_saying(world, "llm", since, 1)
        world.avatar.wait_for(lambda lines: any(r.line == VOICE + notice for r in lines[start:]), 30)
        got = said(world, start)
        assert got[-1] == notice and got[:-1] == SENTENCES[:len(got) - 1], got
        assert len(world.server.requests) == 1  # not asked again: OpenAI would start a new answer
        world.avatar.send("RECOG_EVENT_START")  # cuts the notice short: it is in no history
        world.avatar.send("RECOG_EVENT_STOP|続けて")
        assert world.bus.wait_for(lambda envs: len(world.server.requests) > 1, 20)
        history = [(m["role"], m["content"]) for m in world.server.requests[1]["messages"][1:-1]]
        heard = "".join(got[:-1])
        assert history == [("user", "長い話をして"), ("assistant", f"{heard} [interrupted]")], history
