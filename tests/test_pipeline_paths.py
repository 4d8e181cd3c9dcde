"""End to end, the other ways the pipeline runs: the offline default, non-streaming mode, ipc,
a wrong voice alias, an LLM server that refuses connections. Real stage processes (started by
the launcher), the real openai client, the fake MMDAgent-EX."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from stages.llm.offline_responder import OFFLINE_NOTICE, ChatCompletionServer, offline_text
from stages.segmenter.sentences import SentenceCutter
from tests.e2e import ScriptedLLM, launched, speech_pattern_ok, words

ANSWER = "こんにちは！今日はいい天気ですね。Let's take a walk, shall we? 円周率は3.14です。"
EXPECTED = ["こんにちは！", "今日はいい天気ですね。", "Let's take a walk, shall we?", "円周率は3.14です。"]
APOLOGY = "ごめんなさい、今はうまく答えられません。"


def segments_of(text: str) -> list[str]:
    cutter = SentenceCutter()
    return [p.text for p in cutter.feed(text) + cutter.flush()]


def test_offline_default_answers_in_the_users_language_and_says_so_once(tmp_path: Path):
    with launched(tmp_path) as world:
        ja = world.talk("こんにちは、元気ですか？")
        en = world.talk("Hello there, how are you today?")
        beats = world.bus.of("heartbeat")
    assert ja.result["reason"] == "done" and en.result["reason"] == "done"
    assert ja.said == words(segments_of(offline_text("こんにちは、元気ですか？")))
    assert en.said == words(segments_of(offline_text("Hello there, how are you today?")))
    assert len(ja.spoken) >= 2 and len(en.spoken) >= 2
    assert any(b.body.get("stage") == "llm" and b.body["info"]["offline"] for b in beats)
    log = (tmp_path / "pipeline.log").read_text(encoding="utf-8")
    assert log.count(OFFLINE_NOTICE.splitlines()[0]) == 1


def test_non_streaming_mode_speaks_the_same_sentences(tmp_path: Path):
    server = ChatCompletionServer(ScriptedLLM(default=ANSWER)).start()
    try:
        with launched(tmp_path, server=server, llm={"stream": False}) as world:
            turn = world.talk("こんにちは")
            assert speech_pattern_ok(world.avatar)
        assert turn.said == words(EXPECTED)
        assert not server.requests[-1].get("stream")
    finally:
        server.stop()


def test_ipc_transport(tmp_path: Path):
    server = ChatCompletionServer(ScriptedLLM(default=ANSWER)).start()
    try:
        with launched(tmp_path, server=server, transport="ipc") as world:
            assert world.cfg["bus"]["transport"] == "ipc"
            assert world.talk("こんにちは").said == words(EXPECTED)
    finally:
        server.stop()


def test_unknown_voice_alias_cannot_wedge_the_conversation(tmp_path: Path):
    server = ChatCompletionServer(ScriptedLLM(default="はい。そうです。")).start()
    try:
        with launched(tmp_path, server=server, speech={"voice": "no_such_voice", "start_timeout": 0.5}) as world:
            first = world.talk("一回目")
            second = world.talk("二回目")
            inbox = [r.line for r in world.avatar.inbox]
    finally:
        server.stop()
    for turn in (first, second):
        # The second utterance may reach the bridge (stdin) before the sequencer's "spoken" of the
        # first (the bus): its own 0.5 s bound on the unanswered SYNTH_START has not passed then, so
        # it stops the voice it cannot know is silent. A SYNTH_STOP, harmless; nothing else.
        lines = turn.lines[1:] if turn is second and turn.lines[:1] == ["SYNTH_STOP|0"] else turn.lines
        assert lines == ["SYNTH_START|0|no_such_voice|はい。", "SYNTH_START|0|no_such_voice|そうです。"]
        assert [s["state"] for s in turn.speech if s["state"] != "sent"] == ["timeout", "timeout"]
    assert not any(line.startswith("SYNTH_EVENT_") for line in inbox)


@pytest.mark.parametrize("apology", [APOLOGY, ""])
def test_refused_connection_ends_the_turn_with_the_configured_apology(tmp_path: Path, apology: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    with launched(tmp_path, base_url=f"http://127.0.0.1:{port}/v1", llm={"max_retries": 1, "apology": apology}) as world:
        turn = world.talk("聞こえますか", timeout=30)
    assert turn.result["reason"] == "error"
    assert "APIConnectionError" in turn.result["error"] and turn.result["cause"] == "unreachable"
    assert turn.said == words([apology]) and bool(turn.spoken) == bool(apology)
    assert "APIConnectionError" in (tmp_path / "pipeline.log").read_text(encoding="utf-8")


def test_long_answers_respect_the_configured_byte_cap(tmp_path: Path):
    server = ChatCompletionServer(ScriptedLLM(default="長い" * 400 + "。")).start()
    try:
        with launched(tmp_path, server=server, segmenter={"max_bytes": 120}) as world:
            turn = world.talk("長く")
    finally:
        server.stop()
    assert all(len(s.encode()) <= 120 for s in turn.spoken)
    assert "".join(turn.spoken).rstrip("。") == "長い" * 400  # a lone "。" after a cut is not spoken
