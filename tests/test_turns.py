"""Turn control (the bridge's decisions), driven line by line with a fake clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker import config
from stages.states import ConversationState as C
from stages.bridge.turns import Publish, TurnController, Write


def controller(policy: str = "interrupt", up: bool = True, **turn) -> TurnController:
    cfg = dict(config.load(Path(os.devnull))["turn"], barge_in=policy, echo_grace=1.0, listen_timeout=5.0, **turn)
    tc = TurnController(cfg, model="0", voice="mei_voice_normal")
    tc.on_pipeline(up)
    return tc


def kinds(actions) -> list[str]:
    return [a.type if isinstance(a, Write) else a.kind for a in actions]


def say(tc: TurnController, text: str, now: float = 0.0):
    return tc.on_line("RECOG_EVENT_START", [], 0.0, now) + tc.on_line("RECOG_EVENT_STOP", [text], 0.0, now)


def speak(tc: TurnController, text: str, now: float = 0.0) -> None:
    tc.on_written("SYNTH_START", ["0", "mei_voice_normal", text], tc.turn, now)
    tc.on_line("SYNTH_EVENT_START", ["0"], 0.0, now)


def test_utterance_opens_a_turn_with_growing_ids():
    tc = controller()
    first = say(tc, "こんにちは")
    assert kinds(first) == ["turn_start"] and first[0].body == {"text": "こんにちは"}
    assert tc.machine == C.ANSWERING
    tc.on_spoken(tc.turn)
    turn = tc.turn
    assert tc.machine == C.IDLE
    say(tc, "次")
    assert tc.turn > turn


def test_interrupt_while_speaking_stops_first_and_reports_what_was_heard():
    tc = controller()
    say(tc, "質問")
    speak(tc, "一文目。")
    tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0)
    speak(tc, "二文目。")
    actions = tc.on_line("RECOG_EVENT_START", [], 0.0)
    assert actions[0] == Write("SYNTH_STOP", ["0"])
    cancel = actions[1]
    assert isinstance(cancel, Publish) and cancel.kind == "cancel"
    assert cancel.body == {"reason": "interrupted", "stopped": True, "spoken": ["一文目。", "二文目。"]}
    assert tc.machine == C.LISTENING
    assert not tc.accepts("SYNTH_START", tc.turn)  # nothing more of that turn is written
    assert tc.accepts("SYNTH_STOP", tc.turn) and tc.accepts("MOTION_ADD", 0)


def test_interrupt_before_anything_was_spoken_writes_no_stop():
    tc = controller()
    say(tc, "質問")
    actions = tc.on_line("RECOG_EVENT_START", [], 0.0)
    assert kinds(actions) == ["cancel"] and actions[0].body["stopped"] is False


def test_new_result_supersedes_the_running_turn():
    tc = controller()
    say(tc, "一つ目")
    old = tc.turn
    speak(tc, "答え。")
    actions = tc.on_line("RECOG_EVENT_STOP", ["二つ目"], 0.0)
    assert kinds(actions) == ["SYNTH_STOP", "cancel", "turn_start"]
    assert actions[1].turn == old and actions[1].body["reason"] == "superseded"
    assert actions[2].turn > old and tc.accepts("SYNTH_START", actions[2].turn)
    assert not tc.accepts("SYNTH_START", old)


def test_ignore_policy_discards_self_echo_during_speech_and_grace():
    tc = controller("ignore")
    say(tc, "質問", now=0.0)
    speak(tc, "答えです。", now=1.0)
    assert tc.on_line("RECOG_EVENT_START", [], 0.0, 2.0) == []
    assert tc.on_line("RECOG_EVENT_STOP", ["答えです"], 0.0, 2.5) == []
    tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0, 3.0)
    tc.on_spoken(tc.turn, now=3.0)
    assert tc.on_line("RECOG_EVENT_STOP", ["答えです"], 0.0, 3.5) == []      # within echo_grace
    assert kinds(tc.on_line("RECOG_EVENT_STOP", ["本当の質問"], 0.0, 4.5)) == ["turn_start"]


def test_noise_without_a_result_resumes_nothing_and_loses_nothing():
    tc = controller()
    tc.on_line("RECOG_EVENT_START", [], 0.0)
    assert tc.machine == C.LISTENING
    tc.on_tick(tc.next_deadline() + 0.01)
    assert tc.machine == C.IDLE and tc.next_deadline() is None
    assert kinds(tc.on_line("RECOG_EVENT_STOP", ["あとから"], 0.0)) == ["turn_start"]


def test_away_cancels_and_pauses_until_off():
    tc = controller()
    say(tc, "質問")
    speak(tc, "答え。")
    assert kinds(tc.on_line("RECOG_EVENT_AWAY", ["ON"], 0.0)) == ["SYNTH_STOP", "cancel"]
    assert tc.machine == C.AWAY
    assert say(tc, "聞こえない") == []
    tc.on_line("RECOG_EVENT_AWAY", ["OFF"], 0.0)
    assert kinds(say(tc, "聞こえる")) == ["turn_start"]


def test_other_models_and_empty_results_change_nothing():
    tc = controller()
    tc.on_line("SYNTH_EVENT_START", ["1"], 0.0)
    assert kinds(say(tc, "")) == [] and tc.machine == C.IDLE
    say(tc, "質問")
    assert kinds(tc.on_line("RECOG_EVENT_START", [], 0.0)) == ["cancel"]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="barge_in"):
        TurnController({"barge_in": "shout"}, "0", "v")


NOTICE = config.load(Path(os.devnull))["turn"]["failure_notice"]


def test_utterance_while_the_pipeline_is_down_waits_for_it():
    tc = controller(up=False)
    actions = say(tc, "聞こえる？", now=10.0)
    assert kinds(actions) == ["NOTIFY_SHOW"] and tc.machine == C.HOLDING
    held = tc.turn
    actions = tc.on_pipeline(True, now=15.0)
    assert kinds(actions) == ["turn_start"] and actions[0].turn == held and actions[0].body == {"text": "聞こえる？"}
    assert tc.machine == C.ANSWERING


def test_a_held_utterance_too_old_gets_the_notice():
    tc = controller(up=False)
    say(tc, "聞こえる？", now=0.0)
    assert tc.next_deadline() == tc.cfg["max_age"]
    actions = tc.on_tick(tc.cfg["max_age"] + 0.1)
    assert actions == [Write("SYNTH_START", ["0", "mei_voice_normal", NOTICE])]
    assert tc.machine == C.IDLE and not tc.accepts("SYNTH_START", tc.turn)


def test_stage_lost_before_anything_was_said_asks_again_under_a_new_turn():
    tc = controller()
    say(tc, "質問")
    old = tc.turn
    actions = tc.on_stage_lost("llm", now=1.0)
    assert kinds(actions) == ["cancel", "turn_start"]
    assert actions[0].turn == old and actions[1].turn > old and actions[1].body == {"text": "質問"}
    assert not tc.accepts("SYNTH_START", old) and tc.accepts("SYNTH_START", actions[1].turn)


def test_the_llm_lost_after_speech_began_asks_it_to_go_on_or_ends_with_the_notice():
    tc = controller()
    say(tc, "質問")
    old = tc.turn
    tc.on_written("SYNTH_START", ["0", "mei_voice_normal", "一文目。"], tc.turn)
    assert kinds(tc.on_stage_lost("llm", now=1.0)) == ["cancel"]   # written: it will be said, then the rest
    tc.on_line("SYNTH_EVENT_START", ["0"], 0.0, now=1.1)
    resumed = tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0, now=1.2)
    assert kinds(resumed) == ["turn_start"]
    assert resumed[0].body == {"text": "質問", "resume": old, "heard": ["一文目。"]}
    # the restarted llm cannot go on with it ([llm] prefill off): it reports the turn broken
    actions = tc.on_stage_lost("llm", now=1.5, force=True)
    assert kinds(actions) == ["cancel", "SYNTH_START"] and actions[1].args[2] == NOTICE
    assert actions[0].body["reason"] == "failed" and tc.machine == C.IDLE


def test_another_stage_lost_after_speech_began_resumes_once_the_avatar_is_quiet():
    tc = controller()
    say(tc, "質問")
    old = tc.turn
    speak(tc, "一文目。")
    tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0, now=0.5)
    speak(tc, "二文目。", now=0.6)                      # playing when the sequencer is killed
    lost = tc.on_stage_lost("sequencer", now=1.0)
    assert kinds(lost) == ["cancel"] and lost[0].turn == old
    assert lost[0].body == {"reason": "lost", "stopped": False, "spoken": ["一文目。", "二文目。"]}
    assert not tc.accepts("SYNTH_START", old)          # nothing more of the old id is written
    assert tc.on_stage_lost("broker", now=1.1) == []   # a second loss while waiting changes nothing
    resumed = tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0, now=2.0)   # no SYNTH_STOP: it played to its end
    assert kinds(resumed) == ["turn_start"] and resumed[0].turn > old
    assert resumed[0].body == {"text": "質問", "resume": old, "heard": ["一文目。", "二文目。"]}
    assert tc.machine == C.ANSWERING and tc.accepts("SYNTH_START", tc.turn)
    speak(tc, "三文目。", now=2.1)
    # lost again: counted from the answer's start, named by the id it was first asked under (the one
    # the llm knows), and the interruption after it keeps all that was heard
    again = tc.on_stage_lost("segmenter", now=2.5)
    assert again[0].body["reason"] == "lost"
    tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0, now=3.0)
    assert tc.start_body == {"text": "質問", "resume": old, "heard": ["一文目。", "二文目。", "三文目。"]}
    speak(tc, "四文目。", now=3.1)
    stop = tc.on_line("RECOG_EVENT_START", [], 0.0, now=3.2)
    assert kinds(stop) == ["SYNTH_STOP", "cancel"]
    assert stop[1].body["spoken"] == ["一文目。", "二文目。", "三文目。", "四文目。"]


def test_a_stage_lost_between_sentences_resumes_at_once_and_waits_for_the_pipeline():
    tc = controller()
    say(tc, "質問")
    speak(tc, "一文目。")
    tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0, now=0.5)
    assert kinds(tc.on_stage_lost("broker", now=1.0)) == ["cancel"]
    assert kinds(tc.on_tick(1.0)) == ["turn_start"]                                  # quiet: at once
    speak(tc, "二文目。", now=1.1)
    tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0, now=1.5)
    tc.on_pipeline(False, now=1.6)
    assert kinds(tc.on_stage_lost("segmenter", now=1.7)) == ["cancel"]              # down: it waits
    assert kinds(tc.on_pipeline(True, now=2.0)) == ["turn_start"]


def test_a_utterance_while_a_resume_waits_drops_it():
    tc = controller()
    say(tc, "質問")
    speak(tc, "一文目。")
    tc.on_stage_lost("sequencer", now=1.0)
    new = say(tc, "別の質問", now=1.2)
    assert kinds(new) == ["SYNTH_STOP", "cancel", "turn_start"] and new[2].body == {"text": "別の質問"}
    assert tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0, now=2.0) == []               # no resume of the old answer


def test_a_stage_lost_after_every_sentence_was_written_changes_nothing():
    tc = controller()
    say(tc, "質問")
    tc.on_progress("turn_end", "segmenter", tc.turn, segments=1)
    speak(tc, "答え。")
    assert tc.on_stage_lost("broker", now=1.0) == [] and tc.machine == C.ANSWERING
    tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0, now=1.5)
    tc.progress_at = 0.0
    assert tc.on_tick(1000.0) == [] and tc.machine == C.IDLE   # the lost "spoken" is no failure either


def test_a_stage_whose_part_is_done_may_restart_freely():
    tc = controller()
    say(tc, "質問")
    tc.on_progress("turn_result", "llm", tc.turn)
    assert tc.on_stage_lost("llm", now=1.0) == [] and tc.machine == C.ANSWERING


def test_a_turn_without_progress_ends_with_the_notice():
    tc = controller()
    say(tc, "質問", now=0.0)
    tc.on_progress("token", "llm", tc.turn, now=5.0)
    assert tc.next_deadline() == 5.0 + tc.cfg["stall_timeout"]
    assert kinds(tc.on_tick(6.0)) == []
    assert kinds(tc.on_tick(5.0 + tc.cfg["stall_timeout"])) == ["cancel", "SYNTH_START"]


def test_a_lost_turn_start_is_sent_again_when_the_llm_shows_it_missed_it():
    tc = controller()
    say(tc, "質問", now=0.0)
    tc.sent_at = 0.0
    assert tc.on_llm_turn(0, now=0.5) == []                 # a heartbeat that crossed it
    again = tc.on_llm_turn(0, now=2.0)
    assert kinds(again) == ["turn_start"] and again[0].turn == tc.turn
    assert tc.on_llm_turn(tc.turn, now=5.0) == []


def test_a_segment_that_skips_one_is_a_gap():
    tc = controller()
    say(tc, "質問")
    assert not tc.segment_gap(tc.turn, 0)
    tc.on_written("SYNTH_START", ["0", "mei_voice_normal", "一。"], tc.turn)
    assert not tc.segment_gap(tc.turn, 1) and tc.segment_gap(tc.turn, 2)
    assert not tc.segment_gap(tc.turn - 1, 5)  # not the current turn: accepts() decides
    assert tc.written_already(tc.turn, 0) and not tc.written_already(tc.turn, 1)


NEXT = ["0", "mei_voice_normal", "二。"]
CUE = [("SYNTH_START", NEXT)]


def test_a_cue_waits_for_the_end_of_the_speech_playing_then_is_written_from_its_stop():
    tc = controller()
    say(tc, "質問")
    speak(tc, "一。")
    assert tc.on_speech(CUE, tc.turn, after=0) == []                       # held: segment 0 still plays
    assert tc.on_line("SYNTH_EVENT_START", ["1"], 0.0) == []            # another model's speech
    assert tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0) == [Write("SYNTH_START", NEXT)]
    tc.on_written("SYNTH_START", NEXT, tc.turn)
    assert tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0) == []             # released once


def test_a_cue_is_written_at_once_when_its_speech_has_ended_or_is_not_the_one_playing():
    tc = controller()
    say(tc, "質問")
    speak(tc, "一。")
    tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0)        # the stop crossed the cue on its way
    assert tc.on_speech(CUE, tc.turn, after=0) == [Write("SYNTH_START", NEXT)]
    tc = controller()
    say(tc, "質問")
    speak(tc, "一。")
    assert tc.on_speech(CUE, tc.turn, after=3) == [Write("SYNTH_START", NEXT)]  # not after the one playing


def test_a_stop_before_our_speech_started_does_not_release_the_cue():
    """The SYNTH_EVENT_STOP of speech cut off before ours: ours (segment 0) has not started."""
    tc = controller()
    say(tc, "質問")
    tc.on_written("SYNTH_START", ["0", "mei_voice_normal", "一。"], tc.turn)
    assert tc.on_speech(CUE, tc.turn, after=0) == []
    assert tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0) == []
    assert tc.cued == CUE


@pytest.mark.parametrize("then", ["interrupt", "new utterance", "failure notice"])
def test_a_cue_is_dropped_by_a_cancel_a_new_turn_or_another_synth_start(then: str):
    tc = controller()
    say(tc, "質問")
    speak(tc, "一。")
    tc.on_speech(CUE, tc.turn, after=0)
    if then == "interrupt":
        assert kinds(tc.on_line("RECOG_EVENT_START", [], 0.0)) == ["SYNTH_STOP", "cancel"]
    elif then == "new utterance":
        say(tc, "別の質問")
    else:
        tc.on_written("SYNTH_START", ["0", "mei_voice_normal", "ごめんなさい。"], tc.turn)
    assert tc.cued is None
    assert not [a for a in tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0) if isinstance(a, Write)]


def test_speaking_right_after_the_last_sentence_ended_interrupts_nothing():
    tc = controller()
    say(tc, "質問")
    tc.on_progress("turn_end", "segmenter", tc.turn, segments=1)
    speak(tc, "答え。")
    assert kinds(tc.on_line("RECOG_EVENT_START", [], 0.0)) == ["SYNTH_STOP", "cancel"]  # still speaking
    tc = controller()
    say(tc, "質問")
    tc.on_progress("turn_end", "segmenter", tc.turn, segments=1)
    speak(tc, "答え。")
    tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0)  # the sequencer's "spoken" has not come yet
    assert tc.on_line("RECOG_EVENT_START", [], 0.0) == [] and tc.machine == C.LISTENING


# -- motions around speech (stages.bridge.motions) ------------------------------------------

def expressive() -> TurnController:
    from stages.expression import Vocabulary
    cfg = config.load(Path(os.devnull))
    cfg["expression"].update(listening="listening", thinking="thinking", thinking_after=0.6)
    tc = TurnController(dict(cfg["turn"], listen_timeout=5.0), model="0", voice="mei_voice_normal",
                        vocabulary=Vocabulary(cfg))
    tc.on_pipeline(True)
    return tc


def motion_writes(actions) -> list[list[str]]:
    return [[a.type, a.args[1]] for a in actions if isinstance(a, Write) and a.type.startswith("MOTION_")]


def test_listening_ends_when_it_was_only_a_noise():
    from stages.expression import MOOD
    tc = expressive()
    assert motion_writes(tc.on_line("RECOG_EVENT_START", [], 0.0, now=0.0)) == [["MOTION_ADD", MOOD]]
    tc.machine.since = 0.0
    assert motion_writes(tc.on_tick(10.0)) == [["MOTION_DELETE", MOOD]]


def test_thinking_replaces_listening_and_an_answer_without_a_word_ends_it():
    from stages.expression import MOOD
    tc = expressive()
    say(tc, "質問", now=0.0)
    release = tc.sent_at
    assert motion_writes(tc.on_tick(release + 0.5)) == []
    assert tc.on_tick(release + 0.7)[0].args[2] == "motions/action/mei/mei_imagine_right_normal.vmd"
    tc.on_spoken(tc.turn)
    assert motion_writes(tc.on_spoken_actions()) == [["MOTION_DELETE", MOOD]]


def test_no_thinking_once_the_first_sentence_is_written_and_the_gesture_stops_with_a_barge_in():
    from stages.expression import GESTURE, MOOD
    tc = expressive()
    say(tc, "質問", now=0.0)
    lines = [("MOTION_ADD", ["0", GESTURE, "m.vmd", "PART", "ONCE", "ON", "OFF", "0"]), ("SYNTH_START", NEXT)]
    first = tc.on_speech(lines, tc.turn)
    assert [a.type for a in first] == ["MOTION_DELETE", "MOTION_ADD", "SYNTH_START"] and first[0].args[1] == MOOD
    for a in first:
        tc.on_written(a.type, a.args, tc.turn)
    tc.on_line("SYNTH_EVENT_START", ["0"], 0.0)
    assert motion_writes(tc.on_tick(tc.sent_at + 5.0)) == []                  # speech began: no thinking
    actions = tc.on_line("RECOG_EVENT_START", [], 0.0)
    assert [a.type for a in actions if isinstance(a, Write)][:2] == ["SYNTH_STOP", "MOTION_DELETE"]
    tc.on_line("MOTION_EVENT_DELETE", ["0", GESTURE], 0.0)
    assert tc.motions.gesture is False


def test_a_motion_mmdagent_ex_never_started_is_logged_once_with_its_file(caplog):
    tc = expressive()
    for _ in range(2):
        tc.on_written("MOTION_ADD", ["0", "x", "motions/none.vmd", "PART", "ONCE"], now=0.0)
        tc.on_tick(3.0)
    tc.on_written("MOTION_ADD", ["0", "x", "motions/ok.vmd", "PART", "ONCE"], now=0.0)
    tc.on_line("MOTION_EVENT_ADD", ["0", "x"], 0.0)
    tc.on_tick(3.0)
    warned = [r.getMessage() for r in caplog.records if "did not start the motion" in r.getMessage()]
    assert len(warned) == 1 and "motions/none.vmd" in warned[0]


def test_a_gesture_that_never_started_is_not_stopped_by_a_barge_in():
    from stages.expression import GESTURE
    tc = expressive()
    say(tc, "質問", now=0.0)
    tc.on_written("MOTION_ADD", ["0", GESTURE, "motions/none.vmd", "PART", "ONCE"], tc.turn, now=0.0)
    speak(tc, "一。")
    assert tc.motions.gesture
    tc.on_tick(3.0)                                   # no MOTION_EVENT_ADD: the file is not there
    assert [a.type for a in tc.on_line("RECOG_EVENT_START", [], 0.0) if isinstance(a, Write)] == ["SYNTH_STOP"]


# -- a bridge that goes away (MMDAgent-EX closed and opened again) -------------------------

def test_a_new_bridge_cancels_every_turn_before_its_own_and_its_turns_come_after():
    import time as _time
    before = int(_time.time() * 1000)
    tc = controller()
    gone = tc.on_ready()
    assert kinds(gone) == ["cancel"] and gone[0].body == {"reason": "gone", "stopped": False, "spoken": []}
    assert before - 1 <= gone[0].turn < tc.epoch
    say(tc, "こんにちは")
    assert tc.turn > gone[0].turn
    assert tc.on_stage_back() == gone                # published again to a stage that may have missed it


def test_the_latest_cancel_is_published_again_when_a_stage_comes_back():
    tc = controller()
    tc.on_ready()
    say(tc, "質問")
    speak(tc, "一文目。")
    cancel = [a for a in tc.on_line("RECOG_EVENT_START", [], 0.0) if isinstance(a, Publish)]
    assert tc.on_stage_back() == cancel and cancel[0].body["reason"] == "interrupted"


def test_speech_mmdagent_ex_never_answers_is_not_taken_as_going_on_forever():
    # an unknown voice alias: no SYNTH_EVENT_START at all; with barge_in = ignore every later
    # utterance would be discarded as echo if the bridge still counted the avatar as speaking
    cfg = dict(config.load(Path(os.devnull))["turn"], barge_in="ignore", echo_grace=1.0)
    limits = {"start_timeout": 3.0, "stop_timeout_base": 5.0, "stop_timeout_per_char": 0.5}
    tc = TurnController(cfg, model="0", voice="typo_voice", speech_limits=limits)
    tc.on_pipeline(True)
    say(tc, "質問", now=0.0)
    tc.on_written("SYNTH_START", ["0", "typo_voice", "答え。"], tc.turn, now=0.0)
    assert tc.voice.audible and tc.next_deadline() <= 3.0
    tc.on_tick(2.9)
    assert tc.voice.audible
    tc.on_tick(3.0)
    assert not tc.voice.audible
    tc.on_spoken(tc.turn, now=3.0)
    assert kinds(say(tc, "次の質問", now=4.5)) == ["turn_start"]   # heard, not discarded as echo
    # a speech that started but whose end never comes is bounded by its length
    tc.on_written("SYNTH_START", ["0", "typo_voice", "あいうえお"], tc.turn, now=10.0)
    tc.on_line("SYNTH_EVENT_START", ["0"], 0.0, now=10.1)
    assert tc.next_deadline() == 10.1 + 5.0 + 0.5 * 5
    tc.on_tick(17.5)
    assert tc.voice.audible
    tc.on_tick(17.6)
    assert not tc.voice.audible


def test_turn_ids_start_above_the_last_bridges_when_the_clock_was_set_back():
    tc = controller()
    tc.on_ready()
    ahead = tc.epoch + 3_600_000                     # the last bridge ran an hour ahead of this clock
    gone = tc.on_llm_turn(ahead, now=0.0)
    assert kinds(gone) == ["cancel"] and gone[0].turn == ahead and gone[0].body["reason"] == "gone"
    say(tc, "こんにちは")
    assert tc.turn > ahead
    assert tc.on_llm_turn(tc.turn - 1, now=0.0) == []  # ours now: an ordinary heartbeat


def test_a_sentence_sent_plainly_while_the_last_one_plays_waits_for_its_end():
    # a restarted sequencer is handed the next segment by the broker and sends it at once; written
    # now, it would cut off the sentence the avatar is saying (seen on a real MMDAgent-EX)
    tc = controller()
    say(tc, "質問")
    first = [("SYNTH_START", ["0", "mei_voice_normal", "一文目。"])]
    assert kinds(tc.on_speech(first, tc.turn)) == ["SYNTH_START"]
    tc.on_written("SYNTH_START", first[0][1], tc.turn)
    tc.on_line("SYNTH_EVENT_START", ["0"], 0.0)
    second = [("SYNTH_START", ["0", "mei_voice_normal", "二文目。"])]
    assert tc.on_speech(second, tc.turn) == []                       # held, not written over it
    assert kinds(tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0)) == ["SYNTH_START"]


def test_a_broker_death_seen_stage_by_stage_resumes_once_the_pipeline_is_back():
    # the bridge learns of a dead broker as each stage going silent, one after another (seen in a
    # loaded run): nothing is asked for while the pipeline is down, and the one request that goes
    # out when it is back names the id the llm knows the answer by
    tc = controller()
    say(tc, "質問")
    old = tc.turn
    speak(tc, "一文目。")
    tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0, now=0.5)
    actions = []
    for stage in ("sequencer", "segmenter", "llm"):
        actions += tc.on_stage_lost(stage, now=1.0) + tc.on_pipeline(False, now=1.0) + tc.on_tick(1.0)
    assert "turn_start" not in kinds(actions) and kinds(actions).count("cancel") == 1
    back = tc.on_pipeline(True, now=2.0)
    assert kinds(back) == ["turn_start"] and back[0].body["resume"] == old and back[0].body["heard"] == ["一文目。"]


def test_a_sentence_held_behind_speech_that_never_ends_is_written_when_that_is_taken_as_over():
    # an unknown voice: no event ever comes; the sequencer's plain copy of its cue (sent on its own
    # timeout, a little before the bridge's) is held, and must not stay held for good
    limits = {"start_timeout": 0.5, "stop_timeout_base": 5.0, "stop_timeout_per_char": 0.5}
    tc = TurnController(controller().cfg, model="0", voice="typo", speech_limits=limits)
    tc.on_pipeline(True)
    say(tc, "質問", now=0.0)
    tc.on_written("SYNTH_START", ["0", "typo", "一。"], tc.turn, now=0.0)
    second = [("SYNTH_START", ["0", "typo", "二。"])]
    assert tc.on_speech(second, tc.turn) == []                    # plainly, at 0.45 s: still "audible"
    assert kinds(tc.on_tick(0.5)) == ["SYNTH_START"]              # the first taken as over: written now
    assert tc.cued is None


def test_the_avatar_gone_mid_answer_cancels_its_turn_and_the_next_utterance_is_an_ordinary_turn():
    tc = controller()
    say(tc, "質問")
    speak(tc, "一文目。")
    actions = tc.on_avatar_gone(0.0)
    assert kinds(actions) == ["cancel"]  # no SYNTH_STOP: the app that would hear it is gone
    assert actions[0].body == {"reason": "gone", "stopped": False, "spoken": ["一文目。"]}
    assert tc.machine == C.IDLE and not tc.voice.audible
    assert not tc.accepts("SYNTH_START", tc.turn)
    gone_turn = tc.turn
    assert kinds(say(tc, "もどりました")) == ["turn_start"] and tc.turn > gone_turn
    assert tc.accepts("SYNTH_START", tc.turn)


def test_the_avatar_gone_while_idle_listening_or_away_cancels_nothing():
    for lines in ([], [("RECOG_EVENT_START", [])], [("RECOG_EVENT_AWAY", ["ON"])]):
        tc = controller()
        for msg_type, args in lines:
            tc.on_line(msg_type, args, 0.0)
        assert tc.on_avatar_gone(0.0) == [] and tc.machine == C.IDLE


def test_the_avatar_gone_drops_a_held_utterance():
    tc = controller(up=False)
    say(tc, "待って")
    assert tc.machine == C.HOLDING
    assert kinds(tc.on_avatar_gone(0.0)) == ["cancel"]
    assert tc.machine == C.IDLE and kinds(tc.on_pipeline(True)) == []


def test_an_input_asks_says_and_stops_as_the_bridge_decides():
    tc = controller()
    ask = tc.on_input({"action": "ask", "text": "今日の\n天気は？", "id": "a1", "source": "api", "from": "op"}, 0.0)
    assert kinds(ask) == ["turn_start", "input_result"]
    assert ask[0].body == {"text": "今日の 天気は？", "source": "api", "from": "op"}  # one line
    assert ask[1].body == {"id": "a1", "ok": True, "reason": "", "turn": tc.turn} and tc.machine == C.ANSWERING
    busy = tc.on_input({"action": "say", "text": "コメントありがとう", "when": "idle", "id": "c1"}, 0.0)
    assert kinds(busy) == ["input_result"] and busy[0].body["reason"] == "busy"  # never over a turn
    speak(tc, "晴れです。")
    first = tc.turn
    say_now = tc.on_input({"action": "say", "text": "[happy] お知らせです", "id": "s1", "source": "api"}, 0.0)
    assert kinds(say_now) == ["SYNTH_STOP", "cancel", "turn_start", "input_result"]  # cuts off, as a user would
    assert say_now[1].body["reason"] == "superseded" and say_now[1].turn == first
    assert say_now[2].body == {"text": "", "say": "[happy] お知らせです", "source": "api", "from": ""}
    speak(tc, "お知らせです")
    stop = tc.on_input({"action": "stop", "id": "x"}, 0.0)
    assert kinds(stop) == ["SYNTH_STOP", "cancel", "input_result"] and stop[1].body["reason"] == "stopped"
    assert tc.machine == C.IDLE and stop[2].body == {"id": "x", "ok": True, "reason": "", "turn": tc.turn}
    assert kinds(tc.on_input({"action": "stop"}, 0.0)) == ["input_result"]  # nothing to stop: fine
    idle = tc.on_input({"action": "ask", "text": "話題", "when": "idle", "source": "idle"}, 0.0)
    assert kinds(idle) == ["turn_start", "input_result"]


def test_an_input_never_comes_before_the_user_and_bad_ones_are_refused():
    tc = controller()
    tc.on_line("RECOG_EVENT_START", [], 0.0)  # the user is speaking
    assert tc.on_input({"action": "ask", "text": "コメント", "when": "idle"}, 0.0)[0].body["reason"] == "busy"
    tc.on_line("RECOG_EVENT_STOP", ["ユーザーの質問"], 0.0)
    assert tc.on_input({"action": "ask", "text": "x", "when": "idle"}, 0.0)[0].body["reason"] == "busy"
    for bad in ({"action": "EXECUTE", "text": "x"}, {"action": "ask", "text": "x", "when": "later"}, {}):
        assert tc.on_input(bad, 0.0)[0].body["reason"] == "invalid"
    assert tc.on_input({"action": "ask", "text": " \n "}, 0.0)[0].body["reason"] == "empty"
    tc.on_line("RECOG_EVENT_AWAY", ["ON"], 0.0)
    assert tc.on_input({"action": "ask", "text": "x"}, 0.0)[0].body["reason"] == "away"
    down = controller(up=False)
    held = down.on_input({"action": "ask", "text": "x" * 5000, "id": "h"}, 0.0)
    assert kinds(held) == ["input_result"] and down.machine == C.HOLDING and len(down.user_text) == 1000
    assert kinds(down.on_input({"action": "stop"}, 0.0)) == ["input_result"] and down.machine == C.IDLE
    assert kinds(down.on_pipeline(True)) == []  # the dropped utterance is not sent later


# -- what the microphone hears while the avatar speaks ([turn] echo_guard, backchannels) --------

BACKCHANNELS = {"backchannels": True, "backchannel_wait": 0.8}
ECHO_GUARD = {"echo_guard": True, "echo_similarity": 0.75}


def answering(tc: TurnController, sentence: str = "今日は晴れていて、気持ちがいいですね。", now: float = 0.0) -> int:
    """A turn whose answer's first sentence plays; returns the turn."""
    say(tc, "天気は？", now)
    speak(tc, sentence, now)
    return tc.turn


