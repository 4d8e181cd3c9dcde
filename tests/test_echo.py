"""The matching behind the echo guard and backchannels (stages.bridge.echo), with a fake clock."""

from __future__ import annotations

from stages.bridge.echo import Backchannels, EchoGuard, normalize

WORDS = ["うん", "はい", "へえ", "mhm", "ok", "i see"]


def guard(*spoken: tuple[str, float, float | None]) -> EchoGuard:
    """An echo guard (grace 1 s) that heard ``(text, began, ended)`` in order."""
    echo = EchoGuard(grace=1.0)
    for text, began, ended in spoken:
        echo.speak(text, began)
        if ended is not None:
            echo.quiet(ended)
    return echo


def test_normalize_keeps_only_what_is_said():
    assert normalize("はい、ウン！ OK?") == "はいうんok"
    assert normalize("Ｉ　ｓｅｅ。") == "isee"
    assert normalize("、。！") == ""


def test_a_sentence_heard_with_a_few_wrong_characters_is_an_echo():
    echo = guard(("今日は晴れていて、とても気持ちがいいですね。", 0.0, None))
    score, like = echo.match("今日は晴れてて、とても気持ちがいいです", began=0.2, now=9.0)
    assert score >= 0.85 and like.startswith("今日は")
    assert echo.match("キョウハハレテイテ", began=0.2, now=9.0)[0] < 0.75  # kanji read as kana: not alike enough


def test_a_cut_off_sentence_and_two_sentences_heard_as_one_are_echoes():
    echo = guard(("東京の明日の天気は晴れです。", 0.0, 2.0), ("最高気温は二十五度の予想です。", 2.0, None))
    assert echo.match("東京の明日の天", began=0.1, now=9.0)[0] >= 0.9  # cut off by SYNTH_STOP
    assert echo.match("晴れです最高気温は二十五度の", began=0.1, now=9.0)[0] >= 0.9  # across the two


def test_a_short_result_matches_only_a_whole_segment():
    echo = guard(("はい、", 0.0, 0.5), ("今日は晴れです。", 0.5, None))
    assert echo.match("はい", began=0.1, now=9.0)[0] == 1.0
    assert echo.match("今日は晴", began=0.6, now=9.0)[0] == 1.0  # the beginning: cut off at once
    assert echo.match("今", began=0.6, now=9.0)[0] == 1.0
    assert echo.match("は晴れで", began=0.6, now=9.0)[0] < 0.75  # a part, but too short to say it is one


def test_what_the_user_says_is_not_an_echo():
    echo = guard(("今日はちょっといい天気ですね、散歩にでも行きましょうか。", 0.0, None))
    for said in ("ちょっと待って", "明日の天気は", "散歩はいやです", "ストップ", "散歩に", "天気は"):
        assert echo.match(said, began=1.0, now=9.0)[0] < 0.75, said


def test_only_what_it_could_have_heard_of_itself_counts():
    echo = guard(("駅は右です。", 0.0, 1.0), ("ほかにご質問は。", 5.0, 6.0))
    assert echo.match("駅は右です", began=1.3, now=1.6)[0] == 1.0    # its voice began with the sound
    assert echo.match("駅は右です", began=1.8, now=2.1)[0] < 0.75    # began after it: the user said it
    assert echo.match("駅は右です", began=None, now=1.8)[0] == 1.0   # no start: a result within the grace
    assert echo.match("駅は右です", began=None, now=2.5)[0] < 0.75
    assert echo.match("ほかにご質問は", began=5.2, now=6.3)[0] == 1.0


def test_our_line_and_mmdagent_ex_copy_of_it_are_one_segment():
    echo = guard(("同じ文です。", 0.0, None))
    echo.speak("同じ文です。", 0.02)
    assert len(echo.said) == 1
    echo.speak("次の文です。", 0.5)  # a new SYNTH_START cuts the one playing off
    assert [s.ended for s in echo.said] == [0.5, None]


def test_backchannels_are_the_words_or_runs_of_them():
    words = Backchannels(WORDS)
    for heard in ("うん", "ウン。", "うんうん", "はい、はい", "へえ！", "Mhm.", "OK", "I see", "うんはい"):
        assert heard in words, heard
    for heard in ("うんそれで", "ちょっと待って", "はいはいはい違います", "okay then", "", "。"):
        assert heard not in words, heard
    assert "うん" not in Backchannels([])
