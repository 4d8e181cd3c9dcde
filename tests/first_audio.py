"""What the user hears in one turn, from the records of the fake MMDAgent-EX and the LLM server.

:func:`measure` is a pure function of one turn's records:

- ``inbox``: what the simulated MMDAgent-EX wrote to the plugin, with times: the turn's
  ``RECOG_EVENT_STOP`` (the utterance) and the synthesizer's ``SYNTH_EVENT_START`` /
  ``SYNTH_EVENT_STOP`` after it;
- ``received``: the lines the plugin wrote, with the time the simulator read them: its
  ``SYNTH_START|model|voice|text`` commands;
- ``sent``: the server's record of the answer, ``(time sent, token text)`` in order;
- ``answer``: the whole answer (the tokens joined).

and returns a :class:`Heard`. Times are ``time.monotonic()`` of one machine; every figure is in
seconds.

**Silence while text was waiting.** For each sentence after the first, the user hears nothing
from the previous sentence's ``SYNTH_EVENT_STOP`` (``t_stop``) to the next ``SYNTH_START``'s
arrival (``t_next``). Only the part of it during which a speakable clause was already there
counts: the term is ``max(0, t_next - max(t_stop, t_ready))``, where ``t_ready`` is when the
server sent the character that completed the first clause of that next sentence (its text up to
and including its first ``、，,。！？!?…``, or the whole text if none). It is counted to the
``SYNTH_START``'s arrival, not to its ``SYNTH_EVENT_START``: the synthesizer's own delay after
it is the same whoever sends the command, and not ours to cut.

**Finding a sentence in the answer.** Spoken text differs from the answer (the pipeline drops
markup and spacing at cuts; the seed's script strips every token), so sentences are matched on
their letters and digits (Unicode categories L* and N*) only, in order, with a cursor: a repeated
phrase is found at its own place. A sentence stands where its letters first stand whole after
the one before; failing that (text dropped inside it, e.g. a URL), each letter at the first
place after the one before. A sentence whose letters are not, in order, in the rest of the
answer raises :class:`LocateError`; letters of the answer that no sentence spoke are counted
in :attr:`Heard.text_lost`.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Sequence

from stages.commands.avatar_sim import Received

#: what ends a clause: the first of these in a sentence ends its first clause
CLAUSE_MARKS = frozenset("、，,。！？!?…")


class LocateError(ValueError):
    """A spoken sentence that cannot be placed in the answer."""


@dataclass(frozen=True)
class Heard:
    """One turn as the user heard it (seconds)."""
    first_synth: float              # first SYNTH_START received - the utterance
    first_sound: float              # first SYNTH_EVENT_START - the utterance
    synth_after_first_token: float  # first SYNTH_START received - first content token sent
    after_first_token: float        # first SYNTH_EVENT_START - first content token sent
    synth_after_clause: float       # first SYNTH_START received - its first clause's last character sent
    waiting_silence: float          # sum over the gaps between sentences (see the module's docstring)
    max_gap_waiting: float          # the largest single term of that sum (0 with one sentence)
    segments: int                   # SYNTH_STARTs of the turn
    said: float                     # first SYNTH_EVENT_START to last SYNTH_EVENT_STOP
    text_lost: int                  # letters and digits of the answer that no sentence spoke


def is_letter(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LN"


def letters(text: str) -> str:
    """The letters and digits of ``text``, what sentences are matched on."""
    return "".join(ch for ch in text if is_letter(ch))


def first_clause(text: str) -> str:
    """``text`` up to and including its first clause mark, or all of it if it has none."""
    end = next((i for i, ch in enumerate(text) if ch in CLAUSE_MARKS), len(text) - 1)
    return text[:end + 1]


def _completed(answer: str, last: int, floor: int, marked: bool) -> int:
    """The index in ``answer`` of the character that completes a piece whose last letter is at
    ``last`` (-1: it has none): that letter, or with ``marked`` the clause mark the answer has
    after it (at ``floor`` or later, before any further letter)."""
    if not marked:
        return last
    j = max(last + 1, floor)
    while j < len(answer) and not is_letter(answer[j]) and answer[j] not in CLAUSE_MARKS:
        j += 1
    return j if j < len(answer) and answer[j] in CLAUSE_MARKS else last


def _place(own: str, text: str, cursor: int) -> list[int] | None:
    """Where the letters ``own`` are in ``text`` at ``cursor`` or later: where they first stand
    whole; else each at the first place after the one before (the speaker dropped text inside the
    sentence, e.g. a URL); None if they are not there in order."""
    at = text.find(own, cursor)
    if at >= 0:
        return list(range(at, at + len(own)))
    out, i = [], cursor
    for ch in own:
        i = text.find(ch, i)
        if i < 0:
            return None
        out.append(i)
        i += 1
    return out


def clause_ends(sentences: Sequence[str], answer: str) -> tuple[list[int], int]:
    """For each sentence, the index in ``answer`` of the character that completed its first
    clause; and how many letters of ``answer`` no sentence spoke. Raises :class:`LocateError`."""
    where = [i for i, ch in enumerate(answer) if is_letter(ch)]
    text = letters(answer)
    cursor, floor, lost, ends = 0, 0, 0, []  # floor: the answer's characters before it were spoken
    for n, sentence in enumerate(sentences):
        own = letters(sentence)
        if not own and not CLAUSE_MARKS & set(sentence):
            raise LocateError(f"sentence {n + 1} {sentence!r} has neither a letter nor a mark to place it by")
        placed = _place(own, text, cursor)
        if placed is None:
            raise LocateError(f"sentence {n + 1} {sentence!r} is not in the answer after letter {cursor} "
                              f"(answer: {answer!r})")
        placed = [cursor - 1] + placed  # a sentence of marks alone stands after the letter before it
        clause = first_clause(sentence)
        last = placed[sum(1 for ch in clause if is_letter(ch))]  # the clause's last letter, in ``text``
        end = _completed(answer, where[last] if last >= 0 else -1, floor, clause[-1] in CLAUSE_MARKS)
        if end < 0:
            raise LocateError(f"sentence {n + 1} {sentence!r}: its mark is not in the answer")
        ends.append(end)
        last = placed[-1]
        floor = _completed(answer, where[last] if last >= 0 else -1, floor, sentence.rstrip()[-1] in CLAUSE_MARKS) + 1
        lost += last + 1 - cursor - len(own)
        cursor = last + 1
    return ends, lost + len(text) - cursor


def sent_at(sent: Sequence[tuple[float, str]], index: int) -> float:
    """When the server sent the character at ``index`` of the answer."""
    done = 0
    for at, text in sent:
        done += len(text)
        if done > index:
            return at
    raise ValueError(f"character {index} of the answer was never sent ({done} were)")


def measure(inbox: Sequence[Received], received: Sequence[Received], sent: Sequence[tuple[float, str]],
            answer: str) -> Heard:
    """One turn's :class:`Heard`. ``inbox`` and ``received`` hold the turn's lines (from before its
    ``RECOG_EVENT_STOP``, nothing of the next turn). Raises ValueError for a record that is not a
    complete turn (no utterance, no token, no sound, a sentence without its end) and
    :class:`LocateError` for a sentence not in the answer."""
    if "".join(text for _, text in sent) != answer:
        raise ValueError("the tokens sent do not make the answer")
    utterance = next((r.t for r in inbox if r.line.startswith("RECOG_EVENT_STOP|")), None)
    if utterance is None:
        raise ValueError("no RECOG_EVENT_STOP in the turn's inbox")
    first_token = next((at for at, text in sent if text), None)
    if first_token is None:
        raise ValueError("the server sent no content token")
    after = [r for r in inbox if r.t >= utterance]
    sounds = [r.t for r in after if r.line.startswith("SYNTH_EVENT_START|")]
    stops = [r.t for r in after if r.line.startswith("SYNTH_EVENT_STOP|")]
    starts = [(r.t, r.line.split("|", 3)[3] if r.line.count("|") >= 3 else "")
              for r in received if r.line.startswith("SYNTH_START|")]
    if not starts or not sounds:
        raise ValueError("nothing was spoken")
    if len(stops) < len(starts):
        raise ValueError(f"{len(starts)} sentences were started but {len(stops)} ended")
    ends, lost = clause_ends([text for _, text in starts], answer)
    # one SYNTH_EVENT_STOP per SYNTH_START, in order: stop i ends sentence i, then sentence i+1 comes
    terms = [max(0.0, t_next - max(t_stop, sent_at(sent, end)))
             for t_stop, (t_next, _), end in zip(stops, starts[1:], ends[1:])]
    return Heard(first_synth=starts[0][0] - utterance, first_sound=sounds[0] - utterance,
                 synth_after_first_token=starts[0][0] - first_token, after_first_token=sounds[0] - first_token,
                 synth_after_clause=starts[0][0] - sent_at(sent, ends[0]),
                 waiting_silence=sum(terms), max_gap_waiting=max(terms, default=0.0), segments=len(starts),
                 said=stops[len(starts) - 1] - sounds[0], text_lost=lost)
