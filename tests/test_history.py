"""History keeps the system prompt, whole pairs only, and both limits."""

import pytest

from stages.llm.history import FOLD_AT, History
from stages.llm.tokens import PER_MESSAGE, TokenCounter, encoding_of, estimate


def test_request_has_system_history_and_new_question():
    h = History("sys", max_turns=10, max_tokens=10_000)
    h.add("こんにちは", "やあ！")
    msgs = h.request("元気？")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"] == "sys" and msgs[-1]["content"] == "元気？"
    assert len(h.request("x")) == 4  # request() does not change the history


def test_trimmed_by_turn_pairs_oldest_first():
    h = History("sys", max_turns=2, max_tokens=10_000)
    for i in range(5):
        h.add(f"q{i}", f"a{i}")
    assert [p[0]["content"] for p in h.pairs] == ["q3", "q4"]


def test_trimmed_by_estimated_tokens_but_system_prompt_stays():
    h = History("sys", max_turns=100, max_tokens=200)
    for i in range(10):
        h.add("あ" * 40, "い" * 40)
    assert h.tokens() <= 200
    assert h.request("x")[0] == {"role": "system", "content": "sys"}
    assert 1 <= len(h.pairs) < 10


def test_the_servers_count_corrects_the_estimate():
    counter = TokenCounter("qwen2.5:7b")  # not an OpenAI model: estimated
    assert not counter.exact and counter.text("あ" * 100) == 100
    messages = [{"role": "user", "content": "あ" * 96}]
    counter.calibrate(200, messages)  # the server counted twice the estimate
    assert counter.text("あ" * 100) == 200
    counter.calibrate(100_000, messages)  # about something else: bounded
    assert counter.scale == 3.0
    h = History("sys", max_turns=100, max_tokens=1000, counter=counter)
    for _ in range(10):
        h.add("あ" * 40, "い" * 40)
    assert h.tokens() <= 1000 and len(h.pairs) <= 4  # 3 times the estimate: few pairs fit


def test_openai_models_are_counted_with_their_own_encoding():
    assert encoding_of("gpt-4o-mini") == encoding_of("gpt-4.1-nano") == encoding_of("gpt-5.1") == "o200k_base"
    assert encoding_of("o3-mini") == encoding_of("chatgpt-4o-latest") == encoding_of("ft:gpt-4o-mini:org") == "o200k_base"
    assert encoding_of("gpt-4-turbo") == encoding_of("gpt-3.5-turbo") == "cl100k_base"
    assert encoding_of("qwen2.5:7b") is encoding_of("llama3") is encoding_of("orca-mini") is None
    counter = TokenCounter("gpt-4o-mini")
    assert counter.wait_loaded(30)
    assert counter.text("hello world") == 2  # tiktoken's o200k_base: [24912, 2375]
    assert counter.text("こんにちは、今日はいい天気ですね。") != estimate("こんにちは、今日はいい天気ですね。")
    assert counter.message({"role": "user", "content": "hello world"}) == 2 + PER_MESSAGE
    counter.calibrate(10_000, [{"role": "user", "content": "x"}])  # exact: nothing to correct
    assert counter.text("hello world") == 2


def test_a_request_holds_the_newest_pairs_within_both_limits():
    h = History("sys", max_turns=3, max_tokens=300, summarize=True)
    for i in range(12):
        h.add(f"q{i} " + "あ" * 30, f"a{i} " + "い" * 30)
    assert len(h.pairs) == 12  # kept for the summarizer
    msgs = h.request("次")
    assert h.counter.messages(msgs) <= 300
    assert [m["content"][:3] for m in msgs[1:-1]] == ["q9 ", "a9 ", "q10", "a10", "q11", "a11"]
    small = History("sys", max_turns=10, max_tokens=149, summarize=True)
    for i in range(5):
        small.add(f"q{i} " + "あ" * 30, f"a{i} " + "い" * 30)
    msgs = small.request("次")
    assert small.counter.messages(msgs) <= 149 and len(msgs) == 4  # two pairs would be 150


def test_the_oldest_pairs_are_folded_into_the_summary():
    h = History("sys", max_turns=10, max_tokens=1000, summarize=True)
    for i in range(3):
        h.add(f"q{i}", f"a{i}")
    assert h.fold_due() == 0  # well within both limits
    for i in range(3, 11):
        h.add(f"q{i}", f"a{i}")
    n = h.fold_due()  # over max_turns: down to half of it, the newest kept
    assert n == 6 and len(h.pairs) - n == 5
    asked = h.pairs[:n]
    assert h.fold(asked, "ユーザーの名前はハナ。")
    assert len(h.pairs) == 5 and h.folded == 6 and h.fold_due() == 0
    head = h.request("x")[0]["content"]
    assert head.startswith("sys\n") and "ユーザーの名前はハナ。" in head and "6回" in head
    assert not h.fold(asked, "stale")  # those pairs are gone: nothing changes
    assert h.summary == "ユーザーの名前はハナ。"
    big = History("sys", max_turns=100, max_tokens=400, summarize=True)
    while big.tokens() <= 400 * FOLD_AT:
        big.add("あ" * 20, "い" * 20)
        assert big.fold_due() == 0 or big.tokens() > 400 * FOLD_AT
    n = big.fold_due()
    assert n and big.counter.messages([m for p in big.pairs[n:] for m in p]) <= 200
    assert big.fold(big.pairs[:n], "要約" * 500)  # too long: cut to its share
    assert big.counter.text(big.summary) <= big.summary_tokens


def test_a_failing_summarizer_loses_nothing_until_far_over_the_limits():
    h = History("sys", max_turns=4, max_tokens=10_000, summarize=True)
    for i in range(16):
        h.add(f"q{i}", f"a{i}")
    assert len(h.pairs) == 16 and h.fold_due() == 14  # nobody folded them: all still here
    h.add("q16", "a16")  # past four times the limits: down to twice them
    assert [p[0]["content"] for p in h.pairs] == [f"q{i}" for i in range(9, 17)]
    off = History("sys", max_turns=4, max_tokens=10_000)
    for i in range(6):
        off.add(f"q{i}", f"a{i}")
    assert len(off.pairs) == 4 and off.fold_due() == 0


def test_interrupted_answers_are_marked():
    h = History("sys", 10, 1000)
    h.add("q", "途中まで", interrupted=True)
    assert h.pairs[0][1]["content"].endswith("[interrupted]")


def test_estimate_counts_cjk_per_character():
    assert estimate("あ" * 100) == 100 and estimate("a" * 100) == 25


def test_revise_last_keeps_only_what_was_spoken():
    h = History("sys", 10, 10_000)
    h.add("質問", "一文目。二文目。三文目。")
    assert h.revise_last("質問", "一文目。")
    assert h.request("次")[-2] == {"role": "assistant", "content": "一文目。 [interrupted]"}
    assert h.revise_last("質問", "") and h.request("次")[-2]["content"] == "[interrupted]"
    assert not h.revise_last("別の質問", "x")


def test_spoken_segments_join_without_spaces_in_japanese_only():
    from stages.llm.llm import join_segments
    assert join_segments(["こんにちは！", "Let's go.", "Yes!", "円周率。"]) == "こんにちは！Let's go. Yes!円周率。"
