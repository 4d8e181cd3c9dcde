"""Which of the waiting pieces the avatar gets next, and when: the avatar one step ahead.

:mod:`stages.segmenter.sentences` says where speech *may* pause (:class:`Piece`: a clause or a
sentence's end); this module decides which waiting pieces go out together as one segment, from
what is known at that moment: the pieces, whether the answer has had a segment yet, whether it
is over, and how long the avatar has still to speak (:class:`SpeakingClock`). :func:`release` is
a pure function of those, so its tests are as exact as the cutter's.

- **First clause at once.** An answer's first segment is its first piece alone (``はい、``,
  ``Well,``, or its first sentence when that has no pause): the avatar starts talking as soon as
  the LLM has said something that can be said.
- **Whole sentences while the avatar talks.** A sentence goes out once it is complete, its pieces
  joined (Open JTalk reads a whole sentence with better prosody), up to ``merge_chars``
  characters: a longer one goes in parts, each ending at the first clause once it has that many.
- **Never silent while a clause waits.** The clauses of an unfinished sentence wait only while
  the avatar has more than :data:`LEAD` seconds of speech left (by an estimate that errs short);
  then the complete ones go out
  together, so the next segment is at MMDAgent-EX (the sequencer's cue) when the current one
  ends. If the estimate was long, the sequencer's ``finished`` event frees them just the same.
- **The end of the answer** (``final``): everything waiting is complete and goes out as above.

Why no token-rate forecast: MMDAgent-EX cannot be given the next sentence before the current one
ends (a ``SYNTH_START`` cuts it off), so the only choice is what to hand over at that moment; a
sentence that completes a little later would cost the user silence for better prosody, and a
complete clause never waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from stages.segmenter.sentences import Piece, letters

#: seconds of speech left at which waiting clauses go out: covers the hops to the bridge's cue
#: (a few ms) and how late the speech events reach us (a frame of MMDAgent-EX: 8-16 ms, 100 ms
#: and more while it renders a 3D model on a busy machine)
LEAD = 0.3
#: the estimate errs short: a clause handed over a little early costs some prosody, one handed
#: over late costs silence. Open JTalk's time per character varies by about a quarter from one
#: sentence to the next (measured on the real app: 0.11-0.19 s for mei_voice_normal)
CAUTION = 0.85
#: seconds per character before anything was learned: a little faster than Open JTalk's normal
#: voice (about 0.12-0.15), so an early guess errs towards handing clauses over early
DEFAULT_RATE = 0.1
_LEARN = 0.3  # weight of the newest measurement in the learned rate


def join(pieces: Sequence[Piece]) -> str:
    """The pieces' text as written: a space where there was whitespace, none between CJK."""
    out = ""
    for piece in pieces:
        out += (" " if out and piece.spaced else "") + piece.text
    return out


def next_segment(waiting: Sequence[Piece], merge_chars: int, max_bytes: int) -> tuple[int, bool]:
    """How many waiting pieces make the next segment, and whether it is complete (its sentence
    ended, or it reached ``merge_chars``). A piece with tags opens a sentence: never merged."""
    n, text = 0, ""
    for piece in waiting:
        longer = text + (" " if text and piece.spaced else "") + piece.text
        if n and (len(text) >= merge_chars or len(longer.encode("utf-8")) > max_bytes or piece.tags):
            return n, True
        n, text = n + 1, longer
        if piece.ends:
            return n, True
    return n, n > 0 and len(text) >= merge_chars


def release(waiting: Sequence[Piece], *, first: bool, final: bool, free_in: float,
            merge_chars: int, max_bytes: int) -> int:
    """How many of the waiting pieces (oldest first) go out now as one segment; 0: wait.
    ``free_in``: seconds until the avatar has said everything sent (0 when it is silent)."""
    if not waiting:
        return 0
    if first:
        return 1
    n, complete = next_segment(waiting, merge_chars, max_bytes)
    return n if complete or final or free_in <= LEAD + 1e-6 else 0  # (a deadline computed as free_at - LEAD)


def unheard(piece: Piece, heard: int) -> tuple[Piece | None, int]:
    """What of ``piece`` is left to say when the user heard ``heard`` letters before it, and the
    letters still to skip after it. Heard segments were whole pieces, so a piece is either heard
    or not; should a cut have moved (the settings changed), its unheard end is said."""
    n = len(letters(piece.text))
    if n <= heard:
        return None, heard - n
    seen = 0
    for i, ch in enumerate(piece.text):
        if letters(ch):
            if seen == heard:
                return Piece(piece.text[i:], piece.ends, piece.spaced, piece.tags), 0
            seen += 1
    return None, 0


@dataclass
class _Said:
    chars: int
    sent: float
    voice: str = ""
    started: float | None = None


class SpeakingClock:
    """How long the avatar has still to speak the segments handed over, from the sequencer's
    ``speech`` events (``started``, ``finished``, and every way a segment ends), with the voice's
    rate learned from them: seconds per character of each ``finished`` speech, per voice, a
    moving average. A segment not started yet is expected to start when the one before it ends
    (or now, when it was sent after that), so the estimate always has an end even if events are
    lost."""

    def __init__(self, rate: float = DEFAULT_RATE) -> None:
        self.default_rate = rate
        self.rates: dict[str, float] = {}  # voice alias -> seconds per character, learned
        self._said: dict[int, _Said] = {}   # segments of the current turn not ended, by index

    def reset(self) -> None:
        """A new turn: nothing of the old one is waited for (its speech ends on its own)."""
        self._said.clear()

    def sent(self, index: int, chars: int, now: float) -> None:
        self._said[index] = _Said(chars, now)

    def speech(self, index: int, state: str, at: float, voice: str = "") -> None:
        said = self._said.get(index)
        if said is None:
            return
        said.voice = voice or said.voice
        if state == "started":
            said.started = at
        elif state in ("finished", "timeout", "dropped", "interrupted", "stopped"):
            del self._said[index]
            if state == "finished" and said.started is not None and said.chars:
                per_char = min(1.0, max(0.01, (at - said.started) / said.chars))
                old = self.rates.get(said.voice, self._fallback())
                self.rates[said.voice] = old + _LEARN * (per_char - old)

    def _fallback(self) -> float:
        return sum(self.rates.values()) / len(self.rates) if self.rates else self.default_rate

    def duration(self, chars: int, voice: str = "") -> float:
        """How long ``chars`` characters take to say, erring short (:data:`CAUTION`)."""
        return CAUTION * chars * self.rates.get(voice, self._fallback())

    def free_at(self) -> float | None:
        """When the avatar is expected to have said everything handed over; None: nothing is."""
        end = None
        for index in sorted(self._said):
            said = self._said[index]
            start = said.started if said.started is not None else max(said.sent, end or said.sent)
            end = start + self.duration(said.chars, said.voice)
        return end

    def free_in(self, now: float) -> float:
        end = self.free_at()
        return 0.0 if end is None else max(0.0, end - now)
