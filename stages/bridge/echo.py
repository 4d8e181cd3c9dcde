"""What the microphone heard while the avatar spoke: its own voice, or a backchannel.

Pure matching, no decision: turn control (:mod:`stages.bridge.turns`) asks, and decides.

- :func:`normalize`: what of a text counts when two are compared: NFKC, case folded, katakana
  as hiragana (a recognizer may write ウン for うん), only letters and digits (a recognizer's
  punctuation and spaces are its own, not the speaker's).
- :class:`EchoGuard` keeps the segments the avatar said lately (each ``SYNTH_START`` of its
  model, with the time it began and ended) and tells how much a recognition result looks like
  what it could have heard (:meth:`EchoGuard.match`): an echo begins with the avatar's sound, so
  for a voice whose ``RECOG_EVENT_START`` came at ``t``, the segments audible at ``t`` less
  :data:`ONSET_LAG` or later; for a result with no start, those audible within ``grace`` before
  it (the recognizer's result follows the end of the sound). The score is the best of
  - the result against each segment, and against all of them joined in order (a recognizer that
    did not cut between two sentences hears them as one utterance), by
    :class:`difflib.SequenceMatcher` ratio (``2 * matching / (len a + len b)``): a whole sentence
    heard with a few wrong characters scores high;
  - for a result of at least :data:`MIN_PARTIAL` characters that is shorter than such a text:
    the ratio against the stretch of that text it lines up with (a sentence cut off by
    ``SYNTH_STOP``, or a recognizer that cut inside one, is a part of what was said).
  - for a shorter result: the ratio against the beginning of each segment, as long as the
    result: a sentence cut off at once (the user interrupted it) is heard as its first letter or
    first few.
  So a short result matches a whole segment or a beginning, nothing else: ``はい`` is not an echo
  of every sentence with は and い in it, only of ``はい、`` or of one that begins with はい.
- :class:`Backchannels`: a result that is, normalized, one of the configured words or a run of
  them (``うんうん``, ``はいはい``, ``ok ok``).
"""

from __future__ import annotations

import unicodedata
from collections import deque
from dataclasses import dataclass
from difflib import SequenceMatcher

MIN_PARTIAL = 6      # letters a result needs to match a part of what was said (a clause, not a word)
ONSET_LAG = 0.5      # seconds a recognizer may take to signal a voice (RECOG_EVENT_START) after its first sound
KEEP = 20            # segments remembered (an answer is rarely longer; older ones are long over)
MAX_JOINED = 2000    # characters of the joined text compared (keeps one match well under a millisecond)
MAX_BACKCHANNEL = 24  # characters of a result looked at as a run of backchannels


def normalize(text: str) -> str:
    """The letters and digits of ``text``, NFKC, case folded, katakana as hiragana."""
    out = []
    for ch in unicodedata.normalize("NFKC", text).casefold():
        if unicodedata.category(ch)[0] not in "LN":
            continue
        if "\u30a1" <= ch <= "\u30f6":  # katakana ァ..ヶ -> hiragana ぁ..ゖ
            ch = chr(ord(ch) - 0x60)
        out.append(ch)
    return "".join(out)


def ratio(a: str, b: str) -> float:
    if not a or not b:
        return 0.0
    return SequenceMatcher(None, a, b, autojunk=False).ratio()


def partial_ratio(short: str, long: str) -> float:
    """The ratio of ``short`` against the stretch of ``long`` it lines up with best."""
    if len(short) >= len(long):
        return ratio(short, long)
    best = 0.0
    blocks = SequenceMatcher(None, short, long, autojunk=False).get_matching_blocks()
    for i, j, size in blocks:
        if not size:
            continue
        start = max(0, min(j - i, len(long) - len(short)))
        best = max(best, ratio(short, long[start:start + len(short)]))
        if best == 1.0:
            break
    return best


@dataclass
class Said:
    text: str             # normalized
    shown: str            # as written, for the log
    began: float          # monotonic time the SYNTH_START was written (or read)
    ended: float | None = None  # when it stopped being audible; None: still is


class EchoGuard:
    """The avatar's recent segments and how much a recognition result looks like them."""

    def __init__(self, grace: float) -> None:
        self.grace = grace  # a segment counts for results heard until this long after it ended
        self.said: deque[Said] = deque(maxlen=KEEP)

    def speak(self, text: str, now: float) -> None:
        """A segment began (a later one cuts off one still playing)."""
        norm = normalize(text)
        if self.said and self.said[-1].ended is None:
            if self.said[-1].text == norm and now - self.said[-1].began < 1.0:
                return  # the same line twice: ours, and MMDAgent-EX's copy of it
            self.said[-1].ended = now
        if norm:
            self.said.append(Said(norm, text, now))

    def quiet(self, now: float) -> None:
        """The avatar stopped speaking."""
        if self.said and self.said[-1].ended is None:
            self.said[-1].ended = now

    def recent(self, since: float) -> list[Said]:
        """Segments audible at some moment from ``since`` on, oldest first."""
        return [s for s in self.said if s.ended is None or s.ended >= since]

    def match(self, text: str, began: float | None, now: float) -> tuple[float, str]:
        """How much ``text`` looks like what the avatar said: a score in 0..1 and the segment it
        looks most like. ``began``: when its voice began (``RECOG_EVENT_START``), None if unknown."""
        heard = normalize(text)
        segments = self.recent(now - self.grace if began is None else began - ONSET_LAG)
        if not heard or not segments:
            return 0.0, ""
        best, like = 0.0, ""
        joined = "".join(s.text for s in segments)[-MAX_JOINED:]
        for candidate, shown in [(s.text, s.shown) for s in segments] + [(joined, "")]:
            score = ratio(heard, candidate)
            if len(heard) >= MIN_PARTIAL and len(heard) < len(candidate):
                score = max(score, partial_ratio(heard, candidate))
            elif len(heard) < len(candidate) and shown:
                score = max(score, ratio(heard, candidate[:len(heard)]))
            if score > best:
                best, like = score, shown or segments[-1].shown
            if best == 1.0:
                break
        return best, like


class Backchannels:
    """A short acknowledgement (``うん``, ``mhm``) among ``words``, or a run of them."""

    def __init__(self, words: list[str]) -> None:
        self.words = frozenset(w for w in (normalize(w) for w in words) if w)
        self.longest = max((len(w) for w in self.words), default=0)

    def __contains__(self, text: str) -> bool:
        heard = normalize(text)
        if not heard or len(heard) > MAX_BACKCHANNEL or not self.words:
            return False
        # can heard[:i] be cut into words? (a few characters: the table is tiny)
        ends = [True] + [False] * len(heard)
        for i in range(1, len(heard) + 1):
            ends[i] = any(ends[i - n] and heard[i - n:i] in self.words for n in range(1, min(i, self.longest) + 1))
        return ends[-1]
