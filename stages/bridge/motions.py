"""The avatar's motions around its speech, decided for :mod:`stages.bridge.turns`.

- **Listening**: from ``RECOG_EVENT_START`` (``[expression] listening``), on the alias
  :data:`stages.expression.MOOD`.
- **Thinking**: when no sentence has started ``thinking_after`` seconds after the utterance was
  sent to the pipeline (the longest silence of a turn is the wait for the first token), on the
  same alias, so it replaces the listening motion.
- Both end (``MOTION_DELETE``) as speech begins, when the turn ends without speech, or when
  listening turns out to be a noise.
- A barge-in stops the sentence's gesture (alias :data:`stages.expression.GESTURE`) if it is
  still playing (its ``MOTION_EVENT_DELETE`` has not come).
- Every ``MOTION_ADD`` written should be answered by ``MOTION_EVENT_ADD`` within
  :data:`CHECK_SECONDS`; MMDAgent-EX answers a missing file with silence, so one that is not is
  logged once per file, with the file.

Returns MMDAgent-EX lines as ``(type, args)``; the turn controller turns them into writes.
"""

from __future__ import annotations

import logging

from stages.expression import GESTURE, MOOD, Vocabulary

log = logging.getLogger("mmdagent_llm")

CHECK_SECONDS = 2.0  # MMDAgent-EX answers MOTION_ADD at once; a missing file gets no answer at all
Line = tuple[str, list[str]]


class Motions:
    def __init__(self, vocabulary: Vocabulary | None, model: str) -> None:
        self.vocabulary = vocabulary
        self.model = model
        self.mood: str | None = None          # name of the listening/thinking motion we started
        self.gesture = False                  # a gesture of ours may still be playing
        self.think_at: float | None = None    # when to start thinking, if no speech by then
        self.waiting: dict[str, tuple[str, float]] = {}  # alias -> (file, deadline) of a MOTION_ADD
        self.missing: set[str] = set()        # files reported

    def listening(self) -> list[Line]:
        return self._mood(self.vocabulary.listening if self.vocabulary else "")

    def think_from(self, now: float) -> None:
        """The utterance went to the pipeline at ``now``."""
        if self.vocabulary and self.vocabulary.thinking:
            self.think_at = now + self.vocabulary.thinking_after

    def before_speech(self) -> list[Line]:
        """Our sentence is about to be written: listening and thinking are over."""
        self.think_at = None
        return self.end_mood()

    def end_mood(self) -> list[Line]:
        self.think_at = None
        if self.mood is None:
            return []
        self.mood = None
        return [("MOTION_DELETE", [self.model, MOOD])]

    def stop_gesture(self) -> list[Line]:
        if not self.gesture:
            return []
        self.gesture = False
        return [("MOTION_DELETE", [self.model, GESTURE])]

    def next_deadline(self) -> float | None:
        times = [t for t in (self.think_at, *(d for _, d in self.waiting.values())) if t is not None]
        return min(times) if times else None

    def on_tick(self, now: float, answering: bool) -> list[Line]:
        for alias, (file, deadline) in list(self.waiting.items()):
            if now >= deadline:
                del self.waiting[alias]
                if alias == GESTURE:  # it never played: nothing for a barge-in to stop
                    self.gesture = False
                elif alias == MOOD:
                    self.mood = None
                if file not in self.missing:
                    self.missing.add(file)
                    log.warning("MMDAgent-EX did not start the motion %r (no MOTION_EVENT_ADD within %.0f s): is "
                                "the file in the content folder? (`mmdagent-llm doctor` in the .mdf folder lists "
                                "the missing ones)", file, CHECK_SECONDS)
        if self.think_at is not None and now >= self.think_at:
            self.think_at = None
            return self._mood(self.vocabulary.thinking) if answering and self.vocabulary else []
        return []

    def on_written(self, msg_type: str, args: list[str], now: float) -> None:
        if msg_type == "MOTION_ADD" and len(args) >= 3 and args[0] == self.model:
            self.waiting[args[1]] = (args[2], now + CHECK_SECONDS)
            if args[1] == GESTURE:
                self.gesture = True

    def on_line(self, msg_type: str, args: list[str]) -> None:
        """A ``MOTION_EVENT_*`` line from MMDAgent-EX."""
        if args[:1] != [self.model] or len(args) < 2:
            return
        if msg_type == "MOTION_EVENT_ADD":
            self.waiting.pop(args[1], None)
        elif msg_type == "MOTION_EVENT_DELETE":
            if args[1] == GESTURE:
                self.gesture = False
            elif args[1] == MOOD:
                self.mood = None

    def _mood(self, name: str) -> list[Line]:
        if not name or self.mood == name or self.vocabulary is None:
            return []
        self.mood = name
        return [("MOTION_ADD", self.vocabulary.motion_args(name, MOOD))]
