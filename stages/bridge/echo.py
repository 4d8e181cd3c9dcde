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
  - the result against each segment, by :class:`difflib.SequenceMatcher` ratio
    (``2 * matching / (len a + len b)``): a whole sentence heard with a few wrong characters
    scores high;
  - for a result of at least :data:`MIN_PARTIAL` letters: the ratio against the stretch of all
    those segments joined in order that it lines up with (a sentence cut off by ``SYNTH_STOP``
    or cut by the recognizer inside it is a part of one; one that did not cut between two
    sentences hears them as one utterance);
  - for a shorter result: the ratio against the beginning of each segment, as long as the
    result: a sentence cut off at once (the user interrupted it) is heard as its first letter or
    first few.
  So a short result matches a whole segment or a beginning, nothing else: ``はい`` is not an echo
  of every sentence with は and い in it, only of ``はい、`` or of one that begins with はい.
  A ratio that a cheap upper bound shows cannot beat the best so far is not computed, and
  turn control stops looking at the first score that is enough (``[turn] echo_similarity``).
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
MAX_JOINED = 600     # letters of the joined text compared, the latest (about 2 minutes of speech; bounds a match to a few ms)
MAX_WINDOWS = 8      # stretches tried for a part: those around the longest runs in common
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


class Heard:
    """A normalized result, compared with texts of the avatar's (one matcher: the result's index is
    built once). Each ratio is 0.0 where a cheap upper bound says it cannot beat ``floor``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.matcher = SequenceMatcher(None, autojunk=False)
        self.matcher.set_seq2(text)

    def ratio(self, other: str, floor: float = 0.0) -> float:
        if not other or not self.text:
            return 0.0
        self.matcher.set_seq1(other)
        if self.matcher.real_quick_ratio() <= floor or self.matcher.quick_ratio() <= floor:
            return 0.0
        return self.matcher.ratio()

    def partial(self, long: str, floor: float = 0.0) -> tuple[float, int]:
        """The ratio against the stretch of ``long`` (longer than the result) it lines up with
        best, and where that stretch starts."""
        size = len(self.text)
        best, at = 0.0, 0
        blocks = SequenceMatcher(None, self.text, long, autojunk=False).get_matching_blocks()
        for i, j, n in sorted(blocks, key=lambda block: -block[2])[:MAX_WINDOWS]:  # where the longest runs are
            if not n:
                continue
            start = max(0, min(j - i, len(long) - size))
            score = self.ratio(long[start:start + size], max(floor, best))
            if score > best:
                best, at = score, start
                if best == 1.0:
                    break
        return best, at


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

    def match(self, text: str, began: float | None, now: float, enough: float = 1.0) -> tuple[float, str]:
        """How much ``text`` looks like what the avatar said: a score in 0..1 and the segment it
        looks most like. ``began``: when its voice began (``RECOG_EVENT_START``), None if unknown.
        Looking stops at a score of ``enough``."""
        heard = Heard(normalize(text))
        segments = self.recent(now - self.grace if began is None else began - ONSET_LAG)
        if not heard.text or not segments:
            return 0.0, ""
        size = len(heard.text)
        best, like = 0.0, ""
        for said in segments:  # whole segments, and the beginnings of those cut off
            score = heard.ratio(said.text, best)
            if size < MIN_PARTIAL and size < len(said.text):
                score = max(score, heard.ratio(said.text[:size], best))
            if score > best:
                best, like = score, said.shown
            if best >= enough:
                return best, like
        if size < MIN_PARTIAL:
            return best, like
        # a part of the joined text: of one segment (cut inside it) or across two (heard as one)
        texts = [said.text for said in segments]
        joined = "".join(texts)
        skipped = max(0, len(joined) - MAX_JOINED)
        if size >= len(joined) - skipped:  # all of it heard as one utterance
            score = heard.ratio(joined[skipped:], best)
            return (score, segments[-1].shown) if score > best else (best, like)
        score, at = heard.partial(joined[skipped:], best)
        if score > best:
            at += skipped
            for said, part in zip(segments, texts):
                if at < len(part):
                    best, like = score, said.shown
                    break
                at -= len(part)
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
