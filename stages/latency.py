"""How long each turn took to reach its milestones, told from bus events alone.

A turn's clock starts when the user's utterance reached the bridge (``turn_start``'s
``origin``). Its milestones, each taken the first time only:

============== ======================================================= =========================
milestone      what                                                    from
============== ======================================================= =========================
first_token    the llm received the answer's first token               ``turn_result``
                                                                       ``first_token``, or the
                                                                       first ``token``'s ``origin``
first_synth    the bridge wrote the first ``SYNTH_START``              ``written`` (``ts``)
first_speech   MMDAgent-EX began speaking (``SYNTH_EVENT_START``)      ``speech`` ``started``
============== ======================================================= =========================

The bridge keeps one for its heartbeat (``status`` shows the last turns), the metrics and
transcript observers one each: all read the same events, so all tell the same numbers.
Memory is bounded: only the last :data:`KEEP` turns are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker import wire

MILESTONES = ("first_token", "first_synth", "first_speech")
KEEP = 16


@dataclass
class TurnTimes:
    turn: int
    start: float
    marks: dict[str, float] = field(default_factory=dict)  # milestone -> seconds after start

    def as_ms(self) -> dict[str, int | None]:
        """Every milestone in whole milliseconds, None where it never came."""
        return {m: round(self.marks[m] * 1000) if m in self.marks else None for m in MILESTONES}


class TurnClock:
    def __init__(self) -> None:
        self.turns: dict[int, TurnTimes] = {}

    def start(self, turn: int, at: float) -> None:
        if turn in self.turns:
            return
        self.turns[turn] = TurnTimes(turn, at)
        for old in sorted(self.turns)[:-KEEP]:
            del self.turns[old]

    def mark(self, turn: int, milestone: str, at: float) -> float | None:
        """Seconds from the turn's start if this is the milestone's first time, else None."""
        times = self.turns.get(turn)
        if times is None or milestone in times.marks:
            return None
        times.marks[milestone] = max(0.0, at - times.start)
        return times.marks[milestone]

    def observe(self, env: wire.Envelope) -> tuple[str, float] | None:
        """Feed any bus event; returns ``(milestone, seconds)`` when it set one."""
        if env.kind == "turn_start":
            self.start(env.turn, env.origin)
            return None
        if env.kind == "token":
            milestone, at = "first_token", env.origin
        elif env.kind == "turn_result" and isinstance(env.body.get("first_token"), float) and env.body["first_token"]:
            milestone, at = "first_token", env.body["first_token"]
        elif env.kind == "written" and env.body.get("type") == "SYNTH_START":
            milestone, at = "first_synth", env.ts
        elif env.kind == "speech" and env.body.get("state") == "started":
            milestone, at = "first_speech", env.ts
        else:
            return None
        seconds = self.mark(env.turn, milestone, at)
        return None if seconds is None else (milestone, seconds)

    def last(self, count: int) -> list[TurnTimes]:
        """The ``count`` latest turns, oldest first."""
        return [self.turns[t] for t in sorted(self.turns)[-count:]]
