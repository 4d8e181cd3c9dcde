"""Tools in the streaming answer (stages.llm.tools, the llm stage's worker): unit tests of a call,
and end to end with the real openai client against the local streaming server, which streams
text, then a ``tool_calls`` delta split over several chunks, then answers the follow-up request."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from stages.llm import tools
from stages.llm.offline_responder import ChatCompletionServer, Stall, Status, Token, ToolCall
from tests.e2e import ScriptedLLM, World, launched, tokens_of, words

WAIT = 20.0


def test_a_call_gives_a_result_or_an_error_the_model_is_told():
    never = threading.Event()
    clock = tools.builtin(["current_time"], [])["current_time"]
    done = tools.call(clock, "current_time", "", 5, never)
    assert done.ok and done.result.startswith(time.strftime("%Y-%m-%d")) and "曜日" in done.result
    assert tools.call(None, "weather", "{}", 5, never).result == "error: there is no tool 'weather'"
    assert tools.call(clock, "current_time", "{not json", 5, never).result.startswith("error: bad arguments")
    assert tools.call(clock, "current_time", "[1]", 5, never).result.startswith("error: bad arguments")
    broken = tools.Tool("broken", "", {}, lambda args: 1 / 0)
    assert tools.call(broken, "broken", "{}", 5, never).result == "error: ZeroDivisionError: division by zero"
    hangs = tools.Tool("hangs", "", {}, lambda args: time.sleep(30) or "late")
    slow = tools.call(hangs, "hangs", "{}", 0.2, never)
    assert not slow.ok and slow.result == "error: no result within 0.2 s" and slow.seconds < 5
    cancelled = threading.Event()
    threading.Timer(0.1, cancelled.set).start()
    stopped = tools.call(hangs, "hangs", "{}", 30, cancelled)
    assert stopped.result == "error: cancelled" and stopped.seconds < 5  # a barge-in does not wait for it


def test_the_gesture_tool_knows_only_the_vocabulary():
    assert "gesture" not in tools.builtin(["current_time", "gesture"], [])  # no motions, no gesture tool
    gesture = tools.builtin(["gesture"], ["happy", "bye"])["gesture"]
    assert gesture.spec()["function"]["parameters"]["properties"]["name"]["enum"] == ["happy", "bye"]
    assert tools.call(gesture, "gesture", '{"name": "happy"}', 5, threading.Event()).result == "[happy]"
    assert not tools.call(gesture, "gesture", '{"name": "EXECUTE|x"}', 5, threading.Event()).ok


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    server = ChatCompletionServer(ScriptedLLM(default="はい。")).start()
    try:
        with launched(tmp_path_factory.mktemp("tools"), server=server) as w:
            yield w
    finally:
        server.stop()


def test_text_before_a_call_is_spoken_the_result_reaches_the_next_request_and_the_rest_is_spoken(world: World):
    start = len(world.server.requests)
    world.llm.queue([*tokens_of("ちょっと見ますね。"), ToolCall("current_time", "{}", call_id="call_t1", pieces=3)],
                    tokens_of("いまは午後です。"))
    turn = world.talk("いま何時？")
    assert turn.result["reason"] == "done" and turn.said == words(["ちょっと見ますね。", "いまは午後です。"])
    first, follow = world.server.requests[start:start + 2]
    assert [t["function"]["name"] for t in first["tools"]] == ["current_time", "gesture", "set_timer", "remember"]
    call, result = follow["messages"][-2:]
    assert call["role"] == "assistant" and call["content"] == "ちょっと見ますね。"
    assert call["tool_calls"][0]["function"] == {"name": "current_time", "arguments": "{}"}
    assert result["role"] == "tool" and result["tool_call_id"] == "call_t1"
    assert result["content"].startswith(time.strftime("%Y-")) and "曜日" in result["content"]
    [event] = world.bus.of("tool", turn.turn)
    assert event.body["name"] == "current_time" and event.body["ok"] is True
    history = world.server.requests[-1]["messages"]  # the answer is one exchange in history, text only
    world.talk("ありがとう")
    pairs = [(m["role"], m["content"]) for m in world.server.requests[-1]["messages"][1:]]
    assert ("assistant", "ちょっと見ますね。いまは午後です。") in pairs and len(history) > 0
    assert not [m for m in world.server.requests[-1]["messages"] if m["role"] == "tool"]


def test_the_gesture_tool_plays_with_the_next_sentence(world: World):
    world.llm.queue([ToolCall("gesture", json.dumps({"name": "happy"}), pieces=4)], tokens_of("やったね。"))
    turn = world.talk("合格したよ")
    assert turn.said == words(["やったね。"])
    motion = [line for line in turn.lines if line.startswith("MOTION_ADD|")]
    assert motion and "mei_laugh.vmd" in motion[0]
    assert turn.lines.index(motion[0]) < next(i for i, l in enumerate(turn.lines) if l.startswith("SYNTH_START|"))


def test_barge_in_while_the_follow_up_is_awaited_closes_it_and_says_no_more(world: World):
    asked = len(world.server.requests)
    # the stall stays under [llm] chunk_timeout (5 s in tests): a read timeout would be retried
    world.llm.queue([*tokens_of("調べます。"), ToolCall("current_time")], [Stall(2.5), *tokens_of("言わないこと。")])
    start = len(world.avatar.received)
    world.avatar.send("RECOG_EVENT_STOP|いま何時？")
    assert world.avatar.wait_line("SYNTH_START|0|mei_voice_normal|調べます。", WAIT, start)

    def follow_up(s: ChatCompletionServer) -> bool:  # known by its body (the tool's result), not by a count
        return any(m["role"] == "tool" for r in s.requests[asked:] for m in r["messages"])
    assert world.server.wait_for(follow_up, WAIT), "no follow-up request"
    [pending] = [r for r in world.server.connections if r.closed is None]  # the follow-up, in its stall
    world.avatar.send("RECOG_EVENT_START")
    assert world.server.wait_for(lambda s: pending.closed_by_client, WAIT), pending
    assert not world.llm.scripts  # both scripts were asked for: nothing is left for a later test
    world.avatar.send("RECOG_EVENT_STOP|やっぱりいい")
    assert world.avatar.wait_line("SYNTH_START|0|mei_voice_normal|はい。", WAIT, start)
    assert "言わないこと" not in " ".join(r.line for r in world.avatar.received[start:])


def test_a_server_that_refuses_tools_is_asked_again_without_them_once(tmp_path: Path):
    def reply(body: dict):
        if body.get("tools"):
            return [Status(400, {"error": {"message": "registry.ollama.ai/library/gemma: does not support tools",
                                           "type": "invalid_request_error", "param": None, "code": None}})]
        return tokens_of("はい、答えます。")
    server = ChatCompletionServer(reply).start()
    try:
        with launched(tmp_path, server=server) as world:
            assert world.talk("こんにちは").said == words(["はい、答えます。"])
            world.talk("もう一度")
            asked = [bool(r.get("tools")) for r in server.requests]
            assert asked == [True, False, False], asked  # refused once, then never offered again
    finally:
        server.stop()


def test_set_timer_checks_its_arguments():
    assert tools.timer_of({"seconds": 90, "text": " お茶 "}) == (90, "お茶")
    assert tools.timer_of({"seconds": 2.0, "text": "x"}) == (2, "x")
    for bad in ({"seconds": 0, "text": "x"}, {"seconds": 86_401, "text": "x"}, {"seconds": "5", "text": "x"},
                {"seconds": True, "text": "x"}, {"seconds": 5, "text": " "}, {"text": "x"}):
        with pytest.raises(ValueError):
            tools.timer_of(bad)
    timer = tools.builtin(["set_timer"], [])["set_timer"]
    assert tools.effect(timer, '{"seconds": 3, "text": "' + "あ" * 300 + '"}') == ("timer", {"seconds": 3,
                                                                                         "text": "あ" * 200})


def test_a_reminder_is_said_when_the_timer_ends_with_nobody_speaking(world: World):
    world.llm.queue([ToolCall("set_timer", json.dumps({"seconds": 1, "text": "お茶の時間です。"}), pieces=5)],
                    tokens_of("はい、一秒後にお知らせします。"))
    turn = world.talk("一秒後にお茶の時間だと教えて")
    assert turn.said == words(["はい、一秒後にお知らせします。"])
    asked = len(world.server.requests)
    start = [r.line for r in world.avatar.received].index(
        next(r.line for r in world.avatar.received if r.line.startswith("TIMER_START|")))
    timer = world.avatar.received[start].line
    assert timer.startswith("TIMER_START|mmdagent_llm_timer_") and timer.endswith("|1")  # no text goes out
    said = world.avatar.wait_line("SYNTH_START|0|mei_voice_normal|お茶の時間です。", WAIT, start)
    assert said is not None, "the reminder was not said"
    assert world.avatar.wait_inbox_line("TIMER_EVENT_STOP|", 1, 0) is not None
    assert len(world.server.requests) == asked  # said as written: no request for it
    [event] = [e for e in world.bus.envelopes if e.kind == "timer"]
    assert event.sender == "llm" and event.body == {"seconds": 1, "text": "お茶の時間です。"}


def test_mcp_servers_tools_are_used_and_a_crashing_or_hanging_one_is_reported_once(tmp_path: Path):
    import sys
    from tests.harness import BusWatcher, logs_text  # noqa: F401
    here = Path(__file__).parent / "mcp_servers"
    servers = {name: {"command": sys.executable, "args": [str(here / f"{name}.py")]} for name in ("weather", "crash",
                                                                                                 "hang")}
    llm = ScriptedLLM(default="はい。")
    server = ChatCompletionServer(llm).start()
    try:
        with launched(tmp_path, server=server, tools={"mcp": servers}) as world:
            beats = BusWatcher(world.cfg, b"heartbeat.llm")
            try:
                assert beats.wait_for(lambda envs: any("forecast" in e.body["info"]["tools"] for e in envs), 30), \
                    (tmp_path / "pipeline.log").read_text()[-2000:]
                llm.queue([ToolCall("forecast", json.dumps({"city": "東京"}))], tokens_of("明日の東京は晴れです。"))
                turn = world.talk("明日の東京の天気は？")
                assert turn.said == words(["明日の東京は晴れです。"])
                assert server.requests[-1]["messages"][-1]["content"] == "東京: 明日は晴れ"
                assert beats.wait_for(lambda envs: envs and all(
                    envs[-1].body["info"]["mcp"][name].startswith("failed") for name in ("crash", "hang")), 30)
                state = beats.envelopes[-1].body["info"]["mcp"]
            finally:
                beats.close()
            assert state["weather"] == "ok: 1 tool(s)" and "did not start within 10 s" in state["hang"], state
            world.talk("まだ大丈夫？")  # turns go on
            log = (tmp_path / "pipeline.log").read_text(encoding="utf-8")
            assert log.count("MCP server crash") == 1 and log.count("MCP server hang") == 1
            notices = [e.body["text"] for e in world.bus.envelopes if e.kind == "notice"]
            assert len([n for n in notices if "crash" in n]) <= 1 and len([n for n in notices if "hang" in n]) == 1
    finally:
        server.stop()
