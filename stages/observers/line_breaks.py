"""Where a caption's lines break: the Japanese line-breaking rules (kinsoku, JIS X 4051 and
UAX #14 in spirit), with Latin words kept whole.

:func:`wrap` fills each line up to its width, then breaks where the rules allow:

- never before a character of :data:`NO_START` (closing brackets and quotes, 。、，．・：；, ！？,
  ー, …‥, small kana, iteration marks) and never after one of :data:`NO_END` (opening
  brackets and quotes);
- never inside a run of half-width characters (a word, ``3.14``, ``1,000``): only at a space or
  next to a full-width character; never before a combining mark;
- closing marks that would start the next line are pushed back onto this one (at most
  :data:`HANG` wider than the width); where that is not enough the break moves back, pulling
  the characters before them down;
- the end of the text stays on the line before when it fits there within :data:`HANG`, so a
  line is never just ``。`` or ``す。``;
- where the rules allow no break at all (one long word, a run of closing marks as wide as the
  line), the line is cut at its width.

Widths are in half-width units: a full-width character (East Asian Wide or Fullwidth) counts 2.
"""

from __future__ import annotations

import unicodedata

# not at the start of a line: closing brackets and quotes, punctuation, prolonged sound and
# iteration marks, small kana (JIS X 4051 classes 2-7 and 11; UAX #14 CL, CP, EX, IS, NS, CJ)
NO_START = frozenset(
    "」』）】〕〉》〙〗〟｠”’»›］｝)]}"
    "。、，．・：；！？!?,.:;"
    "ー…‥々ゝゞヽヾ〻"
    "ぁぃぅぇぉっゃゅょゎゕゖァィゥェォッャュョヮヵヶㇰㇱㇲㇳㇴㇵㇶㇷㇸㇹㇺㇻㇼㇽㇾㇿｧｨｩｪｫｯｬｭｮｰ")
# not at the end of a line: opening brackets and quotes (JIS X 4051 class 1; UAX #14 OP)
NO_END = frozenset("「『（【〔〈《〘〖〝｟“‘«‹［｛([{")
HANG = 4  # how much wider than its width a line may be: two full-width characters


def width(ch: str) -> int:
    """2 for a full-width character, else 1."""
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def may_break(text: str, at: int) -> bool:
    """Whether a line may end just before ``text[at]`` (a space there or before it is dropped)."""
    last, first = at - 1, at
    while last >= 0 and text[last] == " ":
        last -= 1
    while first < len(text) and text[first] == " ":
        first += 1
    if last < 0 or first >= len(text):
        return False
    before, after = text[last], text[first]
    if after in NO_START or before in NO_END or unicodedata.category(after).startswith("M"):
        return False
    return first > last + 1 or width(before) == 2 or width(after) == 2  # a space, or a full-width side


def wrap(text: str, line_width: int) -> list[str]:
    """``text`` (single spaces, no line breaks) as lines of at most ``line_width`` half-width
    units, or up to :data:`HANG` more where marks hang or the text's end stays (see the module)."""
    lines: list[str] = []
    pos = 0
    while pos < len(text):
        end = max(_fill(text, pos, line_width), pos + 1)
        limit = _fill(text, pos, line_width + HANG)
        cut = len(text) if limit == len(text) else _break(text, pos, end, limit)
        lines.append(text[pos:cut].strip())
        pos = cut
        while pos < len(text) and text[pos] == " ":
            pos += 1
    return [line for line in lines if line]


def _fill(text: str, pos: int, units: int) -> int:
    """The end of the longest ``text[pos:end]`` at most ``units`` wide."""
    used, end = 0, pos
    while end < len(text) and used + width(text[end]) <= units:
        used += width(text[end])
        end += 1
    return end


def _break(text: str, pos: int, end: int, limit: int) -> int:
    if may_break(text, end):
        return end
    hang = end
    while hang < limit and text[hang] in NO_START:  # push the closing marks back onto this line
        hang += 1
        if may_break(text, hang):
            return hang
    for cut in range(end - 1, pos, -1):  # else pull the last characters down
        if may_break(text, cut):
            return cut
    return end
