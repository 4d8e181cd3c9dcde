"""Talking first (``mmdagent-llm input idle``) end to end: the real pipeline, the fake MMDAgent-EX, the
idle input as a process of its own. It asks after ``after`` seconds with nothing going on, never
while the user speaks, never more often than ``every``; each wait is on bus events, with a deadline."""

from __future__ import annotations

from pathlib import Path

from broker import wire
from stages.llm.offline_responder import ChatCompletionServer
from tests.e2e import Observer, ScriptedLLM, launched

AFTER, EVERY = 1.0, 2.0
SLACK = 0.05  # the envelopes' wall-clock stamps come from two processes


def test_the_avatar_talks_first_when_quiet_never_over_the_user_and_at_most_every(tmp_path: Path):
    server = ChatCompletionServer(ScriptedLLM(default="はい、みなさん、お元気ですか？")).start()
    try:
        with launched(tmp_path, server=server, idle={"after": AFTER, "every": EVERY, "prompt": "（{topic}の話をして）",
                                                     "topics": ["花", "月"]},
                      avatar_kwargs={"seconds_per_char": 0.002, "min_speech": 0.02}) as world, \
                Observer(world, "idle", command="input"):
            bus = world.bus

            def idle_inputs(envs: list[wire.Envelope]) -> list[wire.Envelope]:
                return [e for e in envs if e.kind == "input" and e.sender == "idle"]

            def spoken_after(n: int):
                """The n-th idle turn, once spoken: (its input, its spoken)."""
                def check(envs: list[wire.Envelope]):
                    starts = [e for e in envs if e.kind == "turn_start" and e.body.get("source") == "idle"]
                    if len(starts) < n:
                        return None
                    turn = starts[n - 1].turn
                    done = next((e for e in envs if e.kind == "spoken" and e.turn == turn), None)
                    result = next((e for e in envs if e.kind == "input_result" and e.body.get("turn") == turn), None)
                    asked = next((e for e in idle_inputs(envs) if result and e.body["id"] == result.body["id"]), None)
                    return done and asked and (asked, done)
                return check

            first, first_spoken = bus.wait_for(spoken_after(1), 15) or (None, None)
            assert first is not None, "the avatar did not talk first"
            second, second_spoken = bus.wait_for(spoken_after(2), 10) or (None, None)
            assert second is not None, "the avatar did not talk first a second time"
            assert second.ts - first_spoken.ts >= AFTER - SLACK and second.ts - first.ts >= EVERY - SLACK

            # the user starts speaking and goes on for longer than both after and every: nothing is asked
            world.avatar.send("RECOG_EVENT_START")
            assert not bus.wait_for(lambda envs: len(idle_inputs(envs)) > 2, EVERY + 0.3), \
                "the idle input asked while the user was speaking"
            world.avatar.send("RECOG_EVENT_STOP|今日はいい天気ですね")
            user_turn = bus.wait_for(lambda envs: next((e.turn for e in envs if e.kind == "turn_start"
                                                        and e.body["text"] == "今日はいい天気ですね"), 0), 10)
            assert user_turn, "the user's utterance opened no turn"
            user_spoken = bus.wait_for(lambda envs: next((e for e in envs if e.kind == "spoken"
                                                          and e.turn == user_turn), None), 10)
            third, _ = bus.wait_for(spoken_after(3), 10) or (None, None)
            assert third is not None and third.ts - user_spoken.ts >= AFTER - SLACK

            asked = idle_inputs(bus.envelopes)
            results = {e.body["id"]: e.body for e in bus.of("input_result")}
    finally:
        server.stop()
    assert [e.body["text"] for e in asked[:3]] == ["（花の話をして）", "（月の話をして）", "（花の話をして）"]
    assert all(e.body["when"] == "idle" and e.body["action"] == "ask" for e in asked)
    assert all(results[e.body["id"]]["ok"] for e in asked[:3])
    assert all(b.ts - a.ts >= EVERY - SLACK for a, b in zip(asked, asked[1:]))
    # never while the user spoke: no idle input between RECOG_EVENT_START and RECOG_EVENT_STOP
    speaking = [e.ts for e in world.bus.envelopes if e.kind == "mmd" and e.body["type"].startswith("RECOG_EVENT_")]
    assert len(speaking) == 2 and not [e for e in asked if speaking[0] <= e.ts <= speaking[1]]
