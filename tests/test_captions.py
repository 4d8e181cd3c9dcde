"""The captions observer: safe CAPTION_* lines with the protocol's exact argument counts, in step
with speech. End to end: real stage processes, the real observer process, the fake MMDAgent-EX
(which, like the real one, shows nothing for a wrong argument count)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import assume, given, settings, strategies as st

from broker import config as config_mod
from stages.commands.avatar_sim import SimulatedMMDAgent
from stages.llm.offline_responder import ChatCompletionServer
from stages.observers.captions import ALIAS, MAX_TEXT_BYTES, USER_ALIAS, caption_text, check
from stages.observers.line_breaks import HANG, NO_END, NO_START, width
from tests.e2e import Observer, ScriptedLLM, launched
from tests.harness import write_config

HOSTILE = ('Hello | world, this is "quoted"\nEXECUTE|calc.exe\r\nand\ttabs\x07 here. '
           + "とても長い文です" * 375)  # 3,000 characters after the first sentence


def unquoted(arg: str) -> str:
    return arg[1:-1] if arg.startswith('"') and arg.endswith('"') else arg


@pytest.mark.parametrize("text", [HOSTILE, "a|b|c", "line one\nline two", "  spaced   out  ", "x" * 3000,
                                  "日本語" * 1000, "\\n\\", ""])
def test_caption_text_is_one_safe_argument(text):
    out = caption_text(text, 20, 3)
    assert "|" not in out and "\r" not in out and "\n" not in out
    assert not any(ord(c) < 32 or ord(c) == 127 for c in out)
    assert len(out.encode("utf-8")) <= MAX_TEXT_BYTES + 2
    inner = unquoted(out)
    assert '"' not in inner                                  # only the wrapping quotes
    assert (" " in inner) == (out != inner)                  # quoted exactly when it has a space
    assert len(inner.split("\\n")) <= 3                      # at most max_lines lines


def test_caption_wrapping_and_cut():
    assert caption_text("こんにちは。", 20, 3) == "こんにちは。"
    assert caption_text("あ" * 45, 20, 3) == "あ" * 20 + "\\n" + "あ" * 20 + "\\n" + "あ" * 5
    assert caption_text("あ" * 70, 20, 3).endswith("…")
    assert caption_text("Let's take a walk, shall we?", 8, 3) == '"Let\'s take a\\nwalk, shall we?"'
    assert caption_text("a|b", 20, 3) == "a｜b"


def test_captions_wrap_by_the_japanese_line_breaking_rules():
    # as a real MMDAgent-EX showed them: "…あります" / "。" and "…気分で" / "す。"
    assert caption_text("円周率は3.14で、財布には1,000円あります。", 20, 3) == "円周率は3.14で、財布には1,000円あります。"
    assert caption_text("みんなに心からありがとうと言いたい気分です。", 20, 3) == "みんなに心からありがとうと言いたい気分です。"
    # inside the text: a closing mark or small kana hangs on its line (two characters at most) ...
    assert caption_text("円周率は3.14で、財布には1,000円あります。本当です。", 20, 3) == \
        "円周率は3.14で、財布には1,000円あります。\\n本当です。"
    assert caption_text("あ" * 19 + "ちょっと待ってね。", 20, 3) == "あ" * 19 + "ちょっ\\nと待ってね。"
    # ... else the characters before it go down with it; an opening bracket goes down too
    assert caption_text("あ" * 19 + "い」」」と言った。", 20, 3) == "あ" * 19 + "\\nい」」」と言った。"
    assert caption_text("あ" * 19 + "「いい」と言った。", 20, 3) == "あ" * 19 + "\\n「いい」と言った。"
    # numbers and words stay whole; a line breaks next to a full-width character or at a space
    assert caption_text("あ" * 18 + "3.14159です。そうです。", 20, 3) == "あ" * 18 + "\\n3.14159です。そうです。"
    assert caption_text("x" * 45, 20, 3) == "x" * 40 + "\\n" + "x" * 5      # no break allowed: cut at the width


def lines_of(out: str) -> list[str]:
    return unquoted(out).split("\\n") if out else []


CORE = "あいうえおかきくけこ日本語字幕円周率財布気分今山川漢字アイウエオカキクケコ"   # may start and end a line
CLOSING = sorted(NO_START - set(".,:;!?)]}"))           # the full-width ones: the half-width end a word
OPENING = sorted(NO_END - set("([{"))


def _joined(units: list[tuple[str, str, str]]) -> str:
    text = ""
    for opening, core, closing in units:
        space = " " if text and width(text[-1]) == 1 and width((opening or core)[0]) == 1 else ""
        text += space + opening + core + closing
    return text


WORD = st.builds(str.__add__, st.text("abcXYZ019", min_size=1, max_size=5), st.sampled_from(["", ".14", ",000", "%"]))
# Text whose every line can break by the rules: units of an optional opening bracket, a
# character or a short Latin word, then at most two closing marks or small kana; a space
# between two half-width neighbours.
JAPANESE = st.lists(st.tuples(st.sampled_from([""] * 6 + OPENING),
                              st.sampled_from(CORE) | WORD,
                              st.text(st.sampled_from(CLOSING), max_size=2)),
                    min_size=8, max_size=60).map(_joined)


@settings(max_examples=400, deadline=None)
@given(JAPANESE, st.integers(7, 30), st.integers(1, 6))
def test_no_line_starts_or_ends_with_what_the_rules_forbid(text, line_chars, max_lines):
    lines = lines_of(caption_text(text, line_chars, max_lines))
    assert 1 <= len(lines) <= max_lines
    for line in lines:
        assert line and line[0] not in NO_START and line[-1] not in NO_END, lines
        assert line == line.strip()
        assert sum(width(c) for c in line) <= line_chars * 2 + HANG, lines
    if not lines[-1].endswith("…"):       # the whole text: nothing lost, only spaces at the breaks
        assert "".join(lines).replace(" ", "") == text.replace(" ", "")


@settings(max_examples=400, deadline=None)
@given(st.text(st.characters(codec="utf-8"), max_size=300) | JAPANESE, st.integers(1, 40), st.integers(1, 6))
def test_wrapping_any_text_keeps_every_guarantee(text, line_chars, max_lines):
    out = caption_text(text, line_chars, max_lines)
    assert "|" not in out and not any(ord(c) < 32 or ord(c) == 127 for c in out)
    assert len(out.encode("utf-8")) <= MAX_TEXT_BYTES + 2
    inner = unquoted(out)
    assert '"' not in inner and (" " in inner) == (out != inner)
    lines = lines_of(out)
    assert len(lines) <= max_lines
    assert all(sum(width(c) for c in line) <= max(2, line_chars * 2) + HANG for line in lines)
    assume(lines and not out.endswith(("…", '…"')))
    # the text is all there, in order, only spaces dropped
    cleaned = "".join(c for c in unquoted(caption_text(text, 10_000, 1)) if c != " ")
    assert "".join(lines).replace(" ", "") == cleaned


def test_bad_caption_settings_are_refused_at_start():
    cfg = config_mod.load(Path("/dev/null"))["captions"]
    check(cfg)
    for key, value in (("color", "1,1,1"), ("edge", "red"), ("position", "TOP"), ("height", 1.5), ("style", "a|b")):
        with pytest.raises(config_mod.ConfigError, match=key):
            check(dict(cfg, **{key: value}))


def test_fake_mmdagent_shows_captions_only_with_the_exact_argument_counts(tmp_path):
    script = tmp_path / "script.py"
    lines = ["CAPTION_SETSTYLE|s|default",                                 # 2 arguments: nothing
             "CAPTION_START|a|s|text|3|CENTER|0.1|30",                     # style s unknown yet: nothing
             "CAPTION_SETSTYLE|s|default|1,1,1,1",                         # 3: event
             "CAPTION_START|a|s|te|xt|3|CENTER|0.1|30",                    # a | in the text, 8: nothing
             "CAPTION_START|a|s|text|3|CENTER|0.1",                        # 6: nothing
             "CAPTION_SETSTYLE|t|default|1,1,1,1|4,0,0,0,1|0,0,0,0,0|0,0,0,0",  # 6: event
             "CAPTION_START|b|t|\"two words\"|3|CENTER|0.1|3",             # 7: shown, gone after 3 frames
             "CAPTION_START|c|_default|kept|3|CENTER|0.1|3000",            # 7: shown until stopped
             "CAPTION_STOP|c"]
    script.write_text("import sys, time\n" + "".join(f"print({line!r}, flush=True)\n" for line in lines)
                      + "time.sleep(30)\n", encoding="utf-8")
    import sys
    with SimulatedMMDAgent(f"{sys.executable} {script}", mdf_dir=tmp_path) as avatar:
        assert avatar.wait_inbox_line("CAPTION_EVENT_STOP|c", 10)
        assert avatar.wait_inbox_line("CAPTION_EVENT_STOP|b", 10)
        events = [r.line for r in avatar.inbox if r.line.startswith("CAPTION_EVENT_")]
        avatar.kill()
    assert events == ["CAPTION_EVENT_SETSTYLE|s", "CAPTION_EVENT_SETSTYLE|t", "CAPTION_EVENT_START|b",
                      "CAPTION_EVENT_START|c", "CAPTION_EVENT_STOP|b", "CAPTION_EVENT_STOP|c"] or events == [
                      "CAPTION_EVENT_SETSTYLE|s", "CAPTION_EVENT_SETSTYLE|t", "CAPTION_EVENT_START|b",
                      "CAPTION_EVENT_START|c", "CAPTION_EVENT_STOP|c", "CAPTION_EVENT_STOP|b"]


def test_captions_follow_speech_with_safe_lines(tmp_path):
    llm = ScriptedLLM(default=HOSTILE[:400])
    server = ChatCompletionServer(llm).start()
    try:
        with launched(tmp_path, server=server, avatar_kwargs={"min_speech": 0.4, "start_delay": 0.1}) as world:
            with Observer(world, "captions"):
                turn = world.talk("字幕 | を\tお願い")
                avatar = world.avatar
                # the observer lags the speech: wait until the caption of every sentence has gone off
                assert avatar.wait_inbox(lambda got: not avatar.captions.get(ALIAS) and sum(
                    r.line == f"CAPTION_EVENT_STOP|{ALIAS}" for r in got) >= len(turn.spoken), 10)
                printed = [r.line for r in avatar.received if r.line.startswith("CAPTION_")]
                inbox = [r.line for r in avatar.inbox]
    finally:
        server.stop()
    assert len(turn.spoken) >= 3
    setstyle = [line.split("|") for line in printed if line.startswith("CAPTION_SETSTYLE|")]
    starts = [line.split("|") for line in printed if line.startswith("CAPTION_START|")]
    assert setstyle and all(len(parts) - 1 == 6 for parts in setstyle)
    assert starts and all(len(parts) - 1 == 7 for parts in starts)            # exactly 7 arguments each
    mine = [parts for parts in starts if parts[1] == ALIAS]
    user = [parts for parts in starts if parts[1] == USER_ALIAS]
    assert len(mine) == len(turn.spoken)                                      # one caption per sentence
    assert user and unquoted(user[0][3]) == '"字幕 ｜ を お願い"'[1:-1]
    for parts, sentence in zip(mine, turn.spoken):
        shown = unquoted(parts[3]).replace("\\n", "").replace(" ", "")
        expected = caption_text(sentence, 20, 3)
        same = sentence.replace('"', "”").replace("|", "｜").replace(" ", "")
        assert parts[3] == expected and same.startswith(shown.rstrip("…"))
    # every caption was accepted (an event for each), and went on and off with its sentence: the
    # observer reacts to the speech, so (however loaded the machine) a caption comes on after its
    # sentence started and goes off after it ended, and before the next caption comes on; how
    # late it comes after the speech is not asserted (see stages.observers.captions)
    assert inbox.count(f"CAPTION_EVENT_START|{ALIAS}") == len(mine)
    assert len([line for line in printed if line.startswith("CAPTION_SETSTYLE|")]) == 1   # one bridge, styled once
    at = {kind: [i for i, line in enumerate(inbox) if line == kind or line.startswith(f"{kind}|")]
          for kind in ("SYNTH_EVENT_START|0", "SYNTH_EVENT_STOP|0", f"CAPTION_START|{ALIAS}", f"CAPTION_STOP|{ALIAS}")}
    said_on, said_off, on, off = at.values()
    assert len(said_on) == len(said_off) == len(on) == len(off) == len(mine), at
    for i in range(len(mine)):
        assert said_on[i] < on[i] < off[i] and said_off[i] < off[i], (i, inbox)
        assert i + 1 == len(mine) or off[i] < on[i + 1], (i, inbox)


def test_an_old_event_is_not_captioned(tmp_path):
    """A stopped-then-resumed observer does not show a sentence that is long over."""
    cfg = config_mod.load(write_config(tmp_path))
    from broker import wire
    from stages.observers.captions import Captions

    sent = []
    cap = Captions.__new__(Captions)   # the decision only: no sockets
    cap.c, cap.speech, cap.styled, cap.showing = cfg["captions"], cfg["speech"], True, None
    cap._send = lambda t, a, turn=0: sent.append((t, a))
    old = wire.Sender("sequencer").make("speech", {"model": "0", "index": 0, "text": "古い", "state": "started"})
    old.ts = time.time() - 10
    cap.on_event(old)
    assert sent == []
    fresh = wire.Sender("sequencer").make("speech", {"model": "0", "index": 1, "text": "新しい", "state": "started"})
    cap.on_event(fresh)
    assert [t for t, _ in sent] == ["CAPTION_START"]


def test_a_caption_is_forgotten_only_with_a_new_bridge(tmp_path):
    """The bridge's first heartbeat may come after the first caption (it beats once a second):
    that caption still gets its CAPTION_STOP, and the style is not sent again; a silent bridge
    that is back is the same MMDAgent-EX. A restarted bridge may be a new MMDAgent-EX: styled anew."""
    cfg = config_mod.load(write_config(tmp_path))
    from broker import wire
    from stages.observers.captions import Captions

    sent = []
    cap = Captions.__new__(Captions)   # the decision only: no sockets
    cap.c, cap.speech, cap.styled, cap.showing = cfg["captions"], cfg["speech"], False, None
    cap._send = lambda t, a, turn=0: sent.append(t)
    say = wire.Sender("sequencer")

    def speech(index: int, state: str) -> None:
        cap.on_event(say.make("speech", {"model": "0", "index": index, "text": "文", "state": state}, turn=1))

    speech(0, "started")
    cap.on_peer("bridge", "up")
    speech(0, "finished")
    speech(1, "started")
    cap.on_peer("bridge", "back")
    speech(1, "finished")
    assert sent == ["CAPTION_SETSTYLE", "CAPTION_START", "CAPTION_STOP", "CAPTION_START", "CAPTION_STOP"]
    sent.clear()
    speech(2, "started")
    cap.on_peer("bridge", "restarted")
    speech(2, "finished")   # the new MMDAgent-EX shows nothing of ours: nothing to stop
    speech(3, "started")
    assert sent == ["CAPTION_START", "CAPTION_SETSTYLE", "CAPTION_START"]
