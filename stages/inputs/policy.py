"""Which live-stream comments the avatar answers, and when: the pure logic of ``input comments``.

The comments process (:mod:`stages.inputs.comments`) feeds every comment its sources bring
(:meth:`Policy.offer`), asks for the next one to answer whenever the avatar is free
(:meth:`Policy.take`), and reports what the bridge made of it (:meth:`Policy.answered`,
:meth:`Policy.put_back`). Nothing here reads a clock or a socket: every decision can be tested
alone. ``[comments]`` in ``broker/defaults.toml`` sets it:

- A comment is dropped at once (the reason counted in :attr:`Policy.dropped`) when its viewer is
  in ``ignore_names`` (name or id, any case: bots), it holds a word of ``ignore_words`` (any
  case, full and half width alike), it has no letter or digit (emoji or symbols only: nothing to
  answer), its viewer was answered less than ``per_viewer`` seconds ago, or, with
  ``while_busy = "skip"``, it came while the avatar was busy.
- Else it waits in a queue of at most ``max_queue`` comments, one per viewer: a viewer's newer
  comment takes the place of the older (one who floods the chat holds one place, no more), and
  a full queue drops its oldest.
- A comment that has waited ``max_age`` seconds is never answered (a stream's chat moves on).
- :meth:`Policy.take` gives the newest waiting comment (``while_busy = "latest"`` or
  ``"skip"``) or the oldest (``"oldest"``).
- A comment the bridge refused (the avatar was busy after all) goes back in its place, if
  nothing newer of its viewer came meanwhile, and waits for the next free moment: within
  ``max_age`` it is not lost.
- Moderation: a comment, or all of a viewer's, or all, can be withdrawn (:meth:`Policy.forget`:
  a moderator deleted it, timed the viewer out, cleared the chat).

Texts and names arrive cleaned and cut (:func:`stages.comment_prompt.clean`); the memory held is
bounded: the queue, and the last answer time of at most :data:`MAX_VIEWERS` viewers.
"""

from __future__ import annotations

import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MODES = ("latest", "oldest", "skip")
MAX_VIEWERS = 10_000  # answer times remembered for per_viewer; the oldest are forgotten first


@dataclass(frozen=True)
class Comment:
    """One comment as a source delivered it (already cleaned and cut)."""
    source: str   # where from: "twitch", "onecomme:youtube", ...
    viewer: str   # who, stable within the source: "twitch:<login>", "youtube:<user id>"
    name: str     # the name to show and to answer
    text: str
    id: str       # the source's id of the comment ("" if none)
    at: float     # when it arrived here (monotonic seconds)


def folded(text: str) -> str:
    """For matching: full-width as half-width, any case the same."""
    return unicodedata.normalize("NFKC", text).casefold()


class Policy:
    def __init__(self, section: dict[str, Any]) -> None:
        self.mode = section["while_busy"]
        if self.mode not in MODES:
            raise ValueError(f"[comments] while_busy = {self.mode!r}: expected one of {', '.join(MODES)}")
        self.max_age = float(section["max_age"])
        self.max_queue = int(section["max_queue"])
        self.per_viewer = float(section["per_viewer"])
        self.ignore_names = {folded(n) for n in section["ignore_names"]}
        self.ignore_words = [folded(w) for w in section["ignore_words"] if w.strip()]
        self.queue: OrderedDict[str, Comment] = OrderedDict()  # viewer -> comment, oldest first
        self.last_answer: OrderedDict[str, float] = OrderedDict()  # viewer -> when, oldest first
        self.dropped: dict[str, int] = {}

    def _drop(self, reason: str) -> str:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        return reason

    def _recently_answered(self, viewer: str, now: float) -> bool:
        at = self.last_answer.get(viewer)
        return at is not None and now - at < self.per_viewer

    def offer(self, comment: Comment, now: float, busy: bool) -> str:
        """Queue ``comment``, or drop it: "" if queued, else why not."""
        if folded(comment.name) in self.ignore_names or folded(comment.viewer.partition(":")[2]) in self.ignore_names:
            return self._drop("ignored name")
        text = folded(comment.text)
        if any(word in text for word in self.ignore_words):
            return self._drop("ignored word")
        if not any(c.isalnum() for c in comment.text):
            return self._drop("no words")
        if self._recently_answered(comment.viewer, now):
            return self._drop("per viewer")
        if busy and self.mode == "skip":
            return self._drop("busy")
        if self.queue.pop(comment.viewer, None) is not None:
            self._drop("replaced")
        self.queue[comment.viewer] = comment
        while len(self.queue) > self.max_queue:
            self.queue.popitem(last=False)
            self._drop("queue full")
        return ""

    def _expire(self, now: float) -> None:
        while self.queue:
            oldest = next(iter(self.queue.values()))
            if now - oldest.at < self.max_age:
                return
            self.queue.popitem(last=False)
            self._drop("too old")

    def take(self, now: float) -> Comment | None:
        """The comment to offer the avatar now (out of the queue), or None."""
        self._expire(now)
        while self.queue:
            _, comment = self.queue.popitem(last=self.mode != "oldest")
            if not self._recently_answered(comment.viewer, now):
                return comment
            self._drop("per viewer")
        return None

    def put_back(self, comment: Comment, now: float) -> None:
        """The bridge did not take ``comment`` (busy): it waits again, in its place by age."""
        if comment.viewer in self.queue or now - comment.at >= self.max_age:
            self._drop("replaced" if comment.viewer in self.queue else "too old")
            return
        self.queue[comment.viewer] = comment
        # keep the queue oldest first: move everything younger behind it
        for viewer in [v for v, c in self.queue.items() if c.at > comment.at]:
            self.queue.move_to_end(viewer)
        while len(self.queue) > self.max_queue:
            self.queue.popitem(last=False)
            self._drop("queue full")

    def answered(self, comment: Comment, now: float) -> None:
        """The avatar is answering ``comment``: its viewer waits ``per_viewer`` for the next."""
        self.last_answer.pop(comment.viewer, None)
        self.last_answer[comment.viewer] = now
        while len(self.last_answer) > MAX_VIEWERS:
            self.last_answer.popitem(last=False)

    def cut_off(self, comment: Comment, answered_at: float, now: float) -> None:
        """The turn that began to answer ``comment`` at ``answered_at`` was cut off before a word of
        it was said (the user began to speak at that moment): it was not answered after all, and
        waits again, its viewer not held back."""
        if self.last_answer.get(comment.viewer) == answered_at:
            del self.last_answer[comment.viewer]
        self.put_back(comment, now)

    def forget(self, *, comment_id: str = "", viewer: str = "", everything: bool = False) -> int:
        """Withdraw a comment (by its id), a viewer's, or all; how many were waiting."""
        gone = [v for v, c in self.queue.items()
                if everything or (comment_id and c.id == comment_id) or (viewer and v == viewer)]
        for v in gone:
            del self.queue[v]
        if gone:
            self.dropped["withdrawn"] = self.dropped.get("withdrawn", 0) + len(gone)
        return len(gone)
