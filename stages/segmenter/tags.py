"""Expression tags in the token stream: ``[happy]こんにちは！`` (see :mod:`stages.expression`).

:class:`TagReader` takes tags out of the text wherever the token boundaries fall (``[ha`` +
``ppy]`` is one tag), holding back only from a ``[`` until it is decided:

- ``[name]``, ``name`` an ASCII letter then letters, digits or ``_`` (at most 32; case is
  ignored; full-width ``［］`` too): a tag. Known (in the vocabulary), unknown, it is never text.
- ``[`` + such a name followed by anything but ``]`` (``[happy こんにちは``), or cut off by the
  end of the answer: a malformed tag, also never text.
- Any other bracket (``[1]``, ``[注]``, ``[]``, a name over 32 characters): text, as written.

:class:`TaggedCutter` puts the reader in front of :class:`stages.segmenter.sentences.SentenceCutter`:
a tag opens a new sentence (text held before it is released as a sentence of its own) and
belongs to the sentence that follows it (:attr:`Piece.tags` of its first piece). The pieces, and
their tags, are the same for any split of the answer into tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from stages.segmenter.sentences import Piece, SentenceCutter

OPEN, CLOSE = "[［", "]］"
MAX_NAME = 32


def _name_char(ch: str, first: bool) -> bool:
    return ch.isascii() and (ch.isalpha() or (not first and (ch.isdigit() or ch == "_")))


@dataclass(frozen=True)
class Tag:
    name: str   # lower case; for a malformed tag, what was written after its "["
    kind: str   # "known", "unknown" or "malformed"


class TagReader:
    def __init__(self, known: frozenset[str] | set[str]) -> None:
        self.known = frozenset(known)
        self._held: str | None = None  # "[" + name so far, while undecided

    def feed(self, text: str) -> list[str | Tag]:
        """Text to speak and tags, in stream order."""
        if self._held is None and not any(c in text for c in OPEN):
            return [text] if text else []
        out: list[str | Tag] = []
        plain = []
        for ch in text:
            held = self._held
            if held is None:
                if ch in OPEN:
                    self._held = ch
                else:
                    plain.append(ch)
                continue
            name = held[1:]
            if ch in CLOSE and name and _name_char(name[0], True):
                self._flush(plain, out)
                lower = name.lower()
                out.append(Tag(lower, "known" if lower in self.known else "unknown"))
                self._held = None
            elif _name_char(ch, not name) and len(name) < MAX_NAME:
                self._held = held + ch
            elif name and _name_char(name[0], True) and len(name) < MAX_NAME:
                self._flush(plain, out)
                out.append(Tag(name.lower(), "malformed"))  # "[happy" then something else
                self._held = ch if ch in OPEN else None
                if ch not in OPEN:
                    plain.append(ch)
            else:  # not a tag at all: the bracket and what followed are text
                plain.append(held)
                self._held = ch if ch in OPEN else None
                if ch not in OPEN:
                    plain.append(ch)
        self._flush(plain, out)
        return out

    def end(self) -> list[str | Tag]:
        """The answer is over: what is still held."""
        held, self._held = self._held, None
        if held is None:
            return []
        name = held[1:]
        return [Tag(name.lower(), "malformed")] if name and _name_char(name[0], True) else [held]

    @staticmethod
    def _flush(plain: list[str], out: list[str | Tag]) -> None:
        if plain:
            out.append("".join(plain))
            plain.clear()


def strip_tags(text: str) -> str:
    """``text`` without its tags (any name, known or not, and malformed ones): what was said."""
    reader = TagReader(frozenset())
    return "".join(p for p in reader.feed(text) + reader.end() if isinstance(p, str))


@dataclass
class TaggedCutter:
    """Pieces with the names of their known tags; tags it could not use in :attr:`ignored`."""
    cutter: SentenceCutter
    reader: TagReader
    pending: list[str] = field(default_factory=list)   # known tags for the next segment
    ignored: list[Tag] = field(default_factory=list)   # unknown and malformed, for the caller to log

    def feed(self, text: str) -> list[Piece]:
        return self._take(self.reader.feed(text))

    def flush(self) -> list[Piece]:
        return self._take(self.reader.end()) + self._tagged(self.cutter.flush())

    def ripe(self) -> list[Piece]:
        return self._tagged(self.cutter.ripe())

    def has_pending(self) -> bool:
        return self.cutter.has_pending()

    def _take(self, pieces: list[str | Tag]) -> list[Piece]:
        out: list[Piece] = []
        for piece in pieces:
            if isinstance(piece, str):
                out += self._tagged(self.cutter.feed(piece))
            elif piece.kind == "known":
                out += self._tagged(self.cutter.flush())  # a tag opens a sentence: what came before is one
                self.pending.append(piece.name)
            else:
                self.ignored.append(piece)
        return out

    def _tagged(self, pieces: list[Piece]) -> list[Piece]:
        out = []
        for piece in pieces:
            out.append(replace(piece, tags=tuple(self.pending)) if self.pending else piece)
            self.pending = []
        return out