def hear(tc: TurnController, text: str, start: float, stop: float):
    """A voice: RECOG_EVENT_START at ``start`` (must change nothing), its words at ``stop``."""
    assert tc.on_line("RECOG_EVENT_START", [], 0.0, start) == []
    assert tc.machine == C.HEARING
    return tc.on_line("RECOG_EVENT_STOP", [text], 0.0, stop)


@pytest.mark.parametrize("guards", [BACKCHANNELS, ECHO_GUARD, {**BACKCHANNELS, **ECHO_GUARD}])
def test_a_backchannel_or_its_own_voice_interrupts_nothing_other_words_do_at_once(guards):
    tc = controller(**guards)
    turn = answering(tc, now=1.0)
    heard = "うん" if guards.get("backchannels") else "今日は晴れてて気持ちがいいですね"
    assert hear(tc, heard, 1.5, 2.2) == []
    assert tc.machine == C.ANSWERING and tc.accepts("SYNTH_START", turn)
    actions = hear(tc, "ちょっと待って", 2.5, 3.1)
    assert kinds(actions) == ["SYNTH_STOP", "cancel", "turn_start"]
    assert actions[1].body["reason"] == "interrupted" and actions[2].body["text"] == "ちょっと待って"
    assert sum(tc.dropped.values()) == 1


