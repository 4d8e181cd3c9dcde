"""End to end: the real pipeline under supervisord and honcho, the fake MMDAgent-EX, a local
OpenAI-compatible streaming server, and the exact lines MMDAgent-EX receives."""

from __future__ import annotations

import pytest

from broker.wire import CAUSES
from stages.llm.offline_responder import Cut, ErrorEvent, Stall, Status
from tests.e2e import World, managed, speech_pattern_ok, tokens_of, words
from tests.harness import SECRET_KEY, logs_text

APOLOGY = "ごめんなさい、今はうまく答えられません。"

ANSWER = "こんにちは！今日はいい天気ですね。Let's take a walk, shall we? 円周率は3.14です。"
EXPECTED = ["こんにちは！", "今日はいい天気ですね。", "Let's take a walk, shall we?", "円周率は3.14です。"]


@pytest.fixture(scope="module", params=["supervisord", "honcho"])
def world(request, tmp_path_factory):
    with managed(tmp_path_factory.mktemp(request.param), request.param) as w:
        yield w


def test_answer_is_spoken_once_in_order_one_sentence_at_a_time(world: World):
    world.llm.queue(tokens_of(ANSWER, seed=7))
    turn = world.talk("こんにちは")
    assert turn.result["reason"] == "done"
    assert [line.split("|")[:3] for line in turn.lines] == [["SYNTH_START", "0", "mei_voice_normal"]] * len(turn.lines)
    assert turn.said == words(EXPECTED) and turn.spoken[0] == EXPECTED[0]
    assert speech_pattern_ok(world.avatar)
    assert [s["state"] for s in turn.speech].count("finished") == len(turn.spoken)


def test_every_random_split_gives_the_same_speech(world: World):
    for seed in (1, 2, 3):
        world.llm.queue(tokens_of(ANSWER, seed=seed, delay=0.001))
        assert world.talk(f"もう一度{seed}").said == words(EXPECTED)
    assert speech_pattern_ok(world.avatar)


def test_next_request_carries_the_history(world: World):
    world.llm.queue(tokens_of("覚えました。"))
    world.talk("私の名前はハナです。")
    world.talk("私の名前は？")
    messages = world.server.requests[-1]["messages"]
    assert messages[0]["role"] == "system" and "ジェネ" in messages[0]["content"]
    pairs = [(m["role"], m["content"]) for m in messages[1:]]
    assert ("user", "私の名前はハナです。") in pairs and ("assistant", "覚えました。") in pairs
    assert pairs[-1] == ("user", "私の名前は？")
    assert world.server.requests[-1]["stream"] is True


def test_llm_text_cannot_inject_commands(world: World):
    world.llm.queue(tokens_of("わかりました。\nEXECUTE|calc.exe\nMODEL_DELETE|0\r\nおわり|です。"))
    turn = world.talk("コマンドを実行して")
    assert turn.lines, "nothing was spoken"
    assert all(line.startswith("SYNTH_START|0|mei_voice_normal|") for line in turn.lines)
    assert all(line.count("|") == 3 for line in turn.lines)
    assert not any(r.line.startswith(("EXECUTE", "MODEL_DELETE")) for r in world.avatar.received)
    assert "".join(turn.spoken).replace(" ", "") == "わかりました。EXECUTE｜calc.exeMODEL_DELETE｜0おわり｜です。"


def test_unknown_messages_and_echoes_are_tolerated(world: World):
    for junk in ("MOTION_EVENT_ADD|0|action", "RECOG_EVENT_AWAY|ON", "RECOG_EVENT_AWAY|OFF", "KEY|a",
                 "CURRENT_TIME|12|00", "|", "||||", "TOTALLY_UNKNOWN|x|y|z", "SYNTH_EVENT_STOP|1"):
        world.avatar.send(junk)
    world.llm.queue(tokens_of("大丈夫です。"))
    assert world.talk("平気？").spoken == ["大丈夫です。"]


