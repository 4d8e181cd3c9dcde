"""The history's oldest exchanges folded into a summary by the LLM (stages.llm.summary), end to end:
200 turns against a small budget, and the llm stage killed in the middle of a summary."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from stages.llm import summary
from stages.llm.history import History
from stages.llm.history_store import read
from stages.llm.offline_responder import ChatCompletionServer
from stages.llm.tokens import TokenCounter
from tests.e2e import Summarizing, is_summary, launched, managed
from tests.test_restart import pid_of, restarted

BUDGET = 400
MODEL = "gpt-4o-mini"
FACT = "私の名前はハナです。"


def test_the_summarizer_is_asked_with_what_was_heard_and_paused_after_failures():
    h = History("sys", max_turns=2, max_tokens=10_000, summarize=True)
    h.add("私の名前はハナです。", "よろしくね、ハナさん。今日は何を")
    h.revise_last("私の名前はハナです。", "よろしくね、ハナさん。")  # the user cut it off there
    h.add("q2", "a2")
    h.add("q3", "a3")
    n = h.fold_due()
    asked = summary.messages("", h.pairs[:n], h.summary_tokens)
    assert "[interrupted]" in asked[0]["content"] and str(h.summary_tokens) in asked[0]["content"]
    assert "User: 私の名前はハナです。\nAvatar: よろしくね、ハナさん。 [interrupted]" in asked[1]["content"]
    assert "今日は何を" not in asked[1]["content"] and "Summary so far:\n(none)" in asked[1]["content"]
    folding = summary.Folding()
    assert folding.may_start(0.0)
    folding.started()
    assert not folding.may_start(1000.0)  # one at a time
    folding.ended(10.0, ok=False)
    assert not folding.may_start(10.0 + summary.RETRY - 0.1) and folding.may_start(10.0 + summary.RETRY)
    folding.started()
    folding.ended(20.0, ok=False)
    assert not folding.may_start(20.0 + 2 * summary.RETRY - 0.1)  # doubling
    for _ in range(20):
        folding.started()
        folding.ended(30.0, ok=False)
    assert folding.may_start(30.0 + summary.RETRY_MAX)
    assert folding.retry_at() == 30.0 + summary.RETRY_MAX
    folding.started()
    assert folding.retry_at() is None  # running: nothing to retry yet
    folding.ended(40.0, ok=True)
    assert folding.may_start(40.0) and folding.failures == 0 and folding.retry_at() is None
    folding.ended(50.0, ok=False)
    folding.settled()  # nothing left to fold (the history was cleared): no retry owed
    assert folding.retry_at() is None and folding.may_start(50.0)


def settings(tmp: Path) -> dict:
    return {"model": MODEL, "history_tokens": BUDGET, "history_turns": 8, "summarize": True,
            "system_prompt": "あなたは明るいアバターです。", "history_file": str(tmp / "history-s.json")}


def test_two_hundred_turns_stay_within_the_budget_and_keep_a_fact_from_the_first(tmp_path: Path):
    reply = Summarizing()
    server = ChatCompletionServer(reply).start()
    try:
        with launched(tmp_path, server=server, llm=settings(tmp_path), tools={"builtin": []},
                      avatar_kwargs={"seconds_per_char": 0.001, "min_speech": 0.02}) as world:
            world.talk(FACT)
            for i in range(2, 201):
                world.talk(f"{i}番目の話題です。今日の天気と好きな食べ物について少し話しましょう。")
            asked = [r for r in server.requests if not is_summary(r)]
            folds = [r for r in server.requests if is_summary(r)]
            assert len(asked) == 200 and len(folds) >= 20
            counter = TokenCounter(MODEL)
            assert counter.wait_loaded(30)
            sizes = [counter.messages(r["messages"]) for r in asked]
            assert max(sizes) <= BUDGET, sizes
            assert "ハナ" in asked[-1]["messages"][0]["content"]  # the summary, 199 turns later
            assert all(r["messages"][-1]["content"].startswith("200番目") for r in asked[-1:])
            conversation = read(Path(world.cfg["llm"]["history_file"]).read_bytes())
            assert conversation.folded + len(conversation.pairs) == 200  # every turn: folded or still there
            assert conversation.pairs[-1][0]["content"].startswith("200番目") and "ハナ" in conversation.summary
            events = world.bus.of("summary")
            assert events and all(e.body["ok"] for e in events) and "ハナ" in events[-1].body["text"]
    finally:
        server.stop()


def test_killing_the_llm_during_a_summary_loses_no_turn(tmp_path: Path):
    reply = Summarizing()
    reply.stall_summaries = 1
    history = tmp_path / "history-s.json"
    with managed(tmp_path, reply=reply, llm={**settings(tmp_path), "history_turns": 4},
                 tools={"builtin": []}) as world:
        world.talk(FACT)
        for i in range(2, 6):  # the fifth turn passes history_turns: a summary is asked for, and hangs
            world.talk(f"{i}番目の話題です。")
        server = world.server
        assert server.wait_for(lambda s: any(is_summary(r) for r in s.requests), 20)
        before = read(history.read_bytes())
        assert before.folded == 0 and len(before.pairs) == 5
        old = pid_of(world, "llm")
        os.kill(old, signal.SIGKILL)
        assert restarted(world, "llm", old)
        # the new process folds what the old one could not, at its start
        assert world.bus.wait_for(lambda envs: any(e.kind == "summary" and e.body["ok"] for e in envs), 30)
        world.talk("6番目の話題です。")
        after = read(history.read_bytes())
        assert after.folded + len(after.pairs) == 6 and after.folded >= 3 and FACT in after.summary
        assert [p[0]["content"] for p in after.pairs][-1] == "6番目の話題です。"
        assert FACT in [r for r in server.requests if not is_summary(r)][-1]["messages"][0]["content"]
        # the killed process's request ended with it (the server saw it go)
        assert server.wait_for(lambda s: any(c.closed_by_client for c in s.connections), 10)
        assert json.loads(history.read_text(encoding="utf-8"))["version"] == 2


def test_a_failed_summary_leaves_the_history_as_it_was_and_is_asked_again_later(tmp_path: Path):
    reply = Summarizing()
    reply.fail_summaries = 1
    server = ChatCompletionServer(reply).start()
    history = tmp_path / "history-s.json"
    try:
        with launched(tmp_path, server=server, llm={**settings(tmp_path), "history_turns": 2},
                      tools={"builtin": []}) as world:
            for i in range(1, 4):  # the third passes history_turns
                world.talk(FACT if i == 1 else f"{i}番目の話題です。")
            assert world.bus.wait_for(lambda envs: any(e.kind == "summary" for e in envs), 20)
            [failed] = world.bus.of("summary")
            assert not failed.body["ok"] and "context too long" in failed.body["error"] and failed.body["text"] == ""
            kept = read(history.read_bytes())
            assert kept.folded == 0 and len(kept.pairs) == 3 and kept.pairs[0][0]["content"] == FACT
            assert "summarizing 2 exchanges failed" in (tmp_path / "pipeline.log").read_text()
            # asked again summary.RETRY seconds later, with nobody speaking
            assert world.bus.wait_for(lambda envs: any(e.kind == "summary" and e.body["ok"] for e in envs),
                                      summary.RETRY + 20)
            after = read(history.read_bytes())
            assert after.folded == 2 and len(after.pairs) == 1 and FACT in after.summary
    finally:
        server.stop()