def test_backchannels_a_voice_longer_than_the_wait_interrupts_when_it_ends():
    tc = controller(**BACKCHANNELS)
    answering(tc, now=1.0)
    tc.on_line("RECOG_EVENT_START", [], 0.0, 2.0)
    assert tc.next_deadline() == pytest.approx(2.8)
    assert tc.on_tick(2.79) == []
    assert kinds(tc.on_tick(2.8)) == ["SYNTH_STOP", "cancel"] and tc.machine == C.LISTENING
    actions = tc.on_line("RECOG_EVENT_STOP", ["ちょっと待ってください"], 0.0, 3.3)
    assert kinds(actions) == ["turn_start"]


def test_backchannels_one_that_came_too_late_is_an_utterance_and_says_to_raise_the_wait(caplog):
    tc = controller(**BACKCHANNELS)
    answering(tc, now=1.0)
    tc.on_line("RECOG_EVENT_START", [], 0.0, 2.0)
    tc.on_tick(2.8)
    assert kinds(tc.on_line("RECOG_EVENT_STOP", ["うん"], 0.0, 3.0)) == ["turn_start"]
    assert "raise it" in caplog.text


def test_echo_guard_no_wait_the_words_decide_and_a_voice_without_words_was_a_noise():
    tc = controller(**ECHO_GUARD)
    turn = answering(tc, now=1.0)
    tc.on_line("RECOG_EVENT_START", [], 0.0, 1.1)   # the loudspeaker: as long as the sentence
    assert tc.next_deadline() == pytest.approx(1.1 + 5.0)  # listen_timeout, not backchannel_wait
    assert tc.on_tick(3.0) == [] and tc.machine == C.HEARING
    assert tc.on_tick(6.1) == [] and tc.machine == C.ANSWERING and tc.accepts("SYNTH_START", turn)


