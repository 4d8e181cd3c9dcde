"""tests.first_audio: one turn's figures from hand-made records, exact values."""

from __future__ import annotations

import pytest

from stages.commands.avatar_sim import Received
from tests.first_audio import LocateError, clause_ends, first_clause, measure, sent_at

ANSWER = "はい、今日は晴れです。夕方は雨、夜は雪です。"
#          0 1 2 3 4 5 6 7 8 9 10 ...      15        21
SENT = [(10.40, "はい"), (10.43, "、今"), (10.46, "日は晴"), (10.49, "れです"), (10.52, "。夕方"), (10.55, "は雨"),
        (12.00, "、夜は"), (12.80, "雪です。")]
SENTENCES = [  # (SYNTH_START received, SYNTH_EVENT_START, SYNTH_EVENT_STOP, text)
    (10.45, 10.47, 10.90, "はい、"),          # its clause: "、" sent at 10.43
    (11.00, 11.02, 11.80, "今日は晴れです。"),  # "。" at 10.52, before the stop: the whole gap counts, 0.10
    (12.05, 12.07, 12.60, "夕方は雨、"),       # "、" at 12.00, after the stop at 11.80: only 0.05 counts
    # "。" noted at 12.80: the server notes a token's time after writing it, so the sentence can be
    # read before that; the clause was never there during the gap: 0
    (12.79, 12.81, 13.50, "夜は雪です。"),
]


def records(sentences=SENTENCES, utterance: float = 10.0) -> tuple[list[Received], list[Received]]:
    """The simulator's inbox and received lines for ``sentences``, with some noise around them."""
    inbox = [Received(9.9, "RECOG_EVENT_START"),
             Received(9.95, "SYNTH_EVENT_STOP|0"),  # the end of something said before the utterance
             Received(utterance, "RECOG_EVENT_STOP|今日の天気は？")]
    received = [Received(10.2, "MOTION_ADD|0|listen|motions/action/listen.vmd|PART|ONCE")]
    for start, sound, stop, text in sentences:
        received.append(Received(start, f"SYNTH_START|0|mei_voice_normal|{text}"))
        inbox += [Received(start + 0.001, f"SYNTH_START|0|mei_voice_normal|{text}"),
                  Received(sound, "SYNTH_EVENT_START|0"), Received(sound, "LIPSYNC_START|0|a,100"),
                  Received(stop, "LIPSYNC_EVENT_STOP|0"), Received(stop, "SYNTH_EVENT_STOP|0")]
    inbox.sort(key=lambda r: r.t)
    return inbox, received


def test_one_turn_exact_figures():
    heard = measure(*records(), SENT, ANSWER)
    assert heard.first_synth == pytest.approx(0.45)
    assert heard.first_sound == pytest.approx(0.47)
    assert heard.synth_after_first_token == pytest.approx(0.05)
    assert heard.after_first_token == pytest.approx(0.07)
    assert heard.synth_after_clause == pytest.approx(10.45 - 10.43)  # "、" of はい、 sent at 10.43
    assert heard.waiting_silence == pytest.approx(0.10 + 0.05 + 0)
    assert heard.max_gap_waiting == pytest.approx(0.10)
    assert heard.segments == 4
    assert heard.said == pytest.approx(13.50 - 10.47)
    assert heard.text_lost == 0


def test_one_sentence_has_no_gap():
    whole = [(10.45, 10.47, 15.0, ANSWER)]
    heard = measure(*records(whole), SENT, ANSWER)
    assert (heard.waiting_silence, heard.max_gap_waiting, heard.segments) == (0.0, 0.0, 1)
    assert heard.said == pytest.approx(15.0 - 10.47)


def test_first_clause():
    assert first_clause("はい、今日は。") == "はい、"
    assert first_clause("夜は雪です") == "夜は雪です"
    assert first_clause("Well… yes.") == "Well…"


def test_clauses_are_found_by_letters_in_order():
    assert clause_ends([s[3] for s in SENTENCES], ANSWER) == ([2, 10, 15, 21], 0)
    # a repeated phrase: the second is found after the first
    assert clause_ends(["はい、", "はい、わかりました。"], "はい、はい、わかりました。") == ([2, 5], 0)
    # markup the pipeline drops, spaces the seed strips: the same places
    answer = "**Yes**, it is. Fine, thanks!"
    expected = ([answer.index(","), answer.index(",", 10)], 0)
    assert clause_ends(["Yes, it is.", "Fine, thanks!"], answer) == expected
    assert clause_ends(["Yes,itis.", "Fine,thanks!"], answer) == expected
    # no mark: the clause is the whole sentence, completed by its last letter
    assert clause_ends(["はい、今日は晴れです。夕方は雨、", "夜は雪です"], ANSWER) == ([2, 20], 0)
    # a sentence of marks alone: the mark after what was spoken, not the one before
    assert clause_ends(["そうですね！", "！", "次です。"], "そうですね！！次です。") == ([5, 6, 10], 0)


def test_text_no_sentence_spoke_is_counted():
    assert clause_ends(["はい、", "夜は雪です。"], ANSWER) == ([2, 21], len("今日は晴れです夕方は雨"))
    assert clause_ends(["はい、"], ANSWER)[1] == len("今日は晴れです夕方は雨夜は雪です")
    # dropped inside a sentence (the pipeline never speaks a URL): the sentence is still placed
    answer = "はい、詳しくは https://example.com/a をどうぞ。次です。"
    assert clause_ends(["はい、詳しくは をどうぞ。", "次です。"], answer) == (
        [2, len(answer) - 1], len("httpsexamplecoma"))


@pytest.mark.parametrize("sentences, message", [
    (["はい、", "さようなら。"], "'さようなら。' is not in the answer"),
    (["はい、", "はい、"], "sentence 2 'はい、' is not in the answer"),  # said twice
    (["はい、", "  "], "neither a letter nor a mark"),
])
def test_a_sentence_not_in_the_answer_is_an_error(sentences, message):
    with pytest.raises(LocateError, match=message):
        clause_ends(sentences, ANSWER)


def test_sent_at():
    assert [sent_at(SENT, i) for i in (0, 1, 2, 21)] == [10.40, 10.40, 10.43, 12.80]
    with pytest.raises(ValueError, match="character 22 of the answer was never sent"):
        sent_at(SENT, 22)


def test_incomplete_records_are_errors():
    inbox, received = records()
    with pytest.raises(ValueError, match="no RECOG_EVENT_STOP"):
        measure([r for r in inbox if not r.line.startswith("RECOG_EVENT_STOP")], received, SENT, ANSWER)
    with pytest.raises(ValueError, match="do not make the answer"):
        measure(inbox, received, SENT[:-1], ANSWER)
    with pytest.raises(ValueError, match="4 sentences were started but 3 ended"):
        measure(inbox[:-1], received, SENT, ANSWER)
    with pytest.raises(ValueError, match="nothing was spoken"):
        measure(inbox, received[:1], SENT, ANSWER)
    with pytest.raises(LocateError):
        measure(inbox, [received[i] for i in (0, 1, 3, 2, 4)], SENT, ANSWER)  # out of order
