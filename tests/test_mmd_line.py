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


def _by_readline(stream: bytes, limit: int) -> list[bytes | int]:
    """What a reader doing ``readline(limit)``, then skipping to the end of a cut line, gets."""
    import io
    f, out = io.BytesIO(stream), []
    while chunk := f.readline(limit):
        out.append(chunk)
        if not chunk.endswith(b"\n"):
            skipped = 0
            while (more := f.readline(limit)) and (skipped := skipped + len(more)) and not more.endswith(b"\n"):
                pass
            if more.endswith(b"\n"):
                out.append(skipped)
    return out


@settings(max_examples=300)
@given(st.lists(st.sampled_from([b"SYNTH_EVENT_STOP|0\n", b"x" * 7, b"\n", b"ab\r\n", b"\xe3\x81\x82", b"y" * 20]),
                max_size=30), st.lists(st.integers(1, 40), max_size=40))
def test_line_splitter_cuts_as_readline_does_whatever_the_pipe_delivers(parts, sizes):
    stream, limit = b"".join(parts), 16
    splitter, got, at = mmd_line.LineSplitter(limit), [], 0
    for size in sizes + [len(stream)]:
        got += splitter.feed(stream[at:at + size])
        at += size
    got += splitter.end()
    assert got == _by_readline(stream, limit)


def test_line_splitter_examples():
    s = mmd_line.LineSplitter(8)
    assert s.feed(b"ab\ncd") == [b"ab\n"]
    assert s.feed(b"\n") == [b"cd\n"]
    assert s.feed(b"0123456789") == [b"01234567"]        # cut at the limit
    assert s.feed(b"abc\nok\n") == [6, b"ok\n"]            # its rest, "89abc\n", skipped and counted
    assert s.end() == []
    s.feed(b"tail")
    assert s.end() == [b"tail"]                            # the last line had no newline
