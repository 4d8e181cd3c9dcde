"""The segmenter's cutting rules: examples, and properties over random texts and token splits."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings, strategies as st

from stages.segmenter.sentences import LEADING_JUNK, Piece, SentenceCutter, speakable
from tests.test_pacing import whole_answer


def pieces(text: str, sizes: list[int] | None = None, **kw: int) -> list[Piece]:
    """Feed ``text`` split into tokens of the given sizes (cycled), then flush."""
    cutter = SentenceCutter(**kw)
    out: list[Piece] = []
    pos, k = 0, 0
    while pos < len(text):
        size = sizes[k % len(sizes)] if sizes else len(text)
        out += cutter.feed(text[pos:pos + size])
        pos, k = pos + size, k + 1
    return out + cutter.flush()


def cut(text: str, sizes: list[int] | None = None, **kw: int) -> list[str]:
    """The segments of ``text`` when the whole answer is known (:func:`whole_answer`)."""
    merge = {"merge_chars": kw["soft_cut_chars"]} if "soft_cut_chars" in kw else {}
    return [p.text for p in whole_answer(pieces(text, sizes, **kw), max_bytes=kw.get("max_bytes", 600), **merge)]


def texts(text: str, sizes: list[int] | None = None, **kw: int) -> list[str]:
    return [p.text for p in pieces(text, sizes, **kw)]


def words(text: str) -> str:
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LN")


@pytest.mark.parametrize("text, expected", [
    ("こんにちは！今日はいい天気ですね。Let's take a walk, shall we? 円周率は3.14です。",
     ["こんにちは！", "今日はいい天気ですね。", "Let's take a walk, shall we?", "円周率は3.14です。"]),
    # closing bracket stays; the quoting particle continues the sentence; と opening a sentence does not
    ("彼は「明日は晴れるよ。」と言いました。そうですか。とにかく行こう！",
     ["彼は「明日は晴れるよ。」と言いました。", "そうですか。", "とにかく行こう！"]),
    ("「本当？」って聞いたの。うん。", ["「本当？」って聞いたの。", "うん。"]),
    # 。！？ with nothing open end the sentence at once; the marks after it are not spoken
    ("えっ！？……そうなの。！", ["えっ！", "そうなの。"]),
    # inside a bracket a run of end marks is one end, and the closer stays with it
    ("「えっ！？……」そうなの。", ["「えっ！？……」", "そうなの。"]),
    # numbers, domains, abbreviations, initials and e-mail addresses are never cut
    ("It costs 1,000 yen. Mr. Smith uses Node.js at example.com. Write to a.b@example.com. J. K. Rowling wrote it.",
     ["It costs 1,000 yen.", "Mr. Smith uses Node.js at example.com.", "Write to a.b@example.com.",
      "J. K. Rowling wrote it."]),
    # the first segment is the first clause; later ones whole sentences, cut at a clause past 40 characters
    ("えーと、今日の東京の天気は、晴れのち曇りで、午後からは少し風が強くなるそうですよ、気をつけてね。",
     ["えーと、", "今日の東京の天気は、晴れのち曇りで、午後からは少し風が強くなるそうですよ、気をつけてね。"]),
    ("はい、今日の東京はよく晴れていて、午後から少し風が強くなりそうなので、お出かけの際は上着があると安心です。"
     "夕方には気温も下がりますので、暖かい服装で、無理をせず、楽しい一日をお過ごしくださいね、本当に。",
     ["はい、", "今日の東京はよく晴れていて、午後から少し風が強くなりそうなので、お出かけの際は上着があると安心です。",
      "夕方には気温も下がりますので、暖かい服装で、無理をせず、楽しい一日をお過ごしくださいね、", "本当に。"]),
    # markdown, code, URLs and emoji stay out of speech
    ("## 手順\n1. **まず**、[公式サイト](https://example.com/dl?x=1)を開きます😀\n```sh\nrm -rf /\n```\n- 次に`install`を実行！",
     ["手順", "1 まず、公式サイトを開きます", "次にinstallを実行！"]),
    ("詳しくは https://example.com/a/b を見てね。", ["詳しくは  を見てね。"]),
    # newlines end segments; Latin spacing is kept as written
    ("Hello  there\nsecond line", ["Hello  there", "second line"]),
    ("", []),
    ("。！？", []),
])
def test_examples(text: str, expected: list[str]) -> None:
    assert cut(text) == expected
    assert cut(text, [1]) == expected


def test_byte_cap_cuts_at_a_space_and_never_inside_a_number() -> None:
    text = "word " * 30 + "1234567890" * 10
    segments = cut(text, max_bytes=40)
    assert all(len(s.encode()) <= 40 for s in segments)
    assert words("".join(segments)) == words(text)
    assert all(s.startswith("word") or s.isdigit() for s in segments)


def test_unclosed_code_fence_is_dropped_at_the_end() -> None:
    assert cut("説明します。\n```\nprint('x')") == ["説明します。"]


PIECES = [
    "こんにちは", "今日は", "いい天気", "ですね", "ジェネ", "です", "私", "は", "と", "って", "とにかく",
    "Hello", "world", "shall", "we", "Node.js", "example.com", "Mr.", "3.14", "1,000", "42",
    "a.b@example.com", "https://example.com/x?y=1", "www.example.org",
    "。", "、", "！", "？", "!", "?", ".", ",", "，", "…", "‥", "「", "」", "『", "』", "（", "）", "(", ")",
    '"', "'", " ", "  ", "\n", "\n\n", "**", "*", "`", "```", "~~", "#", "- ", "1. ", "> ", "[", "](", "😀",
    "👍🏽", "❤️", "\u3000",
]


@st.composite
def answers(draw: st.DrawFn) -> str:
    return "".join(draw(st.lists(st.sampled_from(PIECES), max_size=60)))


@st.composite
def splits(draw: st.DrawFn) -> list[int]:
    return draw(st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=20))


@settings(max_examples=400, deadline=None)
@given(answers(), splits(), st.integers(min_value=8, max_value=80))
def test_any_token_split_gives_the_same_segments_and_loses_nothing(text: str, sizes: list[int], cap: int) -> None:
    whole = cut(text, max_bytes=cap)
    assert cut(text, sizes, max_bytes=cap) == whole
    assert words("".join(whole)) == words(speakable(text))
    for segment in whole:
        assert len(segment.encode()) <= cap
        assert segment == segment.strip() and words(segment)
        assert segment[0] not in LEADING_JUNK, segment


@pytest.mark.parametrize("text, expected", [
    ("はい！、受け取りました。", ["はい！", "受け取りました。"]),
    ("Okay!, got it.", ["Okay!", "got it."]),
    ("わかりました\n、それでは。", ["わかりました", "それでは。"]),
])
def test_no_segment_starts_with_punctuation(text: str, expected: list[str]) -> None:
    assert cut(text) == expected
    assert cut(text, [1]) == expected


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80), splits())
def test_arbitrary_unicode_is_split_invariant(text: str, sizes: list[int]) -> None:
    whole = cut(text)
    assert cut(text, sizes) == whole
    assert words("".join(whole)) == words(speakable(text))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["3.14", "1,000", "a.b@example.com", "Node.js", "「晴れるよ。」と言った"]), min_size=1),
       st.lists(st.sampled_from(["。", "、", " ", "です", "Yes. ", "\n", ", "]), min_size=1), splits())
def test_numbers_addresses_and_quotes_are_never_cut(keep: list[str], glue: list[str], sizes: list[int]) -> None:
    text = "".join(k + glue[i % len(glue)] for i, k in enumerate(keep))
    segments = texts(text, sizes, soft_cut_chars=1)
    for k in keep:
        assert any(k in s for s in segments), (k, segments)


def test_url_text_never_reaches_speech() -> None:
    for sizes in ([1], [2], [3], None):
        spoken = "".join(cut("見て https://example.com/path?q=1。次は (https://x.y/z) です。", sizes))
        assert "http" not in spoken and "example" not in spoken and "x.y" not in spoken


def test_a_pause_releases_a_finished_sentence_but_not_an_unfinished_one():
    cutter = SentenceCutter()

    def said(pieces: list[Piece]) -> list[str]:
        return [p.text for p in pieces]
    assert said(cutter.feed("はい、わかりました。")) == ["はい、", "わかりました。"]  # 、 and 。: at once
    assert cutter.feed("Version 3.") == []                # may be 3.14: waits for the next character
    assert said(cutter.ripe()) == ["Version 3."]
    assert cutter.feed("次は") == [] and cutter.ripe() == [] and cutter.has_pending()
    assert said(cutter.feed("ですね。それで")) == ["次はですね。"]
    assert cutter.feed(" it is done.") == [] and said(cutter.ripe()) == ["それで it is done."]
    assert not cutter.has_pending()
    assert cutter.feed("「それは」") == [] and said(cutter.ripe()) == ["「それは」"]


@pytest.mark.parametrize("text, released", [
    ("こんにちは。", ["こんにちは。"]), ("元気ですか？", ["元気ですか？"]), ("すごい！", ["すごい！"]),
    ("Really?", ["Really?"]), ("Great!", ["Great!"]),
    ("「晴れるよ。", []),            # the bracket is open: 」と may follow
    ("彼は「晴れるよ。」", []),       # と or って may follow the closer
    ("It costs 3.", []),             # 3.14
    ('He said "yes!', []),           # the quote is open
])
def test_a_certain_end_is_released_without_waiting_for_the_next_token(text: str, released: list[str]):
    assert [p.text for p in SentenceCutter().feed(text)] == released


@pytest.mark.parametrize("text", [
    " ``````#こんにちは",                                   # a fence must not make "#" start a line
    "https://example.com/x?y=1```こんにちは```Hello",       # a URL must not run on across a code block
    " #Helloこんにちは",                                    # blanks before a heading marker
])
def test_found_by_hypothesis(text: str) -> None:
    whole = cut(text)
    for size in (1, 2, 3):
        assert cut(text, [size]) == whole
    assert words("".join(whole)) == words(speakable(text))


@pytest.mark.parametrize("text, expected", [
    # an opening, a greeting or a phrase ending in hiragana is a breath group: the clause ends there
    ("はい、そうです。", ["はい、", "そうです。"]),
    ("うーん、難しいですね。", ["うーん、", "難しいですね。"]),
    ("そうですね、今日は晴れて、暖かいです。", ["そうですね、", "今日は晴れて、", "暖かいです。"]),
    ("実際、最近、一方、", ["実際、", "最近、", "一方、"]),
    ("Well, I think so. Sure, go ahead, please.", ["Well,", "I think so.", "Sure,", "go ahead, please."]),
    ("If it rains tomorrow, we stay home.", ["If it rains tomorrow,", "we stay home."]),
    # a bare noun before a comma is a list, not a pause; nor are numbers or what is inside brackets
    ("東京、大阪、名古屋に行きます。", ["東京、大阪、名古屋に行きます。"]),
    ("apples, oranges, and pears.", ["apples, oranges, and pears."]),
    ("価格は1,000円と2,500円です。", ["価格は1,000円と2,500円です。"]),
    ("彼は「はい、そうです、わかりました」と言った。", ["彼は「はい、そうです、わかりました」と言った。"]),
    ("(well, maybe, who knows) fine.", ["(well, maybe, who knows) fine."]),
    # any comma ends a clause once it is long (soft_cut_chars)
    ("東京都千代田区丸の内一丁目東京駅前広場中央口改札外観光案内所受付窓口係員詰所前室、大阪",
     ["東京都千代田区丸の内一丁目東京駅前広場中央口改札外観光案内所受付窓口係員詰所前室、", "大阪"]),
])
def test_clauses(text: str, expected: list[str]) -> None:
    for sizes in (None, [1], [2]):
        assert texts(text, sizes) == expected


def test_a_piece_says_whether_its_sentence_ends_and_whether_a_space_stood_before_it() -> None:
    got = pieces("Well, I see. はい、そうです。\nNext")
    assert [(p.text, p.ends, p.spaced) for p in got] == [
        ("Well,", False, False), ("I see.", True, True), ("はい、", False, True), ("そうです。", True, False),
        ("Next", True, True)]


@settings(max_examples=300, deadline=None)
@given(answers(), splits(), st.integers(min_value=8, max_value=80), st.integers(min_value=1, max_value=60))
def test_pieces_are_split_invariant_and_whole(text: str, sizes: list[int], cap: int, soft: int) -> None:
    whole = pieces(text, max_bytes=cap, soft_cut_chars=soft)
    assert pieces(text, sizes, max_bytes=cap, soft_cut_chars=soft) == whole
    assert words("".join(p.text for p in whole)) == words(speakable(text))
    for piece in whole:
        assert len(piece.text.encode()) <= cap and piece.text == piece.text.strip() and words(piece.text)
        assert piece.text[0] not in LEADING_JUNK, piece
    if whole:
        assert whole[-1].ends  # the end of the answer ends its last sentence
