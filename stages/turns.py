"""Turn control: which utterance is answered, and when the avatar must stop.

The bridge runs this, because it sees MMDAgent-EX's events before anyone else and is the one
process that writes to MMDAgent-EX: an interruption becomes ``SYNTH_STOP`` on stdout with no
hop in between, even when another stage is down. The controller is pure logic: the bridge
feeds it every line MMDAgent-EX sends, every line it writes, the sequencer's ``spoken`` event
and the clock, and carries out the :class:`Write` and :class:`Publish` actions it returns, in
order. States and moves: :data:`stages.states.CONVERSATION_TRANSITIONS`.

- ``RECOG_EVENT_STOP|text`` opens a new turn (``turn_start``; turn ids grow, and are the
  wall-clock milliseconds at least, so they stay increasing across a bridge restart). One that
  comes while a turn is in progress first cancels it (reason ``superseded``).
- ``RECOG_EVENT_START`` while a turn is in progress, policy ``interrupt``: cancel (reason
  ``interrupted``) and listen. Policy ``ignore``: nothing; and a ``RECOG_EVENT_STOP`` that
  comes while the avatar speaks or within ``echo_grace`` seconds after is discarded (logged).
- ``RECOG_EVENT_START`` with no ``RECOG_EVENT_STOP`` within ``listen_timeout``: a noise; back
  to idle, nothing resumed, nothing lost.
- ``RECOG_EVENT_AWAY|ON`` cancels a turn in progress (reason ``away``) and discards utterances
  until ``RECOG_EVENT_AWAY|OFF``.
- Cancelling: ``SYNTH_STOP|<model>`` first if the model is speaking or a ``SYNTH_START`` of
  ours is outstanding, then ``cancel`` on the bus with ``stopped`` (whether ``SYNTH_STOP`` was
  written, so the sequencer knows a ``SYNTH_EVENT_STOP`` is still to come) and ``spoken`` (the
  segments of the turn whose ``SYNTH_EVENT_START`` came: what history should keep).
- :meth:`TurnController.accepts` lets through only speech of the current, uncancelled turn: a
  ``SYNTH_START`` of an old turn still in the queue is never written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from stages.states import CONVERSATION_TRANSITIONS, ConversationState as C, Machine

log = logging.getLogger("mmdagent_llm")

POLICIES = ("interrupt", "ignore")


@dataclass(frozen=True)
class Write:
    """Write this MMDAgent-EX message to stdout now."""
    type: str
    args: list[str]


@dataclass(frozen=True)
class Publish:
    """Publish this event on the bus."""
    kind: str
    body: dict[str, Any]
    turn: int
    origin: float | None = None


Action = Write | Publish


@dataclass
class _Voice:
    """What the bridge knows of the model's speech from the lines it wrote and read."""
    speaking: bool = False           # SYNTH_EVENT_START came, SYNTH_EVENT_STOP not yet
    outstanding: str | None = None   # text of our SYNTH_START not yet ended by SYNTH_EVENT_STOP
    spoken: list[str] = field(default_factory=list)  # current turn's segments that started
    quiet_since: float = 0.0         # monotonic time the last speech ended

    @property
    def audible(self) -> bool:
        return self.speaking or self.outstanding is not None


