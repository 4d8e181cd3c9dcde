"""Cutting an LLM token stream into speakable segments, Japanese and English.

Two steps, both streaming, both deciding only from text already received, so the result is the
same for any split of the answer into tokens (the property tests check exactly that):

1. :class:`SpeechFilter` keeps what must not be read aloud out of the text: fenced code blocks,
   markdown markers (``**``, ``__``, ``~~``, backticks, ``#`` headings, list bullets, ``>``
   quotes, link brackets), URLs and emoji. A marker can arrive in pieces (``*`` then ``*``), so
   the filter holds back the trailing run of ASCII symbols/letters, an open code fence and a
   line whose start is not decided yet, and releases them once the next character shows what
   they are.
2. :class:`SentenceCutter` cuts the filtered text into :class:`Piece` s, each a clause or the
   end of a sentence. Which pieces go out together as one segment, when, is not decided here
   (:mod:`stages.segmenter.pacing`): a cut here is only where speech *may* pause.

   - ``。｡！？!?`` with no bracket or quote open end the sentence at once (:data:`CERTAIN_ENDS`):
     nothing that follows can change that cut, so it does not wait for the next token (a mark or
     closing bracket that follows is not spoken and is dropped with the next piece's start).
   - Other end marks (``．…‥``, and any inside an open bracket or quote), with newline: a run of
     them is one end (``……``), closing marks right after stay with the sentence
     (``」』）】〕〉》”’"')]``); the cut waits for the next character, and does not happen when that
     is the quoting particle ``と``/``って`` after a closing mark (``「晴れるよ。」と言った。`` is
     one sentence).
   - ASCII ``.`` ends a sentence only before whitespace, a non-ASCII character or the end, and
     not after a known abbreviation (``Mr.``) or an initial; so ``3.14``, ``Node.js``,
     ``example.com`` and e-mail addresses are never cut.
   - ``、，,`` end a clause (a breath group) when what stands before them since the last cut is
     one: an opening (:data:`OPENINGS`: ``はい``, ``うーん``, ``そうですね``, ``Well``, a
     greeting...), a Japanese phrase ending in hiragana (a particle or a verb form: ``晴れていて、``;
     a bare noun, ``東京、大阪``, is a list, not a pause), three or more English words, or
     anything of ``soft_cut_chars`` characters or more. Never between digits (``1,000``), never
     inside an open bracket or quote.
   - No piece is over ``max_bytes`` UTF-8 bytes: a longer run is cut at its last space, or
     else at a character that is not inside a number.
   - Whitespace at a cut is dropped (:attr:`Piece.spaced` says it was there, so pieces joined
     again read as written); no spaces are added between CJK characters. Pieces with no letter
     or digit (``！``, ``」``) are dropped.

Nothing else is lost or duplicated: the letters and digits of the pieces, in order, are those
of :func:`speakable` applied to the whole answer. The pieces depend only on the text, never on
how it was split into tokens, with one deliberate exception: :meth:`SentenceCutter.ripe`, called
when the stream pauses, releases a finished sentence without waiting for the next character.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

END_MARKS = frozenset("。．｡！？!?…‥\n")
CLOSERS = frozenset("」』）】〕〉》”’\"')]")
SOFT_MARKS = frozenset("、，,")
#: never spoken at the start of a segment: dropped there (``はい！、それで`` -> ``はい！`` + ``それで``)
LEADING_JUNK = SOFT_MARKS | frozenset("。｡！？!?…‥:;：；・」』）】〕〉》”’)]")
QUOTING_PARTICLES = ("と", "って")
#: end marks after which, with no bracket or quote open, the sentence is over whatever comes
#: next: cut at once instead of waiting for the next token (``.`` still waits: ``3.14``)
CERTAIN_ENDS = frozenset("。｡！？!?")
_PAIRS = ("「」", "『』", "（）", "【】", "〔〕", "〈〉", "《》", "“”", "()", "[]")
#: what may open an answer and be said on its own before a comma: interjections, short answers,
#: greetings and sentence adverbs (most Japanese ones end in hiragana and need no entry here)
OPENINGS = frozenset({
    "はい", "いいえ", "ええ", "うん", "うーん", "ううん", "ええと", "えーと", "えっと", "あの", "あのー", "まあ",
    "そうですね", "そうですねえ", "なるほど", "もちろん", "確かに", "実は", "実際", "最近", "一方", "以上", "結論",
    "今日", "本日", "現在", "正直", "例えば", "ところで", "さて", "では", "じゃあ", "まず", "次に", "最後に", "ただ",
    "でも", "しかし", "また", "ちなみに", "こんにちは", "こんばんは", "おはようございます", "ありがとうございます",
    "すみません", "ごめんなさい", "いらっしゃいませ", "お疲れさまです", "お疲れ様です",
    "well", "yes", "yeah", "no", "sure", "ok", "okay", "oh", "ah", "hmm", "um", "hi", "hello", "hey", "so",
    "actually", "of course", "right", "indeed", "thanks", "thank you", "first", "now", "however", "well then",
})
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "no", "fig", "approx",
                           "inc", "ltd", "co", "e.g", "i.e", "cf", "p.s", "a.m", "p.m"})

_FENCE = "```"
_URL = re.compile(r"(?:https?|ftp)://[\x21-\x7e]*[\w/#=~-]|www\.[\w-]+(?:\.[\w-]+)+[\w/#=~.-]*[\w/#=~-]", re.ASCII)
_LINE_MARKER = re.compile(r"^[ \t]*(?:#{1,6}[ \t]*|>[ \t]*|[-*+][ \t]+|(\d{1,3})[.)][ \t]+)")
# what a line may start with while it is still unknown whether it is a markdown marker
_LINE_UNDECIDED = re.compile(r"[ \t]*(?:#{1,6}|>|[-*+]|\d{1,3}[.)]?)?[ \t]*")
# (no "!["): a "!" is never part of a marker, so "Great!" can be released before "[" might come
_INLINE = re.compile(r"\*+|`+|~~+|__+|[\[\]•]")
_EMPTY_PARENS = re.compile(r"\(\)")
_HELD_RUN = re.compile(r"[\x21-\x7e]+\Z")
# a held run that is a plain word ending in ? or ! can be no marker, URL or number: released
_PLAIN_END = re.compile(r"[A-Za-z0-9'-]*[?!]+")


def _is_emoji(ch: str) -> bool:
    cp = ord(ch)
    return (0x1F000 <= cp <= 0x1FAFF or 0x2600 <= cp <= 0x27BF or 0x2B00 <= cp <= 0x2BFF
            or cp in (0x200D, 0x20E3, 0xFE0E, 0xFE0F) or 0xE0020 <= cp <= 0xE007F)


def _filter_complete(text: str, line_start: bool) -> str:
    """Filter text in which no marker is cut off (see :class:`SpeechFilter`)."""
    # Line markers first, on the lines as written: a fence removed later must not turn what
    # followed it into the start of a line (the streaming filter decides on raw lines too).
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if i or line_start:
            lines[i] = _LINE_MARKER.sub(lambda m: (m.group(1) + " ") if m.group(1) else "", line, count=1)
    text = "\n".join(lines)
    parts = text.split(_FENCE)
    # Odd parts are inside fences (an unclosed fence drops the rest). A block leaves a space, so
    # what stood before and after it never runs together into one word or URL.
    text = " ".join(parts[0::2])
    text = _URL.sub("", text)
    text = _INLINE.sub("", text)
    text = _EMPTY_PARENS.sub("", text)
    return "".join(ch for ch in text if not _is_emoji(ch))


def speakable(text: str) -> str:
    """What of a whole answer may be spoken: code, markdown markers, URLs and emoji removed."""
    return _filter_complete(text, line_start=True)


class SpeechFilter:
    """Streaming :func:`speakable`: ``feed`` returns what is decided so far, ``flush`` the rest."""

    def __init__(self) -> None:
        self._tail = ""
        self._line_start = True

    def feed(self, token: str) -> str:
        self._tail += token
        safe = self._safe_end(self._tail)
        return self._release(safe)

    def flush(self) -> str:
        return self._release(len(self._tail))

    def held(self) -> str:
        """The raw text held back, not yet filtered."""
        return self._tail

    def _release(self, end: int) -> str:
        if end <= 0:
            return ""
        # A held newline stays at the front of the tail, so a chunk never ends with one.
        out = _filter_complete(self._tail[:end], self._line_start)
        self._line_start = self._tail[end - 1] == "\n"
        self._tail = self._tail[end:]
        return out

    def _safe_end(self, tail: str) -> int:
        end = len(tail)
        held = _HELD_RUN.search(tail)
        if held and not _PLAIN_END.fullmatch(held.group()):  # may be the start of a marker, URL or number
            end = held.start()
        # What would be released of the last line may still turn out to be a marker (or its
        # leading blanks): hold the line, from its newline, until its start is decided.
        line = tail.rfind("\n") + 1
        if (line or self._line_start) and line <= end and _LINE_UNDECIDED.fullmatch(tail, line, end):
            end = max(line - 1, 0)
        # Never release half a code block: hold from its opening fence until it closes.
        if tail.count(_FENCE, 0, end) % 2:
            end = tail.rfind(_FENCE, 0, end)
        return end


@dataclass(frozen=True)
class Piece:
    """A clause or a sentence's end, as cut: ``text`` (stripped), ``ends`` (a sentence ends with
    it: nothing that follows belongs with it), ``spaced`` (whitespace stood before it), ``tags``
    (the known expression tags that open it: see :mod:`stages.segmenter.tags`)."""
    text: str
    ends: bool
    spaced: bool = False
    tags: tuple[str, ...] = ()


def letters(text: str) -> str:
    """The letters and digits of ``text``: what is said, whatever the cuts and spacing."""
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LN")


class SentenceCutter:
    """Streaming cutter: ``feed(token)`` returns the pieces completed by it, ``flush()`` the rest."""

    def __init__(self, soft_cut_chars: int = 40, max_bytes: int = 600) -> None:
        if max_bytes < 8:
            raise ValueError("max_bytes must be at least 8")
        self.soft_cut_chars = soft_cut_chars
        self.max_bytes = max_bytes
        self._filter = SpeechFilter()
        self._pending = ""
        self._spaced = False  # whitespace was dropped since the last piece

    def feed(self, token: str) -> list[Piece]:
        self._pending += self._filter.feed(token)
        return self._cut(final=False)

    def flush(self) -> list[Piece]:
        self._pending += self._filter.flush()
        return self._cut(final=True)

    def ripe(self) -> list[Piece]:
        """The stream has paused: a sentence that only waits for the character after its end
        mark is released now (the pause decides it). Otherwise nothing; the cutter goes on."""
        held = self._pending + self._filter.held()
        last = held.rstrip()[-1:]
        if not last or not (last in END_MARKS or last in CLOSERS or last == "."):
            return []
        self._pending += self._filter.flush()
        return self._cut(final=True)

    def has_pending(self) -> bool:
        return bool(self._pending.strip() or self._filter.held().strip())

    def _cut(self, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while True:
            rest = self._pending.lstrip()
            while rest[:1] in LEADING_JUNK and rest:
                rest = rest[1:].lstrip()
            # whitespace dropped before a piece stood between words: kept as a flag
            self._spaced = self._spaced or any(c.isspace() for c in self._pending[:len(self._pending) - len(rest)])
            self._pending = rest
            cut = self._find_cut(rest, final)
            if cut is None:
                break
            end, ends = cut
            text, self._pending = rest[:end].strip(), rest[end:]
            if letters(text):
                out.append(Piece(text, ends, self._spaced))
                self._spaced = False
        return out

    def _find_cut(self, text: str, final: bool) -> tuple[int, bool] | None:
        """Where the first piece of ``text`` ends and whether a sentence ends there, or None while
        that is not decided yet."""
        size = 0
        for i, ch in enumerate(text):
            size += len(ch.encode("utf-8"))
            if size > self.max_bytes:
                return _hard_cut(text, i), True
            if ch == "\n":
                return i, True
            if ch in END_MARKS or ch == ".":
                if ch in CERTAIN_ENDS and not _open_quote(text[:i]):
                    return i + 1, True
                if ch in ".．" and not _period_may_end(text, i):
                    continue
                end = i + 1
                while end < len(text) and (text[end] in END_MARKS or text[end] in CLOSERS or text[end] == "."):
                    if text[end] == "\n":
                        break
                    end += 1
                while len(text[:end].encode("utf-8")) > self.max_bytes:
                    end -= 1  # only closing marks are given up to the cap: they are not spoken
                if end >= len(text):
                    return (end, True) if final else None
                if ch in ".．" and not (text[end].isspace() or not text[end].isascii()):
                    continue
                closed = any(c in CLOSERS for c in text[i:end])
                if closed:
                    rest = text[end:end + 2]
                    if not final and len(rest) < 2 and "って".startswith(rest):
                        return None
                    if rest.startswith(QUOTING_PARTICLES):
                        continue
                return end, True
            if ch in SOFT_MARKS and self._clause_ends(text, i):
                if ch != "、" and text[i - 1:i].isdigit():  # 1,000 is no pause
                    if i + 1 >= len(text):
                        return (i + 1, False) if final else None
                    if text[i + 1].isdigit():
                        continue
                return i + 1, False
        return (len(text), True) if final and text else None

    def _clause_ends(self, text: str, i: int) -> bool:
        """Whether the comma at ``text[i]`` ends a breath group (see the module's rules)."""
        clause = text[:i].strip()
        if not clause or _open_quote(clause):
            return False
        if len(clause) >= self.soft_cut_chars or clause.lower() in OPENINGS:
            return True
        before = clause[-1]
        if not before.isascii():
            return _is_hiragana(before)
        return text[i] == "," and len(clause.split()) >= 3


def _is_hiragana(ch: str) -> bool:
    # a phrase ending in a particle or a verb form (or a drawn-out one: そうねー)
    return "\u3041" <= ch <= "\u309f" or ch == "ー"


def _open_quote(text: str) -> bool:
    """Whether a bracket or quote opened in ``text`` is still open (a closing mark may follow)."""
    return text.count('"') % 2 == 1 or any(text.count(a) > text.count(b) for a, b in _PAIRS)


def _period_may_end(text: str, i: int) -> bool:
    """False for the ``.`` of ``3.14``, ``Mr.`` and initials; the caller checks what follows."""
    before = text[:i]
    if before[-1:].isdigit() and text[i + 1:i + 2].isdigit():
        return False
    if re.fullmatch(r"\s*\d{1,3}", before):  # "2. " opening a list item
        return False
    word = re.search(r"[A-Za-z.]*\Z", before).group()
    if len(word) == 1 and word.isupper():
        return False
    return word.lower() not in ABBREVIATIONS


def _hard_cut(text: str, i: int) -> int:
    """A cut at or before ``i`` (the first character over the byte cap), outside numbers."""
    space = text.rfind(" ", 0, i)
    if space > 0:
        return space
    cut = i
    while cut > 1 and text[cut - 1].isdigit() and text[cut].isdigit():
        cut -= 1
    return cut
