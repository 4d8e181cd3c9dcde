"""Expression, end to end: tagged answers through the real stage processes to the exact
MOTION_ADD and SYNTH_START lines the fake MMDAgent-EX receives; barge-in in the middle of a
tagged answer; listening and thinking motions around a slow first token; hostile tags; a
motion file the content does not have; the vocabulary's checks."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import pytest

from broker import config as config_mod
from stages.commands.doctor import check_motions
from stages.expression import GESTURE, MOOD
from stages.llm.offline_responder import ChatCompletionServer, Stall, Token
from tests.e2e import Observer, ScriptedLLM, World, launched, tokens_of
from tests.harness import write_config

NAMES = {"neutral": {"voice": "mei_voice_normal"},
         "happy": {"voice": "mei_voice_happy", "motion": "motions/laugh.vmd"},
         "sad": {"voice": "mei_voice_sad"},
         "greeting": {"motion": "motions/greeting.vmd", "priority": 2},
         "listening": {"motion": "motions/listen.vmd", "play": "LOOP"},
         "thinking": {"motion": "motions/think.vmd", "play": "LOOP"},
         "ghost": {"motion": "motions/not_in_the_content.vmd"}}
FILES = ("laugh.vmd", "greeting.vmd", "listen.vmd", "think.vmd")
WAIT = 20.0


def gesture(file: str, priority: str = "0") -> str:
    return f"MOTION_ADD|0|{GESTURE}|motions/{file}|PART|ONCE|ON|OFF|{priority}"


def voice(alias: str, text: str) -> str:
    return f"SYNTH_START|0|{alias}|{text}"


@contextlib.contextmanager
def expressive(tmp: Path, avatar: dict | None = None, **expression) -> Iterator[World]:
    """The pipeline with :data:`NAMES`, its content folder holding :data:`FILES` (not the ghost's)."""
    server = ChatCompletionServer(ScriptedLLM(default="はい。")).start()
    try:
        with open(tmp / "bridge.log", "wb") as bridge_log, \
                launched(tmp, server=server, avatar_kwargs={"seconds_per_char": 0.01, "min_speech": 0.05,
                                                           "stderr": bridge_log, **(avatar or {})},
                         expression={"listening": "", "thinking": "", "names": NAMES, **expression}) as world:
            (tmp / "content" / "motions").mkdir()
            for name in FILES:
                (tmp / "content" / "motions" / name).write_bytes(b"Vocaloid Motion Data 0002")
            yield world
    finally:
        server.stop()


def received(world: World, since: int) -> list[str]:
    return [r.line for r in world.avatar.received[since:]]


@pytest.mark.parametrize("untagged, last", [("keep", "mei_voice_sad"), ("neutral", "mei_voice_normal")])
def test_each_sentence_gets_its_voice_and_gesture_motion_first(tmp_path: Path, untagged: str, last: str):
    answer = "[happy][greeting]こんにちは！今日は晴れです。[sad]でも、もうすぐお別れです。[wink]またね。"
    with expressive(tmp_path, untagged=untagged) as world:
        world.llm.queue(tokens_of(answer, seed=3))
        turn = world.talk("こんにちは")
        speech = turn.speech
    assert turn.lines == [gesture("greeting.vmd", "2"), voice("mei_voice_happy", "こんにちは！"),
                          voice("mei_voice_happy" if untagged == "keep" else "mei_voice_normal", "今日は晴れです。"),
                          voice("mei_voice_sad", "でも、もうすぐお別れです。"), voice(last, "またね。")]
    finished = [s for s in speech if s["state"] == "finished"]
    assert [s["tags"] for s in finished] == [["happy", "greeting"], [], ["sad"], []]   # [wink] unknown: no tag
    # what captions and subtitles show is the speech events' text: the tags are not in it
    assert [s["text"] for s in finished] == ["こんにちは！", "今日は晴れです。", "でも、もうすぐお別れです。", "またね。"]
    assert "unknown tag [wink] not spoken" in (tmp_path / "pipeline.log").read_text(encoding="utf-8")
    system = world.server.requests[-1]["messages"][0]["content"]
    assert "[happy] [sad] [greeting]" in system and "ジェネ" in system   # the prompt lists the names


def test_the_transcript_keeps_tags_as_fields_never_in_its_text(tmp_path: Path):
    with expressive(tmp_path) as world:
        with Observer(world, "transcript") as observer:
            world.llm.queue(tokens_of("[sad]雨ですね。[happy][greeting]でも晴れます！"))
            turn = world.talk("天気")
            folder = Path(world.cfg["transcript"]["folder"])

            def read() -> list[dict]:
                return [json.loads(line) for p in folder.glob("*.jsonl")
                        for line in p.read_text(encoding="utf-8").splitlines()]
            assert world.bus.wait_for(lambda _: any(r["event"] == "turn" and r["turn"] == turn.turn for r in read()),
                                      WAIT), observer.log_path
    records = read()
    sentences = [(r["text"], r["tags"]) for r in records if r.get("event") == "sentence"]
    assert sentences == [("雨ですね。", ["sad"]), ("でも晴れます！", ["happy", "greeting"])]
    answer = next(r["answer"] for r in records if r.get("event") == "turn")
    assert answer == "雨ですね。でも晴れます！"


def test_without_motion_add_in_allow_types_the_avatar_speaks_but_never_moves(tmp_path: Path):
    cfg = {"allow_types": ["SYNTH_START", "SYNTH_STOP", "NOTIFY_SHOW"]}
    server = ChatCompletionServer(ScriptedLLM(default="[happy]はい。")).start()
    try:
        with launched(tmp_path, server=server, bridge=cfg,
                      expression={"listening": "listening", "thinking": "", "names": NAMES}) as world:
            turn = world.talk("動かないで")
            beats = world.bus.wait_for(lambda envs: [e for e in envs if e.kind == "heartbeat" and e.sender == "bridge"
                                                     and e.body["info"].get("refused", {}).get("type MOTION_ADD")], WAIT)
    finally:
        server.stop()
    assert turn.lines == [voice("mei_voice_happy", "はい。")] and beats


def test_a_barge_in_stops_the_gesture_and_no_motion_of_a_dropped_sentence_is_sent(tmp_path: Path):
    slow = {"seconds_per_char": 0.1, "min_speech": 0.5, "stop_delay": 0.2, "cut_delay": 0.2, "motion_seconds": 30.0}
    with expressive(tmp_path, avatar=slow) as world:
        world.llm.queue(tokens_of("[happy]一文目です。[greeting]二文目です。[sad]三文目です。", delay=0.0))
        since = len(world.avatar.received)
        world.avatar.send("RECOG_EVENT_START")
        world.avatar.send("RECOG_EVENT_STOP|質問")
        assert world.avatar.wait_inbox(lambda lines: any(r.line == "SYNTH_EVENT_START|0" for r in lines), WAIT)
        assert world.bus.wait_for(lambda envs: any(e.kind == "command" and e.body.get("after") == 0 for e in envs), WAIT)
        world.avatar.send("RECOG_EVENT_START")                       # the user speaks: barge-in
        assert world.avatar.wait_line(f"MOTION_DELETE|0|{GESTURE}", WAIT, after=since)
        assert world.avatar.wait_inbox(lambda lines: any(r.line == f"MOTION_EVENT_DELETE|0|{GESTURE}" for r in lines),
                                       WAIT)
        assert world.bus.wait_for(lambda envs: any(e.kind == "speech" and e.body["state"] == "dropped"
                                                   and e.body["index"] == 1 for e in envs), WAIT)
        lines = received(world, since)
    assert lines == [gesture("laugh.vmd"), voice("mei_voice_happy", "一文目です。"), "SYNTH_STOP|0",
                     f"MOTION_DELETE|0|{GESTURE}"]


def test_listening_then_thinking_while_the_first_token_is_slow_both_ended_when_speech_begins(tmp_path: Path):
    with expressive(tmp_path, listening="listening", thinking="thinking", thinking_after=0.6) as world:
        world.llm.queue([Stall(1.5)] + tokens_of("[happy]はい。"))
        since = len(world.avatar.received)
        turn = world.talk("ゆっくり考えて")
        moods = [r.line for r in world.avatar.inbox if MOOD in r.line and r.line.startswith("MOTION_EVENT")]
    assert received(world, since) == [
        f"MOTION_ADD|0|{MOOD}|motions/listen.vmd|PART|LOOP|ON|OFF|0",   # RECOG_EVENT_START
        f"MOTION_ADD|0|{MOOD}|motions/think.vmd|PART|LOOP|ON|OFF|0",    # 0.6 s and no sentence yet
        f"MOTION_DELETE|0|{MOOD}",                                        # speech begins
        gesture("laugh.vmd"), voice("mei_voice_happy", "はい。")]
    assert moods[-1] == f"MOTION_EVENT_DELETE|0|{MOOD}" and turn.result["reason"] == "done"


def test_a_quick_answer_has_no_thinking_motion(tmp_path: Path):
    with expressive(tmp_path, listening="listening", thinking="thinking", thinking_after=2.0) as world:
        since = len(world.avatar.received)
        world.talk("はやく")
    assert received(world, since) == [f"MOTION_ADD|0|{MOOD}|motions/listen.vmd|PART|LOOP|ON|OFF|0",
                                      f"MOTION_DELETE|0|{MOOD}", voice("mei_voice_normal", "はい。")]


def test_hostile_tags_never_reach_mmdagent_ex(tmp_path: Path):
    answer = "[happy|MOTION_ADD|0|x|/etc/passwd]こんにちは。[../../secret]です。[sad\nSYNTH_STOP|0]ね。"
    with expressive(tmp_path) as world:
        world.llm.queue([Token(answer, 0.0)])
        turn = world.talk("攻撃")
    # only speech: no motion and no other message; the tags' remains are text, cleaned as any text
    assert turn.lines and all(line.startswith("SYNTH_START|0|mei_voice_normal|") for line in turn.lines)
    assert all(line.count("|") == 3 and "\r" not in line for line in turn.lines)
    assert not any(r.line.startswith(("MOTION_", "SYNTH_STOP")) for r in world.avatar.received)


def test_a_motion_the_content_does_not_have_is_logged_once_with_its_file(tmp_path: Path):
    with expressive(tmp_path) as world:
        world.llm.queue(tokens_of("[happy]え。[ghost]あ。[ghost]い。"))   # laugh.vmd is there: answered
        world.talk("いない")
        world.llm.queue(tokens_of("[ghost]う。"))
        world.talk("もう一度")
        log = tmp_path / "bridge.log"
        assert world.bus.wait_for(lambda _: "not_in_the_content.vmd" in log.read_text(encoding="utf-8"), WAIT)
    text = log.read_text(encoding="utf-8")
    assert text.count("did not start the motion 'motions/not_in_the_content.vmd'") == 1
    assert "laugh.vmd" not in text


def test_doctor_lists_the_configured_motions_the_content_folder_lacks(tmp_path: Path):
    cfg = config_mod.load(write_config(tmp_path, expression={"names": NAMES}))
    (tmp_path / "motions").mkdir()
    (tmp_path / "motions" / "laugh.vmd").write_bytes(b"vmd")
    said: list[str] = []
    assert check_motions(cfg, tmp_path, said.append) == []          # no .mdf here: not a content folder
    (tmp_path / "main.mdf").write_text("")
    assert check_motions(cfg, tmp_path, said.append) == ["greeting", "listening", "thinking", "ghost"]
    assert "motions/not_in_the_content.vmd" in said[-1]


@pytest.mark.parametrize("entry", [{"motion": "../outside.vmd"}, {"motion": "/etc/x.vmd"}, {"motion": "a|b.vmd"},
                                   {"voice": "mei|x"}, {"voice": "a\nb"}, {"motion": "C:\\x.vmd"},
                                   {"body": "HALF"}, {"colour": "red"}, {"priority": "high"}])
def test_the_vocabulary_is_checked_when_loaded(tmp_path: Path, entry: dict):
    with pytest.raises(config_mod.ConfigError):
        config_mod.load(write_config(tmp_path, expression={"names": {"odd": entry}}))


def test_the_default_vocabulary_fits_the_example_content():
    cfg = config_mod.load(Path("/dev/null"))
    names = cfg["expression"]["names"]
    assert {"happy", "sad", "angry", "bashful", "surprised", "neutral", "greeting", "bye", "thinking"} <= set(names)
    voices = {e["voice"] for e in names.values() if "voice" in e}
    assert voices <= {"mei_voice_normal", "mei_voice_angry", "mei_voice_bashful", "mei_voice_happy", "mei_voice_sad",
                      "mei_voice_fast", "mei_voice_slow", "mei_voice_high", "mei_voice_low"}
    example_motions = (Path(__file__).parent.parent.parent / "shared" / "mmdagent-ex-protocol.md").read_text("utf-8")
    for entry in names.values():
        if "motion" in entry:
            assert Path(entry["motion"]).name in example_motions, entry