def test_echo_guard_drops_its_own_voice_after_the_answer_and_not_the_user_saying_it_again():
    tc = controller(**ECHO_GUARD)
    turn = answering(tc, "駅は右に曲がってすぐです。", now=1.0)
    tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0, 3.0)
    tc.on_spoken(turn, now=3.0)
    assert tc.on_line("RECOG_EVENT_STOP", ["駅は右に曲がってすぐです"], 0.0, 3.2) == []  # no start: in the grace
    assert tc.on_line("RECOG_EVENT_START", [], 0.0, 3.3) == [] and tc.machine == C.LISTENING
    assert tc.on_line("RECOG_EVENT_STOP", ["駅は右にまがってすぐです"], 0.0, 4.2) == []  # began with the sound
    assert tc.machine == C.IDLE and tc.dropped["echo"] == 2
    tc.on_line("RECOG_EVENT_START", [], 0.0, 4.5)  # 1.5 s after the sound: the user repeats it
    assert kinds(tc.on_line("RECOG_EVENT_STOP", ["駅は右に曲がってすぐですか"], 0.0, 5.5)) == ["turn_start"]


def test_a_backchannel_after_the_answer_is_an_utterance():
    tc = controller(**BACKCHANNELS)
    turn = answering(tc, "明日も来てくれますか。", now=1.0)
    tc.on_line("RECOG_EVENT_START", [], 0.0, 2.0)
    tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0, 2.1)
    tc.on_spoken(turn, now=2.1)
    assert tc.machine == C.LISTENING  # the voice goes on: listened to
    assert kinds(tc.on_line("RECOG_EVENT_STOP", ["はい"], 0.0, 2.4)) == ["turn_start"]
    tc.on_spoken(tc.turn, now=3.0)
    assert kinds(say(tc, "うん", now=4.0)) == ["turn_start"]  # the avatar is quiet: no backchannel


