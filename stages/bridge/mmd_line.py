"""MMDAgent-EX's line protocol: ``TYPE|ARG1|ARG2...``, one message per line, UTF-8.

MMDAgent-EX has no escaping: a ``|`` inside an argument splits it, and a newline ends the
message and turns the rest into a *new command* of MMDAgent-EX's own set (``EXECUTE|...``,
``MODEL_DELETE|...``). So :func:`format_line` is the only way our text reaches stdout, and it
cleans every field, whatever the caller did before.
"""

from __future__ import annotations

import unicodedata

#: MMDAgent-EX splits lines at 2048 bytes (MMDAGENT_MAXBUFLEN); we keep a margin.
MAX_LINE_BYTES = 2000

# `|` would cut the field; the full-width bar reads the same and is harmless.
_REPLACE = {"|": "｜"}
# Separators that some readers treat as line ends; spoken text loses nothing by a space.
_SPACE_LIKE = {"\u2028", "\u2029", "\u0085", "\t", "\r", "\n", "\v", "\f"}


def clean_field(text: str) -> str:
    """``text`` made safe as one field: no ``|``, no CR/LF, no control or format-breaking chars."""
    out = []
    for ch in text:
        if ch in _REPLACE:
            out.append(_REPLACE[ch])
        elif ch in _SPACE_LIKE:
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cs"):
            continue  # other controls (NUL, ESC...) and lone surrogates carry no speech
        else:
            out.append(ch)
    return "".join(out)


def truncate_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` that is at most ``max_bytes`` in UTF-8."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", errors="ignore")


def format_line(msg_type: str, args: list[str] | tuple[str, ...] = ()) -> bytes:
    """One safe line (with ``\\n``) for MMDAgent-EX. Over :data:`MAX_LINE_BYTES`, the last field is cut."""
    fields = [clean_field(msg_type)] + [clean_field(str(a)) for a in args]
    line = "|".join(fields)
    data = line.encode("utf-8")
    if len(data) > MAX_LINE_BYTES:
        head = "|".join(fields[:-1]) + "|" if len(fields) > 1 else ""
        room = MAX_LINE_BYTES - len(head.encode("utf-8"))
        line = head + truncate_utf8(fields[-1], max(room, 0))
        data = truncate_utf8(line, MAX_LINE_BYTES).encode("utf-8")
    return data + b"\n"


def parse_line(line: str) -> tuple[str, list[str]]:
    """``"TYPE|a|b"`` -> ``("TYPE", ["a", "b"])``. Never fails: anything is a message of some type."""
    msg_type, *args = line.split("|")
    return msg_type, args


class LineSplitter:
    """MMDAgent-EX's byte stream, as it comes from a pipe, cut into lines.

    :meth:`feed` returns the lines ``data`` completed, each with its ``b"\\n"``, and at most
    ``limit`` bytes: a longer one is returned cut at ``limit`` (no ``b"\\n"``) and the rest of it
    is skipped; once that rest has ended, its length (with the ``b"\\n"``) follows as an ``int``.
    The same cuts as ``readline(limit)`` followed by reading to the end of the line.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = b""
        self.skipping: int | None = None  # bytes of a cut line's rest skipped so far

    def feed(self, data: bytes) -> list[bytes | int]:
        out: list[bytes | int] = []
        buf = self.buf + data
        while buf:
            if self.skipping is not None:
                end = buf.find(b"\n")
                if end < 0:
                    self.skipping += len(buf)
                    buf = b""
                    break
                out.append(self.skipping + end + 1)
                buf, self.skipping = buf[end + 1:], None
                continue
            end = buf.find(b"\n", 0, self.limit)
            if end >= 0:
                out.append(buf[:end + 1])
                buf = buf[end + 1:]
            elif len(buf) >= self.limit:
                out.append(buf[:self.limit])
                buf, self.skipping = buf[self.limit:], 0
            else:
                break
        self.buf = buf
        return out

    def end(self) -> list[bytes]:
        """At the end of input: the last line, if it had no ``b"\\n"``."""
        rest, self.buf = self.buf, b""
        return [rest] if rest and self.skipping is None else []
