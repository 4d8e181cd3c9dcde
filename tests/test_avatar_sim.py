"""The simulated MMDAgent-EX against the observed behaviour (/work/shared/mmdagent-ex-protocol.md).

Each test launches a small real script (``bot.py``, written into the .mdf folder) as the plugin
command, waits on conditions with deadlines (never a blind sleep), and kills every process it
started, even when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from difflib import SequenceMatcher
from pathlib import Path

import pytest

from stages.commands.avatar_sim import Received, SimulatedMMDAgent, message_of, split_plugin_command

# The plugin under test: prints READY, then obeys T_* commands and ignores everything else
# (its own output comes back on stdin: it must never print a T_* line itself).
BOT = r'''
import json, os, sys, time
out = sys.stdout.buffer
def emit(data):
    out.write(data)
    out.flush()
emit(b"READY|%d\n" % os.getpid())
for raw in sys.stdin.buffer:
    line = raw.rstrip(b"\n")
    if len(line) >= 2048:
        emit(b"SAW_LONG|%d\n" % len(line))
    kind, _, arg = line.decode("utf-8", "replace").partition("|")
    if kind == "T_RAW":
        emit(json.loads(arg).encode("utf-8"))
    elif kind == "T_LONG":
        emit(b"LONG|" + b"x" * (int(arg) - 5) + b"\n")
    elif kind == "T_CWD":
        emit(("CWD|" + os.getcwd() + "\n").encode("utf-8"))
    elif kind == "T_ENV":
        emit(("ENV|" + os.environ.get(arg, "-") + "\n").encode("utf-8"))
    elif kind == "T_EXIT":
        sys.exit(int(arg))
    elif kind == "T_HANG":
        time.sleep(120)
with open("saw_eof", "w") as f:
    f.write("end of input")
'''

COMMAND = f'"{sys.executable}" -u bot.py'
WAIT = 10.0  # deadline for things that should happen at once; generous for slow CI


@pytest.fixture
def mdf(tmp_path: Path) -> Path:
    folder = tmp_path / "content"
    folder.mkdir()
    (folder / "bot.py").write_text(BOT, encoding="utf-8")
    return folder


@pytest.fixture
def launch(mdf: Path):
    started: list[SimulatedMMDAgent] = []

    def _launch(**kwargs) -> SimulatedMMDAgent:
        kwargs.setdefault("seconds_per_char", 0.01)
        kwargs.setdefault("min_speech", 0.05)
        kwargs.setdefault("start_delay", 0.02)
        kwargs.setdefault("stop_delay", 0.3)
        kwargs.setdefault("cut_delay", 0.4)
        avatar = SimulatedMMDAgent(COMMAND, mdf_dir=mdf, **kwargs)
        started.append(avatar)
        avatar.start()
        assert avatar.wait_line("READY|", WAIT), "the bot did not start"
        return avatar

    try:
        yield _launch
    finally:
        for avatar in started:
            avatar.kill()


def say(avatar: SimulatedMMDAgent, text: str) -> None:
    """Make the bot print ``text`` exactly (newlines included) on its stdout."""
    avatar.send("T_RAW|" + json.dumps(text))


def inbox_index(avatar: SimulatedMMDAgent, line: str, after: int = 0) -> int:
    """Index in the inbox of ``line`` (written to the script), waiting for it."""
    assert avatar.wait_inbox(lambda lines: any(r.line == line for r in lines[after:]), WAIT), f"{line!r} never written"
    return next(i for i, r in enumerate(avatar.inbox) if i >= after and r.line == line)


def lines_between(avatar: SimulatedMMDAgent, start: int, end: int) -> list[str]:
    return [r.line for r in avatar.inbox[start + 1:end]]


def mark(avatar: SimulatedMMDAgent, name: str, after: int = 0) -> int:
    """Put a marker on the queue and return its inbox index: everything queued before is written."""
    avatar.send(f"MARK|{name}")
    return inbox_index(avatar, f"MARK|{name}", after)


def speech_events(lines: list[Received], model: str = "0") -> list[str]:
    keep = ("SYNTH_", "LIPSYNC_")
    return [r.line.split("|")[0] for r in lines
            if r.line.startswith(keep) and r.line.split("|")[1:2] == [model]]


# -- argv rules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command, argv", [
    ("mmdagent-llm bridge", ["mmdagent-llm", "bridge"]),
    ("  python3   -u  bot.py  ", ["python3", "-u", "bot.py"]),
    ('"/opt/my apps/python3" -u \'my bot.py\'', ["/opt/my apps/python3", "-u", "my bot.py"]),
    ('a"b c"', ['a"b', 'c"']),                  # a quote only opens an argument
    ('"ab"cd', ["ab", "cd"]),                   # ...and the closing quote ends it
    ('"unclosed arg', ["unclosed arg"]),
    ('x "" y', ["x", "", "y"]),
    ("echo $HOME *.py a\\ b > out; |x", ["echo", "$HOME", "*.py", "a\\", "b", ">", "out;", "|x"]),
    ("a\tb", ["a\tb"]),                          # only spaces split
])
def test_split_plugin_command(command, argv):
    assert split_plugin_command(command) == argv


def test_split_plugin_command_refuses_what_would_overflow():
    assert split_plugin_command("x" * 99) == ["x" * 99]
    for bad in ("x" * 101, "python3 " + "y" * 100, f'"{"z " * 60}"', "あ" * 34, " ".join(["a"] * 100), "", "   "):
        with pytest.raises(ValueError):
            split_plugin_command(bad)
    assert len(split_plugin_command(" ".join(["a"] * 99))) == 99


def test_message_of_follows_the_readers_strtok():
    assert message_of(b"") is None and message_of(b"\r") is None and message_of(b"||") is None
    assert message_of(b"SYNTH_START|0|v|t\r") == "SYNTH_START|0|v|t"
    assert message_of(b"A||B") == "A||B" and message_of(b"TYPE|") == "TYPE"
    assert message_of("CAPTION|\xe3\x81".encode("latin-1")) == "CAPTION|\ufffd"


# -- the process --------------------------------------------------------------------------------

def test_runs_in_the_mdf_folder_with_the_given_environment(launch, mdf):
    avatar = launch(env={**os.environ, "SIM_TEST_VALUE": "dango"})
    avatar.send("T_CWD")
    avatar.send("T_ENV|SIM_TEST_VALUE")
    assert avatar.wait_line("CWD|", WAIT).line == f"CWD|{os.path.realpath(mdf)}"
    assert avatar.wait_line("ENV|", WAIT).line == "ENV|dango"


def test_script_lines_are_echoed_back_and_answered(launch, mdf: Path):
    seen: list[str] = []
    (mdf / "motion").mkdir()
    (mdf / "motion" / "greet.vmd").write_bytes(b"vmd")
    avatar = launch(on_message=seen.append)
    say(avatar, "HELLO|x\nMOTION_ADD|0|greet|motion/greet.vmd|PART|ONCE\n")
    first = inbox_index(avatar, "HELLO|x")
    # the answer is queued when the echo is handled: wait for it, not for a marker sent meanwhile
    end = inbox_index(avatar, "MOTION_EVENT_ADD|0|greet", first) + 1
    assert lines_between(avatar, first, end) == [
        "MOTION_ADD|0|greet|motion/greet.vmd|PART|ONCE", "MOTION_EVENT_ADD|0|greet"]
    assert [r.line for r in avatar.received[1:]] == ["HELLO|x", "MOTION_ADD|0|greet|motion/greet.vmd|PART|ONCE"]
    assert seen == [r.line for r in avatar.inbox]


def test_empty_lines_are_dropped_and_trailing_cr_removed(launch):
    avatar = launch()
    say(avatar, "\n\r\nA|1\r\n\n|\nB|2\nTYPE|\r\n")
    assert avatar.wait_for(lambda lines: len(lines) >= 4, WAIT)
    mark(avatar, "1")
    assert [r.line for r in avatar.received[1:]] == ["A|1", "B|2", "TYPE"]


def test_over_long_lines_both_ways(launch):
    avatar = launch(seconds_per_char=0.00001)
    avatar.send("T_LONG|3000")
    line = "LONG|" + "x" * 2995  # 3000 bytes
    assert avatar.wait_for(lambda lines: len(lines) >= 3, WAIT)
    assert [r.line for r in avatar.received[1:3]] == [line[:2047], line[2047:]]
    # The 2047-byte echo reaches the script without its newline, glued to the next message.
    assert avatar.wait_line("SAW_LONG|", WAIT).line == "SAW_LONG|3000"
    before = len(avatar.received)
    avatar.send("JUNK|" + "y" * 2100)
    avatar.send("NEXT|1")
    assert avatar.wait_line("SAW_LONG|", WAIT, after=before).line == "SAW_LONG|2053"
    # the inbox records a message once its write returned: the script may answer before that
    assert avatar.wait_inbox(lambda got: any(r.line == "NEXT|1" for r in got), WAIT)
    cut = next(i for i, r in enumerate(avatar.inbox) if r.line.startswith("JUNK|"))
    assert [r.line for r in avatar.inbox[cut:cut + 2]] == ["JUNK|" + "y" * 2042, "NEXT|1"]
    # MMDAgent-EX's own plugins still see the whole message.
    avatar.send("SYNTH_START|0|mei_voice_normal|" + "z" * 2100)
    assert avatar.wait_inbox_line("SYNTH_EVENT_STOP|0", WAIT)


# -- speech -------------------------------------------------------------------------------------

def spoken(avatar: SimulatedMMDAgent, text: str) -> tuple[list[str], float]:
    """Have the bot print SYNTH_START for ``text``; the events up to SYNTH_EVENT_STOP and the time between."""
    say(avatar, f"SYNTH_START|0|mei_voice_normal|{text}\n")
    first = inbox_index(avatar, f"SYNTH_START|0|mei_voice_normal|{text}")
    stop = avatar.wait_inbox_line("SYNTH_EVENT_STOP|0", WAIT, after=first)
    assert stop is not None
    start = avatar.wait_inbox_line("SYNTH_EVENT_START|0", WAIT, after=first)
    return speech_events(avatar.inbox[first:avatar.inbox.index(stop) + 1]), stop.t - start.t


def test_synth_start_plays_with_a_duration_from_the_text(launch):
    speech: list[tuple[str, str, bool]] = []
    avatar = launch(on_speech=lambda *args: speech.append(args))
    events, short = spoken(avatar, "あ" * 10)   # 0.1 s
    assert events == ["SYNTH_START", "SYNTH_EVENT_START", "LIPSYNC_START", "LIPSYNC_EVENT_START",
                      "LIPSYNC_EVENT_STOP", "SYNTH_EVENT_STOP"]
    _, long = spoken(avatar, "い" * 80)          # 0.8 s
    assert 0.05 <= short < long - 0.3 and 0.6 <= long < 5
    assert speech == [("0", "あ" * 10, True), ("0", "あ" * 10, False),
                      ("0", "い" * 80, True), ("0", "い" * 80, False)]
    assert avatar.speaking == {}
    lipsync = next(r.line for r in avatar.inbox if r.line.startswith("LIPSYNC_START|0|"))
    assert len(lipsync.split("|")[2].split(",")) % 2 == 0


def synth_delay(avatar: SimulatedMMDAgent, text: str) -> float:
    """From ``SYNTH_START`` of ``text`` written back to the script to its ``SYNTH_EVENT_START``."""
    say(avatar, f"SYNTH_START|0|mei_voice_normal|{text}\n")
    first = inbox_index(avatar, f"SYNTH_START|0|mei_voice_normal|{text}")
    start = avatar.wait_inbox_line("SYNTH_EVENT_START|0", WAIT, after=first)
    assert start is not None and avatar.wait_inbox_line("SYNTH_EVENT_STOP|0", WAIT, after=first)
    return start.t - avatar.inbox[first].t


def test_the_synth_delay_grows_with_the_text(launch):
    # the timer starts once the SYNTH_START was written back: the delays can only come out longer
    avatar = launch(start_delay=0.02, synth_seconds_per_char=0.01)
    short, long = synth_delay(avatar, "はい、"), synth_delay(avatar, "い" * 60)  # 0.05 s, 0.62 s
    assert short >= 0.05 and long >= 0.62 and short < long - 0.3
    fixed = launch(start_delay=0.02)  # the default: no per-character part
    assert synth_delay(fixed, "い" * 60) < 0.3


def test_other_plugins_speech_and_unknown_model_alias(launch):
    avatar = launch()
    avatar.send("SYNTH_START|1|mei_voice_happy|ほかのプラグイン")
    say(avatar, "SYNTH_START|nobody|slt_voice_normal|Hello.\n")
    assert avatar.wait_inbox_line("SYNTH_EVENT_STOP|1", WAIT)
    assert avatar.wait_inbox_line("SYNTH_EVENT_STOP|nobody", WAIT)
    assert speech_events(avatar.inbox, "1") == speech_events(avatar.inbox, "nobody") == [
        "SYNTH_START", "SYNTH_EVENT_START", "LIPSYNC_START", "LIPSYNC_EVENT_START",
        "LIPSYNC_EVENT_STOP", "SYNTH_EVENT_STOP"]


def test_unknown_voice_is_ignored_without_any_event(launch):
    avatar = launch()
    # If the first were accepted, the second would cut it off: LIPSYNC_STOP and a second stop.
    say(avatar, "SYNTH_START|0|mei_voice_typo|こんにちは\nSYNTH_START|0|mei_voice_normal|はい\n")
    first = inbox_index(avatar, "SYNTH_START|0|mei_voice_typo|こんにちは")
    assert avatar.wait_inbox_line("SYNTH_EVENT_STOP|0", WAIT, after=first)
    end = mark(avatar, "1")
    assert speech_events(avatar.inbox[first:end]) == [
        "SYNTH_START", "SYNTH_START", "SYNTH_EVENT_START", "LIPSYNC_START", "LIPSYNC_EVENT_START",
        "LIPSYNC_EVENT_STOP", "SYNTH_EVENT_STOP"]


def test_synth_stop_while_speaking_and_while_not(launch):
    speech: list[tuple[str, str, bool]] = []
    avatar = launch(seconds_per_char=0.05, on_speech=lambda *args: speech.append(args))
    say(avatar, "SYNTH_START|0|mei_voice_normal|" + "長" * 100 + "\n")   # 5 s
    assert avatar.wait_inbox_line("SYNTH_EVENT_START|0", WAIT)
    assert avatar.speaking == {"0": "長" * 100}
    say(avatar, "SYNTH_STOP|0\n")
    first = inbox_index(avatar, "SYNTH_STOP|0")
    stop = avatar.wait_inbox_line("SYNTH_EVENT_STOP|0", WAIT, after=first)
    assert lines_between(avatar, first, avatar.inbox.index(stop)) == ["LIPSYNC_STOP|0", "LIPSYNC_EVENT_STOP|0"]
    assert 0.15 <= stop.t - avatar.inbox[first + 1].t < 3   # stop_delay 0.3 s, not the 5 s of speech
    assert avatar.speaking == {} and speech[-1] == ("0", "長" * 100, False)
    # Not speaking: SYNTH_STOP gives nothing at all.
    avatar.send("SYNTH_STOP|0")
    again = inbox_index(avatar, "SYNTH_STOP|0", first + 1)
    end = mark(avatar, "after-stop", again)
    assert lines_between(avatar, again, end) == []


def test_new_synth_start_cuts_off_with_exactly_one_extra_stop(launch):
    avatar = launch(seconds_per_char=0.05)
    say(avatar, "SYNTH_START|0|mei_voice_normal|" + "長" * 100 + "\n")
    first = inbox_index(avatar, "SYNTH_START|0|mei_voice_normal|" + "長" * 100)
    assert avatar.wait_inbox_line("SYNTH_EVENT_START|0", WAIT, after=first)
    say(avatar, "SYNTH_START|0|mei_voice_normal|はい\n")
    assert avatar.wait_inbox(lambda lines: speech_events(lines[first:]).count("SYNTH_EVENT_STOP") == 2, WAIT)
    end = mark(avatar, "1")
    lines = avatar.inbox[first:end]
    assert [r.line.split("|", 3)[3] for r in lines if r.line.startswith("SYNTH_START|")] == ["長" * 100, "はい"]
    assert speech_events(lines) == [
        "SYNTH_START", "SYNTH_EVENT_START", "LIPSYNC_START", "LIPSYNC_EVENT_START",
        "SYNTH_START", "LIPSYNC_STOP", "LIPSYNC_EVENT_STOP", "SYNTH_EVENT_STOP",   # the old one, cut
        "SYNTH_EVENT_START", "LIPSYNC_START", "LIPSYNC_EVENT_START", "LIPSYNC_EVENT_STOP", "SYNTH_EVENT_STOP"]
    cut = next(r for r in lines if r.line == "LIPSYNC_STOP|0")
    old_stop = next(r for r in lines if r.line == "SYNTH_EVENT_STOP|0")
    assert 0.2 <= old_stop.t - cut.t < 3   # cut_delay 0.4 s


def test_echo_the_recognizer_hears_each_sentence_with_small_errors(launch):
    avatar = launch(seconds_per_char=0.02, echo=True, echo_delay=0.05, echo_tail=0.1, echo_errors=0.15, echo_seed=3)
    whole = "今日は、とても良い天気ですね。"
    say(avatar, f"SYNTH_START|0|mei_voice_normal|{whole}\n")
    first = inbox_index(avatar, f"SYNTH_START|0|mei_voice_normal|{whole}")
    heard = avatar.wait_inbox_line("RECOG_EVENT_STOP|", WAIT, after=first)
    assert heard is not None
    order = [r.line.split("|")[0] for r in avatar.inbox[first:avatar.inbox.index(heard) + 1]
             if r.line.startswith(("SYNTH_EVENT_", "RECOG_EVENT_"))]
    assert order == ["SYNTH_EVENT_START", "RECOG_EVENT_START", "SYNTH_EVENT_STOP", "RECOG_EVENT_STOP"]
    text = heard.line.split("|", 1)[1]
    assert text != whole and "、" not in text and "。" not in text
    assert 0.6 <= SequenceMatcher(None, text, "今日はとても良い天気ですね").ratio() < 1.0
    # cut off by SYNTH_STOP: only what played was heard
    long = "長い文です" * 20  # 2 s
    say(avatar, f"SYNTH_START|0|mei_voice_normal|{long}\n")
    second = inbox_index(avatar, f"SYNTH_START|0|mei_voice_normal|{long}")
    assert avatar.wait_inbox_line("RECOG_EVENT_START", WAIT, after=second)
    say(avatar, "SYNTH_STOP|0\n")
    cut = avatar.wait_inbox_line("RECOG_EVENT_STOP|", WAIT, after=second)
    assert cut is not None and 1 <= len(cut.line.split("|", 1)[1]) < len(long) / 2
    avatar.echo = False  # off again: the recognizer hears nothing
    say(avatar, "SYNTH_START|0|mei_voice_normal|静かです\n")
    third = inbox_index(avatar, "SYNTH_START|0|mei_voice_normal|静かです")
    assert avatar.wait_inbox(lambda lines: any(r.line == "SYNTH_EVENT_START|0" for r in lines[third:]), WAIT)
    started = next(i for i, r in enumerate(avatar.inbox) if i > third and r.line == "SYNTH_EVENT_START|0")
    assert avatar.wait_inbox_line("SYNTH_EVENT_STOP|0", WAIT, after=started)
    avatar.send("TIMER_START|later|0.3")  # past echo_delay and echo_tail: a result would be in by then
    end = inbox_index(avatar, "TIMER_EVENT_STOP|later", started)
    assert not [r for r in avatar.inbox[started:end] if r.line.startswith("RECOG_")]


# -- end of the script --------------------------------------------------------------------------

def test_kill_is_sigkill_and_nothing_restarts(launch, mdf):
    avatar = launch()
    pid = avatar.pid
    started = time.monotonic()
    avatar.kill()
    assert time.monotonic() - started < 5
    if os.name == "posix":
        assert avatar.returncode == -signal.SIGKILL
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (mdf / "saw_eof").exists()   # never saw end of input
    avatar.send("RECOG_EVENT_START")         # MMDAgent-EX is gone: nothing happens
    assert avatar.pid == pid and [r.line for r in avatar.received] == [f"READY|{pid}"]


def test_script_exit_is_noted_not_restarted_and_not_announced(launch):
    spoke = threading.Event()
    avatar = launch(on_speech=lambda model, text, started: started and spoke.set())
    pid = avatar.pid
    avatar.send("T_EXIT|3")
    assert avatar.wait_exit(WAIT) == 3
    assert avatar.wait_inbox_line("T_EXIT|3", WAIT)  # recorded after the write: the script may exit first
    written = len(avatar.inbox)
    avatar.send("RECOG_EVENT_STOP|まだいる？")
    avatar.send("SYNTH_START|0|mei_voice_normal|ひとりごと")   # the rest of MMDAgent-EX goes on
    assert spoke.wait(WAIT)
    assert len(avatar.inbox) == written and avatar.pid == pid
    assert [r.line for r in avatar.received] == [f"READY|{pid}"]


def test_close_stdin_is_end_of_input(launch, mdf):
    avatar = launch()
    avatar.close_stdin()
    assert avatar.wait_exit(WAIT) == 0
    assert (mdf / "saw_eof").read_text() == "end of input"


def test_a_script_that_stops_reading_blocks_the_main_loop_and_kill_still_works(launch):
    avatar = launch()
    avatar.send("T_HANG")
    for i in range(200):   # 300 kB: far more than a pipe holds
        avatar.send(f"FILL|{i}|" + "f" * 1500)
    assert not avatar.wait_inbox(lambda lines: any(r.line.startswith("FILL|199|") for r in lines), 1.0)
    started = time.monotonic()
    avatar.kill()
    assert time.monotonic() - started < 5


def test_motions_follow_the_page_and_the_source(launch, mdf: Path):
    """A missing file: silence. A ONCE motion ends with MOTION_EVENT_DELETE; a playing alias gets
    the new motion swapped in; MOTION_DELETE ends it."""
    (mdf / "m").mkdir()
    for name in ("a.vmd", "b.vmd"):
        (mdf / "m" / name).write_bytes(b"vmd")
    avatar = launch(motion_seconds=0.3)
    say(avatar, "MOTION_ADD|0|g|m/missing.vmd|PART|ONCE\nMOTION_ADD|0|g|m/a.vmd|PART|ONCE\n")
    first = inbox_index(avatar, "MOTION_ADD|0|g|m/missing.vmd|PART|ONCE")
    end = inbox_index(avatar, "MOTION_EVENT_DELETE|0|g", first) + 1
    assert lines_between(avatar, first, end) == ["MOTION_ADD|0|g|m/a.vmd|PART|ONCE", "MOTION_EVENT_ADD|0|g",
                                                 "MOTION_EVENT_DELETE|0|g"]
    say(avatar, "MOTION_ADD|0|g|m/a.vmd|PART|LOOP\nMOTION_ADD|0|g|m/b.vmd|PART|LOOP\n")
    assert avatar.wait_inbox(lambda lines: sum(r.line == "MOTION_EVENT_ADD|0|g" for r in lines) == 3, WAIT)
    assert avatar.motions == {("0", "g"): "m/b.vmd"}      # swapped, still one alias
    at = len(avatar.inbox)
    say(avatar, "MOTION_DELETE|0|g\n")
    assert avatar.wait_inbox(lambda lines: any(r.line == "MOTION_EVENT_DELETE|0|g" for r in lines[at:]), WAIT)
    assert avatar.motions == {}
