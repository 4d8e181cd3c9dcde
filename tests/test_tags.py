"""Expression tags in the token stream: taken out wherever token boundaries fall, attached to
their sentence; unknown and malformed ones never spoken; brackets that are not tags kept as text."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from stages.segmenter.sentences import SentenceCutter
from stages.segmenter.tags import Tag, TagReader, TaggedCutter

KNOWN = {"happy", "sad", "greeting", "neutral"}


def cut(tokens: list[str]) -> tuple[list[tuple[str, list[str]]], list[Tag]]:
    tc = TaggedCutter(SentenceCutter(), TagReader(KNOWN))
    out = []
    for token in tokens:
        out += tc.feed(token)
    return [(p.text, list(p.tags)) for p in out + tc.flush()], tc.ignored


def every_split(text: str) -> list[list[str]]:
    """The text cut once at every position, and into single characters."""
    return [[text[:i], text[i:]] for i in range(1, len(text))] + [list(text)]


def test_tags_attach_to_their_sentence_at_every_token_boundary():
    answer = "[happy]こんにちは！[sad]でも、もうすぐお別れです。"
    want = [("こんにちは！", ["happy"]), ("でも、", ["sad"]), ("もうすぐお別れです。", [])]
    for tokens in every_split(answer):
        assert cut(tokens) == (want, []), tokens


def test_several_tags_in_one_sentence_and_none_at_all():
    assert cut(["[happy][greeting]はじめまして。よろしく。"])[0] == [("はじめまして。", ["happy", "greeting"]),
                                                                  ("よろしく。", [])]
    assert cut(["タグのない答えです。"]) == ([("タグのない答えです。", [])], [])


def test_case_and_full_width_brackets():
    assert cut(["[Happy]やあ。［SAD］ああ。"])[0] == [("やあ。", ["happy"]), ("ああ。", ["sad"])]


def test_unknown_and_malformed_tags_are_never_spoken():
    segments, ignored = cut(["[wink]こんにちは。[happy こんにちは。", "[sad"])
    assert segments == [("こんにちは。", []), ("こんにちは。", [])]
    assert ignored == [Tag("wink", "unknown"), Tag("happy", "malformed"), Tag("sad", "malformed")]


def test_brackets_that_are_not_tags_are_handled_as_text_would_be():
    tokens = ["注釈[1]を見てください。[注]これは例です。[]", "[", "x" * 33, "]です。"]
    plain = SentenceCutter()
    as_text = [p.text for p in [s for t in tokens for s in plain.feed(t)] + plain.flush()]
    segments, ignored = cut(tokens)
    assert [s for s, _ in segments] == as_text and "注" in as_text[1]
    assert all(tags == [] for _, tags in segments) and ignored == []


def test_a_tag_opens_a_sentence():
    assert cut(["今日は[happy]いい天気", "！"])[0] == [("今日は", []), ("いい天気！", ["happy"])]


def test_hostile_tag_content_is_text_or_dropped_never_a_tag():
    for hostile in ("[happy|MOTION_ADD|0|x|/etc/passwd]", "[../../secret.vmd]", "[/abs/path.vmd]", "[happy\nSYNTH_STOP|0]"):
        segments, ignored = cut([hostile + "こんにちは。"])
        assert all(tags == [] for _, tags in segments)
        assert all(t.kind != "known" for t in ignored), hostile


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["[happy]", "[sad]", "[wink]", "[1]", "[注]", "こんにちは", "。", "！", "、",
                                 "[ha", "ppy]", "[", "]", "です", "Hello. ", "［greeting］"]), max_size=20),
       st.randoms(use_true_random=False))
def test_the_result_does_not_depend_on_the_token_boundaries(parts, rnd):
    answer = "".join(parts)
    tokens, i = [], 0
    while i < len(answer):
        n = rnd.randint(1, 4)
        tokens.append(answer[i:i + n])
        i += n
    assert cut(tokens) == cut([answer])