@pytest.mark.parametrize("guards", [BACKCHANNELS, ECHO_GUARD])
def test_before_anything_is_said_a_voice_interrupts_at_once(guards):
    tc = controller(**guards)
    say(tc, "質問", now=0.0)  # the LLM is still thinking: nothing written yet
    assert kinds(tc.on_line("RECOG_EVENT_START", [], 0.0, 10.0)) == ["cancel"]
    assert tc.machine == C.LISTENING


def test_while_a_voice_is_heard_the_answer_goes_on_and_inputs_and_away_still_work():
    tc = controller(**BACKCHANNELS)
    turn = answering(tc, "一文目です。", now=1.0)
    tc.on_line("RECOG_EVENT_START", [], 0.0, 1.5)
    cue = [("SYNTH_START", ["0", "mei_voice_normal", "二文目です。"])]
    assert tc.on_speech(cue, turn, after=0) == []               # held as a cue, as while answering
    assert kinds(tc.on_line("SYNTH_EVENT_STOP", ["0"], 0.0, 1.6)) == ["SYNTH_START"]
    speak(tc, "二文目です。", now=1.6)
    busy = tc.on_input({"action": "say", "text": "お知らせ", "when": "idle", "id": "i"}, 0.0)
    assert busy[-1].body["reason"] == "busy"
    stop = tc.on_input({"action": "stop", "id": "s"}, 0.0)
    assert kinds(stop)[:2] == ["SYNTH_STOP", "cancel"] and tc.machine == C.IDLE
    answering(tc, now=3.0)
    tc.on_line("RECOG_EVENT_START", [], 0.0, 3.5)
    assert kinds(tc.on_line("RECOG_EVENT_AWAY", ["ON"], 0.0, 3.6)) == ["SYNTH_STOP", "cancel"]
    assert tc.machine == C.AWAY