class TurnController:
    def __init__(self, policy: str, echo_grace: float, listen_timeout: float, model: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"[turn] barge_in = {policy!r}: expected one of {', '.join(POLICIES)}")
        self.policy = policy
        self.echo_grace = echo_grace
        self.listen_timeout = listen_timeout
        self.model = model
        self.machine: Machine[C] = Machine("conversation", CONVERSATION_TRANSITIONS, C.IDLE)
        self.turn = 0
        self.cancelled = 0  # highest cancelled turn
        self.voice = _Voice(quiet_since=-1e9)

    # -- input ---------------------------------------------------------------------------
    def on_line(self, msg_type: str, args: list[str], origin: float, now: float | None = None) -> list[Action]:
        """A line MMDAgent-EX wrote to us (``origin``: wall-clock time it arrived)."""
        now = time.monotonic() if now is None else now
        if msg_type == "RECOG_EVENT_START":
            return self._recog_start(origin)
        if msg_type == "RECOG_EVENT_STOP":
            return self._recog_stop("|".join(args).strip(), origin, now)
        if msg_type == "RECOG_EVENT_AWAY":
            return self._away(args[:1] == ["ON"], origin)
        if args[:1] == [self.model]:
            if msg_type == "SYNTH_EVENT_START":
                self.voice.speaking = True
                if self.voice.outstanding is not None and self.machine == C.ANSWERING:
                    self.voice.spoken.append(self.voice.outstanding)
            elif msg_type == "SYNTH_EVENT_STOP":
                self.voice.speaking = False
                self.voice.outstanding = None
                self.voice.quiet_since = now
        return []

    def on_written(self, msg_type: str, args: list[str]) -> None:
        """A line the bridge wrote to MMDAgent-EX."""
        if msg_type == "SYNTH_START" and args[:1] == [self.model] and len(args) >= 3:
            self.voice.outstanding = args[2]

    def on_spoken(self, turn: int, now: float | None = None) -> None:
        """The sequencer reports every segment of ``turn`` spoken (or given up)."""
        if turn == self.turn and self.machine == C.ANSWERING:
            self.machine.move(C.IDLE, f"turn {turn} spoken")
            self.voice.quiet_since = time.monotonic() if now is None else now

    def accepts(self, msg_type: str, turn: int) -> bool:
        """Whether a command from the queue may be written: speech only for the current turn."""
        if msg_type != "SYNTH_START" or turn == 0:
            return True
        return turn == self.turn and turn > self.cancelled

    def next_deadline(self) -> float | None:
        return self.machine.since + self.listen_timeout if self.machine == C.LISTENING else None

    def on_tick(self, now: float) -> None:
        deadline = self.next_deadline()
        if deadline is not None and now >= deadline:
            log.info("no RECOG_EVENT_STOP within [turn] listen_timeout = %.1f s of RECOG_EVENT_START: "
                     "taken as a noise", self.listen_timeout)
            self.machine.move(C.IDLE, "listen timeout")

    # -- transitions ---------------------------------------------------------------------
    def _recog_start(self, origin: float) -> list[Action]:
        state = self.machine.state
        if state == C.AWAY:
            return []
        if state == C.ANSWERING:
            if self.policy == "ignore":
                log.info("user speaks while the avatar answers: ignored ([turn] barge_in = ignore)")
                return []
            actions = self._cancel("interrupted", origin)
            self.machine.move(C.LISTENING, "interrupted")
            return actions
        if state == C.IDLE:
            self.machine.move(C.LISTENING, "RECOG_EVENT_START")
        else:
            self.machine.since = time.monotonic()  # still listening: the noise timer starts again
        return []

    def _recog_stop(self, text: str, origin: float, now: float) -> list[Action]:
        state = self.machine.state
        if state == C.AWAY:
            log.info("recognition result discarded: away (RECOG_EVENT_AWAY|ON)")
            return []
        if self.policy == "ignore" and (self.voice.audible or now < self.voice.quiet_since + self.echo_grace):
            log.info("recognition result discarded: the avatar is speaking or just spoke "
                     "([turn] barge_in = ignore, echo_grace = %.1f s)", self.echo_grace)
            return []
        if not text:
            log.info("empty recognition result ignored")
            if state == C.LISTENING:
                self.machine.move(C.IDLE, "empty result")
            return []
        actions = self._cancel("superseded", origin) if state == C.ANSWERING else []
        self.turn = max(self.turn + 1, int(time.time() * 1000))
        self.voice.spoken = []
        self.machine.move(C.ANSWERING, f"turn {self.turn}")
        return actions + [Publish("turn_start", {"text": text}, self.turn, origin)]

    def _away(self, on: bool, origin: float) -> list[Action]:
        state = self.machine.state
        if on and state != C.AWAY:
            actions = self._cancel("away", origin) if state == C.ANSWERING else []
            self.machine.move(C.AWAY, "RECOG_EVENT_AWAY|ON")
            return actions
        if not on and state == C.AWAY:
            self.machine.move(C.IDLE, "RECOG_EVENT_AWAY|OFF")
        return []

    def _cancel(self, reason: str, origin: float) -> list[Action]:
        actions: list[Action] = []
        stopped = self.voice.audible
        if stopped:
            actions.append(Write("SYNTH_STOP", [self.model]))
            self.voice.outstanding = None
        self.cancelled = self.turn
        log.info("turn %d cancelled (%s)%s", self.turn, reason, ": SYNTH_STOP sent" if stopped else "")
        actions.append(Publish("cancel", {"reason": reason, "stopped": stopped, "spoken": list(self.voice.spoken)},
                               self.turn, origin))
        return actions
