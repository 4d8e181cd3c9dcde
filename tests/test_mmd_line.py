"""The only path to MMDAgent-EX's stdin: nothing from the LLM can break out of its field."""

import unicodedata

from hypothesis import given, settings, strategies as st

from stages.bridge import mmd_line


def test_injection_attempt_stays_one_message_of_plain_speech():
    evil = "はい。\nEXECUTE|C:\\Windows\\calc.exe\r\nMODEL_DELETE|0"
    line = mmd_line.format_line("SYNTH_START", ["0", "mei_voice_normal", evil])
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and b"\r" not in line
    msg_type, args = mmd_line.parse_line(line[:-1].decode())
    assert msg_type == "SYNTH_START" and len(args) == 3
    assert args[2] == "はい。 EXECUTE｜C:\\Windows\\calc.exe  MODEL_DELETE｜0"


def test_control_and_separator_characters_are_removed():
    cleaned = mmd_line.clean_field("a\x00b\x1bc\x7fd\u2028e\u0085f\tg")
    assert cleaned == "abcd e f g"


def test_long_lines_are_cut_at_a_character_boundary_under_the_limit():
    line = mmd_line.format_line("SYNTH_START", ["0", "mei_voice_normal", "あ" * 5000])
    assert len(line) - 1 <= mmd_line.MAX_LINE_BYTES
    text = line[:-1].decode("utf-8")  # would raise if a character had been split
    assert text.startswith("SYNTH_START|0|mei_voice_normal|あ")


def test_parse_never_fails():
    assert mmd_line.parse_line("RECOG_EVENT_START") == ("RECOG_EVENT_START", [])
    assert mmd_line.parse_line("|") == ("", [""])


@settings(max_examples=500, deadline=None)
@given(st.text(), st.text())
def test_any_text_gives_one_safe_line(voice, text):
    line = mmd_line.format_line("SYNTH_START", ["0", voice, text])
    assert len(line) <= mmd_line.MAX_LINE_BYTES + 1
    body = line[:-1].decode("utf-8")
    assert body.count("|") == 3
    assert not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in body)
    assert "\u2028" not in body and "\u2029" not in body
