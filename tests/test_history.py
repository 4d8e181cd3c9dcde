"""History keeps the system prompt, whole pairs only, and both limits."""

from stages.llm.history import History, estimate_tokens


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


def test_server_usage_overrides_the_estimate():
    h = History("sys", max_turns=100, max_tokens=1000)
    h.add("a", "b")
    h.add("c", "d", used_tokens=5000)  # the server says we are far over: trim
    assert len(h.pairs) == 0 or h.pairs[-1][0]["content"] == "c"
    assert len(h.pairs) < 2


def test_interrupted_answers_are_marked():
    h = History("sys", 10, 1000)
    h.add("q", "途中まで", interrupted=True)
    assert h.pairs[0][1]["content"].endswith("[interrupted]")


def test_estimate_counts_cjk_per_character():
    assert estimate_tokens("あ" * 100) > estimate_tokens("a" * 100)


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
