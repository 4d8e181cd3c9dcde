"""MMDAgent-EX closed in the middle of an answer and opened again at once: the new bridge's first
answer comes as fast as any other, nothing waits for events the dead MMDAgent-EX cannot send
(``cancel`` with reason ``gone``, see :mod:`stages.bridge.turns`), and history keeps what was heard.

The speech timeouts are set far above the deadlines asserted here: a sequencer still waiting for
the old avatar's ``SYNTH_EVENT_STOP`` (what users saw: the first answer 13-25 s late) fails the
test instead of passing slowly."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from broker import config as config_mod
from stages.commands.avatar_sim import SimulatedMMDAgent
from tests.e2e import Token, World, bridge_sees_pipeline, managed, start_avatar, tokens_of
from tests.harness import pipeline_env, processes_with, write_config

LONG = "一つ目の文はとても長くて、ゆっくりと話しています。二つ目の文が続きます。三つ目で終わります。"
STALL = {"start_timeout": 40.0, "stop_timeout_base": 60.0}  # a wait on the dead avatar: longer than any deadline here
ANSWER_WITHIN = 15.0  # seconds; the old behaviour took 30 s or more with STALL


def reopen(world: World) -> float:
    """Kill the fake MMDAgent-EX (SIGKILL of its plugin, as MMDAgent-EX does on quit), start a new
    one at once, ask, and return the seconds from the utterance to its first SYNTH_START."""
    world.avatar.kill()
    env = {k: v for k, v in world.env.items() if k != config_mod.ENV_CONFIG}
    world.avatar = start_avatar(world.cfg, Path(world.avatar.mdf_dir),
                                env, seconds_per_char=0.005, min_speech=0.05)
    world.llm.queue(tokens_of("新しい答えです。"))
    said = time.monotonic()
    turn = world.talk("もう一度お願いします", timeout=ANSWER_WITHIN)
    first = world.avatar.wait_line("SYNTH_START|", 1)
    assert turn.spoken == ["新しい答えです。"]
    return first.t - said


@pytest.mark.parametrize("moment", ["speaking", "between", "streaming"])
def test_mmdagent_ex_reopened_mid_answer_answers_at_once(tmp_path: Path, moment: str):
    with managed(tmp_path, runner="honcho", speech=STALL,
                 avatar_kwargs={"seconds_per_char": 0.05, "min_speech": 0.3}) as world:
        slow = moment == "streaming"
        world.llm.queue([*tokens_of(LONG[:25]), *(Token(t.text, 0.4) for t in tokens_of(LONG[25:]))] if slow
                        else tokens_of(LONG))
        world.avatar.send("RECOG_EVENT_START")
        world.avatar.send("RECOG_EVENT_STOP|長い質問")
        # the bridge has read the event (the sequencer reports it): the user heard the sentence begin
        state = "finished" if moment == "between" else "started"
        assert world.bus.wait_for(lambda envs: any(e.kind == "speech" and e.body["state"] == state for e in envs),
                                  20), f"no sentence {state}"
        if slow:
            assert not world.bus.of("turn_result"), "the answer was not still streaming"
        elapsed = reopen(world)
        print(f"\n{moment}: first SYNTH_START {elapsed * 1000:.0f} ms after the utterance")
        asked = [m for m in world.server.requests[-1]["messages"] if m["role"] == "assistant"]
        assert asked and "三つ目" not in asked[-1]["content"], "history keeps more than the user heard"
        assert asked[-1]["content"].startswith("一つ目の文は")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("keeper", ["builtin", "supervisord"])
def test_a_plugin_started_at_once_after_the_last_one_was_killed_answers(tmp_path: Path, own_state: Path,
                                                                        keeper: str):
    """A plugin's pipeline dies with it; a plugin started at once must not join the dying one (then
    nothing would keep it: :func:`broker.sessions.leaving`), but have a pipeline of its own."""
    mark = f"mark-{uuid.uuid4().hex}"
    mdf = tmp_path / "content"
    mdf.mkdir()
    cfg_path = write_config(mdf, plugin={"pipeline": keeper})
    cfg = config_mod.load(cfg_path)
    env = {k: v for k, v in pipeline_env(cfg_path, None).items() if k != config_mod.ENV_CONFIG}
    env["XDG_STATE_HOME"] = str(own_state)
    env["TEST_MMDAGENT_MARK"] = mark
    avatars: list[SimulatedMMDAgent] = []
    try:
        for round_ in range(2):
            avatar = SimulatedMMDAgent("mmdagent-llm plugin", mdf_dir=mdf, env=env,
                                       stderr=open(tmp_path / f"plugin-{round_}.log", "wb"),
                                       seconds_per_char=0.05, min_speech=0.3).start()
            avatars.append(avatar)
            bridge_sees_pipeline(cfg, 40)
            mark_line = len(avatar.received)
            avatar.send("RECOG_EVENT_START")
            avatar.send("RECOG_EVENT_STOP|こんにちは")
            assert avatar.wait_line("SYNTH_START|0|", 20, after=mark_line), f"round {round_}: no answer"
            assert avatar.wait_inbox_line("SYNTH_EVENT_START|0", 10)
            if round_ == 0:
                avatar.kill()  # MMDAgent-EX quits mid-sentence; the next plugin starts at once
        log = (tmp_path / "plugin-1.log").read_text(errors="replace")
        assert "a plugin that has ended" in log or "no pipeline running" in log
        assert "joining it" not in log
    finally:
        for avatar in avatars:
            avatar.kill()
        for pid in processes_with(mark):
            os.kill(pid, signal.SIGKILL)