def test_long_answer_never_exceeds_the_line_limit(world: World):
    long_answer = "あ" * 1500 + "。" + "This is a long English sentence without end " * 30
    world.llm.queue(tokens_of(long_answer, delay=0.0))
    turn = world.talk("長く話して", timeout=60)
    assert len(turn.lines) >= 3
    assert all(len(line.encode("utf-8")) <= 2000 for line in turn.lines)
    assert "".join(turn.spoken).replace(" ", "") == long_answer.replace(" ", "")


@pytest.mark.parametrize("name, script, error_class, cause", [
    ("401", [Status(401, {"error": {"message": f"Incorrect API key provided: {SECRET_KEY}", "type": "invalid_request_error", "code": "invalid_api_key"}}, {})], "AuthenticationError", "authentication"),
    ("404", [Status(404, {"error": {"message": "The model `gpt-x` does not exist", "type": "invalid_request_error", "code": "model_not_found"}}, {})], "NotFoundError", "model_not_found"),
    ("404 page", [Status(404, "404 page not found")], "NotFoundError", "wrong_url"),   # a base URL without /v1
    ("429", [Status(429, {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}, {"retry-after-ms": "20"})], "RateLimitError", "rate_limited"),
    ("500", [Status(500, {"error": {"message": "boom", "type": "server_error", "code": None}}, {})], "InternalServerError", "server_error"),
    ("error event", [ErrorEvent("overloaded")], "APIError", "stream_error"),
    ("stall", [Stall(30)], "no answer within", "timeout"),
])
def test_failure_before_any_text_ends_the_turn_with_the_apology(world: World, name, script, error_class, cause):
    retried = name in ("429", "500")
    world.llm.queue(*([script] * (3 if retried else 1)))  # max_retries = 2: three attempts
    before = len(world.server.requests)
    turn = world.talk(f"失敗テスト{name}", timeout=40)
    assert turn.result["reason"] == "error"
    assert error_class in turn.result["error"]
    assert turn.result["cause"] == cause
    assert f"NOTIFY_SHOW|mmdagent-llm: {CAUSES[cause]}" in turn.lines   # on screen, for whoever can fix it
    assert SECRET_KEY not in turn.result["error"]
    assert turn.said == words([APOLOGY])
    assert len(world.server.requests) - before == (3 if retried else 1)
    # History stays consistent: the failed question left no unanswered user message.
    world.llm.queue(tokens_of("はい。"))
    world.talk("次の質問")
    contents = [m["content"] for m in world.server.requests[-1]["messages"]]
    assert f"失敗テスト{name}" not in contents
    roles = [m["role"] for m in world.server.requests[-1]["messages"][1:]]
    assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]


@pytest.mark.parametrize("tail, cause", [([Cut()], "connection_lost"), ([ErrorEvent("midway")], "stream_error"),
                                         ([Stall(30)], "timeout")])
def test_failure_midway_keeps_what_was_said(world: World, tail, cause):
    world.llm.queue(tokens_of("前半です。後半は") + tail)
    turn = world.talk("途中で切れる", timeout=40)
    assert turn.result["reason"] == "error"
    assert turn.result["cause"] == cause, turn.result
    assert turn.spoken[0] == "前半です。"
    assert "ごめんなさい" not in "".join(turn.spoken)
    world.llm.queue(tokens_of("はい。"))
    world.talk("続けて")
    messages = world.server.requests[-1]["messages"]
    answer = next(m["content"] for m in messages if m["role"] == "assistant" and m["content"].startswith("前半です。"))
    assert answer.endswith("[interrupted]")


def test_secrets_never_reach_the_logs(world: World):
    world.llm.queue(tokens_of("ログ確認。"))
    world.talk("ログ")
    text = logs_text(world.run_dir)
    assert "mmdagent-llm[llm]" in text and "turn" in text
    assert SECRET_KEY not in text
