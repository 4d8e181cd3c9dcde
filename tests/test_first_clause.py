"""The first clause at once, then the avatar kept one step ahead: end to end, real stage processes.

The timings compared here are orderings of events on one clock (the test process's monotonic
clock: when the fake LLM server sent a token, when the fake MMDAgent-EX received a line), never
wall-clock limits.
"""

from __future__ import annotations

from pathlib import Path

from stages.llm.offline_responder import ChatCompletionServer, Stall, Token
from tests.e2e import ScriptedLLM, launched, speech_pattern_ok, words


def _sent_at(server: ChatCompletionServer, text: str) -> float:
    """When the server wrote the token ``text`` (the last request that had it)."""
    for record in reversed(server.connections):
        for at, token in record.sent:
            if token == text:
                return at
    raise AssertionError(f"{text!r} was never sent")


def test_a_stall_mid_sentence_does_not_keep_a_complete_clause_from_the_avatar(tmp_path: Path):
    llm = ScriptedLLM()
    server = ChatCompletionServer(llm).start()
    llm.queue([Token("はい、"), Token("今日は晴れていて、"), Token("午後は"), Stall(4.0), Token("風が強いです。")])
    try:
        with launched(tmp_path, server=server, avatar_kwargs={"seconds_per_char": 0.1, "min_speech": 0.1}) as world:
            turn = world.talk("天気は？", timeout=30)
            received = {r.line.split("|", 3)[3]: r.t for r in world.avatar.received if r.line.startswith("SYNTH_START|")}
            assert speech_pattern_ok(world.avatar)
    finally:
        server.stop()
    assert turn.spoken[0] == "はい、"                                   # the first clause, alone
    assert turn.spoken[1] == "今日は晴れていて、"                       # said while the LLM stalled ...
    assert received["今日は晴れていて、"] < _sent_at(server, "風が強いです。")  # ... not after it
    assert turn.said == words(["はい、今日は晴れていて、午後は風が強いです。"])


def test_a_slow_llm_starts_at_its_first_clause(tmp_path: Path):
    llm = ScriptedLLM()
    server = ChatCompletionServer(llm).start()
    answer = "うーん、今日はとても良い天気なので散歩に行きたくなりますね。"
    llm.queue([Token(answer[i:i + 2], 0.1) for i in range(0, len(answer), 2)])  # ~10 tokens/s
    try:
        with launched(tmp_path, server=server, avatar_kwargs={"seconds_per_char": 0.05}) as world:
            turn = world.talk("散歩は？", timeout=30)
            first = next(r for r in world.avatar.received if r.line.startswith("SYNTH_START|"))
    finally:
        server.stop()
    assert turn.spoken[0] == "うーん、"
    assert first.t < _sent_at(server, "今日")  # before the next token was even sent
    assert turn.said == words([answer])


def test_a_burst_gives_the_first_clause_then_whole_sentences_and_the_rate_is_learned(tmp_path: Path):
    llm = ScriptedLLM()
    server = ChatCompletionServer(llm).start()
    answer = "はい、今日は晴れていて、午後は風が強いので、上着を持っていってね。夕方は寒いです。"
    llm.queue([Token(answer)], [Token(answer)])
    try:
        with launched(tmp_path, server=server, avatar_kwargs={"seconds_per_char": 0.3}) as world:
            turns = [world.talk("天気は？", timeout=60), world.talk("もう一度", timeout=60)]
            assert world.bus.wait_for(lambda envs: any(
                e.kind == "heartbeat" and e.body.get("stage") == "segmenter"
                and e.body["info"].get("seconds_per_char", {}).get("mei_voice_normal") for e in envs), 10)
            beat = [e for e in world.bus.of("heartbeat") if e.body.get("stage") == "segmenter"][-1]
    finally:
        server.stop()
    for turn in turns:
        assert turn.spoken == ["はい、", "今日は晴れていて、午後は風が強いので、上着を持っていってね。", "夕方は寒いです。"]
    learned = beat.body["info"]["seconds_per_char"]["mei_voice_normal"]
    assert 0.1 < learned <= 0.3  # moving from the 0.1 guess towards the avatar's 0.3 (three sentences a turn)
