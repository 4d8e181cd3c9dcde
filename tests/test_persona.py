"""The avatar's character (stages.persona): the file a person writes, the prompt, the greeting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker import config
from stages import persona
from stages.bridge.turns import TurnController
from stages.states import ConversationState as C
from tests.e2e import tokens_of
from tests.harness import logs_text

GOOD = """# character.txt
name: メイ
style： 明るく丁寧に、短く話す。
greeting: こんにちは、メイです。
about:
  駅前の案内係。
  地元の食べ物に詳しい。
never: 値段を約束すること
never:
  ほかのお客さんの
  話
"""


def test_a_file_a_person_writes():
    p = persona.parse(GOOD)
    assert (p.name, p.style, p.greeting) == ("メイ", "明るく丁寧に、短く話す。", "こんにちは、メイです。")
    assert p.about == "駅前の案内係。\n地元の食べ物に詳しい。"
    assert p.never == ["値段を約束すること", "ほかのお客さんの 話"]
    text = persona.prompt(p)
    for part in ("あなたの名前はメイです。", "話し方: 明るく丁寧に", "「こんにちは、メイです。」と挨拶しました",
                 "値段を約束すること、ほかのお客さんの 話", persona.SPEECH_RULE):
        assert part in text
    assert persona.prompt(persona.Persona()) == persona.SPEECH_RULE  # an empty file: only the rule


def test_a_line_that_is_no_key_is_an_error_naming_the_line(tmp_path: Path):
    with pytest.raises(persona.PersonaError, match=r"line 3: expected one of name, style"):
        persona.parse("name: A\n\nnmae: B\n")
    big = tmp_path / "big.txt"
    big.write_text("about: " + "あ" * persona.MAX_BYTES, encoding="utf-8")
    with pytest.raises(persona.PersonaError, match="at most"):
        persona.load(big)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("name: Jos\xe9".encode("latin-1"))
    with pytest.raises(persona.PersonaError, match="not UTF-8"):
        persona.load(latin)
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffname: メイ\n".encode("utf-8"))
    assert persona.load(bom).name == "メイ" and persona.load(bom).path == bom


def test_found_beside_the_mdf_or_not_at_all(tmp_path: Path, monkeypatch):
    (tmp_path / "character.txt").write_text("name: メイ\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert persona.find("character.txt") == tmp_path.resolve() / "character.txt"
    assert persona.find("") is None and persona.find("missing.txt") is None
    assert persona.find(str(tmp_path / "character.txt"), Path("/")) == tmp_path.resolve() / "character.txt"


def controller(up: bool) -> TurnController:
    cfg = dict(config.load(Path(os.devnull))["turn"])
    tc = TurnController(cfg, model="0", voice="mei_voice_normal")
    tc.on_pipeline(up)
    return tc


def test_the_greeting_is_a_turn_of_its_own_once_the_pipeline_is_up():
    tc = controller(up=True)
    [start] = tc.say_own("こんにちは", 0.0)
    assert start.kind == "turn_start" and start.body == {"text": "", "say": "こんにちは"}
    assert tc.machine == C.ANSWERING
    assert tc.say_own("また", 0.0) == []  # never over a turn in progress
    tc = controller(up=False)
    assert tc.say_own("こんにちは", 0.0) == [] and tc.machine == C.HOLDING
    [start] = tc.on_pipeline(True)
    assert start.body["say"] == "こんにちは"
    tc.on_spoken(tc.turn)
    [utterance] = [a for a in tc.on_line("RECOG_EVENT_STOP", ["質問"], 0.0) if a.kind == "turn_start"]
    assert utterance.body == {"text": "質問"}  # the next turn is an ordinary one


def test_a_greeting_that_never_gets_out_says_no_failure_notice():
    tc = controller(up=False)
    tc.say_own("こんにちは", 0.0, now=0.0)
    actions = tc.on_tick(tc.cfg["max_age"] + 1.0)
    assert not [a for a in actions if getattr(a, "type", "") == "SYNTH_START"] and tc.machine == C.IDLE


def test_the_greeting_is_spoken_at_start_and_a_character_file_cannot_inject_commands(tmp_path: Path):
    from tests.e2e import managed
    character = tmp_path / "character.txt"
    character.write_text("name: メイ|EXECUTE|calc.exe\nstyle: 短く話す。\n"
                         "greeting: こんにちは|EXECUTE|calc.exe\x07、メイです。\n", encoding="utf-8")
    (tmp_path / "run").mkdir()
    with managed(tmp_path / "run", "honcho", persona={"file": str(character)}) as world:
        greeting = world.avatar.wait_line("SYNTH_START|0|mei_voice_normal|", 20)
        assert greeting is not None, "no greeting at start"
        assert world.avatar.wait_for(lambda got: "メイです。" in "".join(r.line for r in got), 20)
        said = [r.line for r in world.avatar.received]
        assert not [line for line in said if line.startswith("EXECUTE")], said
        assert "".join(line.split("|", 3)[3] for line in said if line.startswith("SYNTH_START|")) \
            .startswith("こんにちは")  # the | became harmless, inside one line
        world.llm.queue(tokens_of("はい。"))
        world.talk("あなたは誰？")
        messages = world.server.requests[-1]["messages"]
        assert "あなたの名前はメイ" in messages[0]["content"] and "ジェネ" not in messages[0]["content"]
        assert [m["role"] for m in messages[1:]] == ["user"]  # the greeting is not an exchange


def test_a_newline_in_a_name_makes_the_file_refused_not_a_command(tmp_path: Path):
    from tests.e2e import managed
    character = tmp_path / "character.txt"
    character.write_text("name: メイ\nEXECUTE|calc.exe\ngreeting: こんにちは\n", encoding="utf-8")
    (tmp_path / "run").mkdir()
    with managed(tmp_path / "run", "honcho", persona={"file": str(character)}) as world:
        world.llm.queue(tokens_of("はい。"))
        world.talk("だれ？")
        assert "ジェネ" in world.server.requests[-1]["messages"][0]["content"]  # [llm] system_prompt stands
        said = [r.line for r in world.avatar.received]
        assert not [line for line in said if "EXECUTE" in line or "こんにちは" in line], said
        assert "line 2: expected one of name" in logs_text(world.run_dir)
