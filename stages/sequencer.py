"""sequencer: speaks segments one at a time, each after the avatar finished the previous one.

MMDAgent-EX cuts off the current speech when a new ``SYNTH_START`` comes for the same model,
so per model alias only one ``SYNTH_START`` is outstanding (see :mod:`stages.states`,
speech machine):

- a segment is sent when its model is IDLE, as ``SYNTH_START|<model>|<voice>|<text>``;
- ``SYNTH_EVENT_START|<model>`` marks it SPEAKING, ``SYNTH_EVENT_STOP|<model>`` ends it. A
  ``SYNTH_EVENT_STOP`` that comes while we still wait for the start belongs to speech that
  was cut off before ours (MMDAgent-EX sends one for the old sentence first) and is ignored;
- MMDAgent-EX ignores a ``SYNTH_START`` with an unknown voice alias without any event, so
  waiting is bounded: ``start_timeout`` for the start, then ``stop_timeout_base +
  stop_timeout_per_char * len(text)`` for the end. A timeout is logged and the next
  segment goes on.

Segments of a turn older than the newest one seen are dropped, never spoken. ``origin`` of
each command is the input that caused it: the token for a segment sent at once, the
``SYNTH_EVENT_STOP`` (or timeout) for one that waited its turn.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

from broker import wire
from stages import config as config_mod
from stages.runtime import Stage, setup_logging
from stages.states import SPEECH_TRANSITIONS, Machine, SpeechState

log = logging.getLogger("mmdagent_llm")


@dataclass
class Segment:
    turn: int
    index: int
    text: str
    origin: float


class SequencerStage(Stage):
    name = "sequencer"
    topics = ("mmd.SYNTH_EVENT_START", "mmd.SYNTH_EVENT_STOP")
    input_queue = "segments"
    output_queue = "commands"

    def __init__(self, cfg: config_mod.Config) -> None:
        super().__init__(cfg)
        self.model = cfg["speech"]["model"]
        self.voice = cfg["speech"]["voice"]
        self.machine: Machine[SpeechState] = Machine(f"speech[{self.model}]", SPEECH_TRANSITIONS, SpeechState.IDLE)
        self.queue: collections.deque[Segment] = collections.deque()
        self.current: Segment | None = None
        self.turn = 0

    def info(self) -> dict:
        return {"model": self.model, "voice": self.voice, "state": self.machine.state.value,
                "queued": len(self.queue)}

    # -- segments in -----------------------------------------------------------------------
    def on_work(self, env: wire.Envelope) -> None:
        if env.turn < self.turn:
            if env.kind == "segment":
                self._speech("dropped", Segment(env.turn, env.body.get("index", -1), env.body.get("text", ""), env.origin))
            return
        if env.turn > self.turn:
            self.turn = env.turn
            for old in self.queue:
                self._speech("dropped", old)
            self.queue.clear()
        if env.kind == "segment":
            self.queue.append(Segment(env.turn, int(env.body.get("index", 0)), str(env.body.get("text", "")), env.origin))
            self._send_next(None)
        elif env.kind != "turn_end":
            log.warning("ignored a %s on the segments queue", env.kind)

    def _send_next(self, cause: float | None) -> None:
        """Send the next queued segment if the model is idle; ``cause``: the event that freed it."""
        if self.machine != SpeechState.IDLE or not self.queue:
            return
        seg = self.queue.popleft()
        self.current = seg
        origin = seg.origin if cause is None else max(seg.origin, cause)
        self.push("command", {"type": "SYNTH_START", "args": [self.model, self.voice, seg.text]},
                  turn=seg.turn, origin=origin)
        self.machine.move(SpeechState.SENT, f"segment {seg.index} of turn {seg.turn}")
        self._speech("sent", seg)

    # -- MMDAgent-EX events ----------------------------------------------------------------
    def on_event(self, env: wire.Envelope) -> None:
        args = env.body.get("args") or [""]
        if args[0] != self.model or self.current is None:
            return  # another model's speech, or speech that is not ours
        event = env.body.get("type")
        if event == "SYNTH_EVENT_START" and self.machine == SpeechState.SENT:
            self.machine.move(SpeechState.SPEAKING, "SYNTH_EVENT_START")
            self._speech("started", self.current)
        elif event == "SYNTH_EVENT_STOP" and self.machine in (SpeechState.SPEAKING, SpeechState.STOPPING):
            self._finish("finished", env.ts)

    def _finish(self, state: str, cause: float) -> None:
        assert self.current is not None
        self._speech(state, self.current)
        self.current = None
        self.machine.move(SpeechState.IDLE, state)
        self._send_next(cause)

    # -- deadlines -------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        if self.current is None:
            return None
        s = self.cfg["speech"]
        if self.machine == SpeechState.SENT:
            return self.machine.since + s["start_timeout"]
        return self.machine.since + s["stop_timeout_base"] + s["stop_timeout_per_char"] * len(self.current.text)

    def on_tick(self, now: float) -> None:
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return
        if self.machine == SpeechState.SENT:
            log.warning("no SYNTH_EVENT_START|%s within %.1f s of SYNTH_START with voice %r: is the voice "
                        "alias defined in your .ojt/.fph file? Going on.", self.model,
                        self.cfg["speech"]["start_timeout"], self.voice)
        else:
            log.warning("no SYNTH_EVENT_STOP|%s in time for a %d-character segment: going on",
                        self.model, len(self.current.text) if self.current else 0)
        self._finish("timeout", time.time())

    def _speech(self, state: str, seg: Segment) -> None:
        self.publish("speech", {"model": self.model, "index": seg.index, "text": seg.text, "state": state},
                     turn=seg.turn)


def main(cfg: config_mod.Config) -> int:
    setup_logging("sequencer")
    return SequencerStage(cfg).run()
