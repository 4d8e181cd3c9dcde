"""sequencer: speaks segments one at a time, each after the avatar finished the previous one.

MMDAgent-EX cuts off the current speech when a new ``SYNTH_START`` comes for the same model,
so per model alias only one ``SYNTH_START`` is outstanding (see :mod:`stages.states`,
speech machine):

- a segment is sent when its model is IDLE, as ``SYNTH_START|<model>|<voice>|<text>``, its
  voice and gesture (``MOTION_ADD``, carried in the same command) chosen by its tags
  (:class:`stages.expression.Vocabulary`);
- ``SYNTH_EVENT_START|<model>`` marks it SPEAKING, ``SYNTH_EVENT_STOP|<model>`` ends it. A
  ``SYNTH_EVENT_STOP`` that comes while we still wait for the start belongs to speech that
  was cut off before ours (MMDAgent-EX sends one for the old sentence first) and is ignored;
- MMDAgent-EX ignores a ``SYNTH_START`` with an unknown voice alias without any event, so
  waiting is bounded: ``start_timeout`` for the start, then ``stop_timeout_base +
  stop_timeout_per_char * len(text)`` for the end. A timeout is logged and the next
  segment goes on.

Segments of a turn older than the newest one seen, or of a cancelled turn, are dropped, never
spoken. On ``cancel`` with ``stopped`` (the bridge wrote ``SYNTH_STOP``), the segment being
spoken moves to STOPPING until its ``SYNTH_EVENT_STOP`` (or ``cut_timeout``): that event ends
the stopped speech, never the next sentence. Once every segment of a turn is spoken (after
its ``turn_end``), ``spoken`` is published.

The next segment of the same turn does not wait for ``SYNTH_EVENT_STOP`` to travel here: while
one is SENT or SPEAKING, the next is pushed ahead as a *cue* (``after``: the index of the one
playing), which the bridge holds and writes the moment it reads that ``SYNTH_EVENT_STOP``, with
no hop between the two sentences. When the stop reaches us the cued segment is the current one
(SENT). If the playing one times out instead, the cue is pushed again, plain, to be written now;
a cancel drops it (the bridge drops its copy too). ``origin`` of
each command is the input that caused it: the token for a segment sent at once, the
``SYNTH_EVENT_STOP`` (or timeout) for one that waited its turn.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Callable

from broker import wire
from broker import config as config_mod
from broker.runtime import Stage, setup_logging
from stages.expression import Vocabulary
from stages.states import SPEECH_TRANSITIONS, Machine, SpeechState

log = logging.getLogger("mmdagent_llm")


@dataclass
class Segment:
    turn: int
    index: int
    text: str
    origin: float
    tags: tuple[str, ...] = ()
    voice: str = ""
    motion: list[str] | None = None  # MOTION_ADD arguments of its gesture


class SequencerStage(Stage):
    name = "sequencer"
    topics = ("mmd.SYNTH_EVENT_START", "mmd.SYNTH_EVENT_STOP", "cancel")
    watches_peers = False
    input_queue = "segments"
    output_queue = "commands"

    def __init__(self, cfg: config_mod.Config) -> None:
        super().__init__(cfg)
        self.model = cfg["speech"]["model"]
        self.voice = cfg["speech"]["voice"]
        self.vocabulary = Vocabulary(cfg)
        self.machine: Machine[SpeechState] = Machine(f"speech[{self.model}]", SPEECH_TRANSITIONS, SpeechState.IDLE)
        self.queue: collections.deque[Segment] = collections.deque()
        self.current: Segment | None = None
        self.cued: Segment | None = None  # the next segment, pushed ahead for the bridge to hold
        self.turn = 0
        self.cancelled = 0
        self.total: int | None = None  # segments of self.turn, once its turn_end came
        self.done = 0                  # segments of self.turn spoken or given up

    def info(self) -> dict:
        return {"model": self.model, "voice": self.voice, "state": self.machine.state.value,
                "queued": len(self.queue)}

    # -- segments in -----------------------------------------------------------------------
    def on_work(self, env: wire.Envelope) -> None:
        if env.turn < self.turn or env.turn <= self.cancelled:
            if env.kind == "segment":
                self._speech("dropped", Segment(env.turn, env.body.get("index", -1), env.body.get("text", ""), env.origin))
            return
        if env.turn > self.turn:
            self.turn, self.total, self.done = env.turn, None, 0
            self._drop_queued(env.turn - 1)
            self._settle_older(env.turn)
            self.vocabulary.start_answer()
        if env.kind == "segment":
            tags = tuple(str(t) for t in env.body.get("tags") or ())
            expression = self.vocabulary.sentence(tags)
            self.queue.append(Segment(env.turn, int(env.body.get("index", 0)), str(env.body.get("text", "")),
                                      env.origin, tags, expression.voice, expression.motion))
            self._send_next(None)
            self._cue_next()
        elif env.kind == "turn_end":
            self.total = int(env.body.get("segments", 0))
            self._check_spoken()
        else:
            log.warning("ignored a %s on the segments queue", env.kind)

    def _send_next(self, cause: float | None, then: Callable[[], None] | None = None) -> None:
        """Send the next queued segment if the model is idle; ``cause``: the event that freed it.
        ``then`` runs between the command and its ``speech`` ``sent``: bus events that must come
        first on the bus but need not delay the avatar."""
        seg = None
        if self.machine == SpeechState.IDLE and self.queue:
            seg = self.queue.popleft()
            self.current = seg
            self._command(seg, seg.origin if cause is None else max(seg.origin, cause))
            self.machine.move(SpeechState.SENT, f"segment {seg.index} of turn {seg.turn}")
        if then is not None:
            then()
        if seg is not None:
            self._speech("sent", seg)
            self._cue_next()

    def _cue_next(self) -> None:
        """Push the next segment of the current one's turn ahead, as the bridge's cue."""
        cur = self.current
        if (self.cued is not None or cur is None or not self.queue or self.queue[0].turn != cur.turn
                or self.machine not in (SpeechState.SENT, SpeechState.SPEAKING)):
            return
        self.cued = self.queue.popleft()
        self._command(self.cued, self.cued.origin, after=cur.index)

    def _command(self, seg: Segment, origin: float, after: int | None = None) -> None:
        body = {"type": "SYNTH_START", "args": [self.model, seg.voice or self.voice, seg.text], "segment": seg.index}
        if seg.motion:  # written just before the SYNTH_START, and only with it
            body["motion"] = seg.motion
        if after is not None:
            body["after"] = after
        self.push("command", body, turn=seg.turn, origin=origin)

    def _check_spoken(self) -> None:
        if self.total is not None and self.done >= self.total and self.turn > self.cancelled:
            self.publish("spoken", {"segments": self.total}, turn=self.turn)
            self.total = None

    # -- cancel ----------------------------------------------------------------------------
    def _cancel(self, env: wire.Envelope) -> None:
        self.cancelled = max(self.cancelled, env.turn)
        self._drop_queued(env.turn)
        seg = self.current
        if seg is None or seg.turn > env.turn or self.machine not in (SpeechState.SENT, SpeechState.SPEAKING):
            return
        if env.body.get("reason") == "lost" and self.machine == SpeechState.SPEAKING:
            return  # nothing stops it: it plays to its end, and the rest of its answer comes as a new turn
        if env.body.get("stopped"):
            # MMDAgent-EX still sends this speech's SYNTH_EVENT_STOP: wait for it (or cut_timeout)
            # so it is not taken as the end of the next turn's first sentence.
            self.machine.move(SpeechState.STOPPING, f"turn {env.turn} cancelled")
            self._speech("interrupted", seg)
        else:
            self._speech("dropped", seg)
            self.current = None
            self.machine.move(SpeechState.IDLE, f"turn {env.turn} cancelled before it was written")
            self._send_next(None)

    def _settle_older(self, turn: int) -> None:
        """A newer turn's work came while an older turn's segment is outstanding, with no cancel
        of it seen (one lost while the broker restarted): the bridge has moved on and writes
        nothing of the older turn any more. One never heard of is given up now, not after
        ``start_timeout``; one the avatar is saying ends as a cut-off speech (its
        ``SYNTH_EVENT_STOP``, or ``cut_timeout``), so that event does not end the next."""
        seg = self.current
        if seg is None or seg.turn >= turn:
            return
        if self.machine == SpeechState.SENT:
            self._speech("dropped", seg)
            self.current = None
            self.machine.move(SpeechState.IDLE, f"turn {turn} came, turn {seg.turn} was not cancelled")
        elif self.machine == SpeechState.SPEAKING:
            self.machine.move(SpeechState.STOPPING, f"turn {turn} came while turn {seg.turn} spoke")
            self._speech("interrupted", seg)

    def _drop_queued(self, up_to_turn: int) -> None:
        if self.cued is not None and self.cued.turn <= up_to_turn:  # the bridge drops its copy
            self._speech("dropped", self.cued)
            self.cued = None
        keep = collections.deque()
        for seg in self.queue:
            if seg.turn <= up_to_turn:
                self._speech("dropped", seg)
            else:
                keep.append(seg)
        self.queue = keep

    # -- MMDAgent-EX events ----------------------------------------------------------------
    def on_event(self, env: wire.Envelope) -> None:
        if env.kind == "cancel":
            self._cancel(env)
            return
        args = env.body.get("args") or [""]
        if args[0] != self.model or self.current is None:
            return  # another model's speech, or speech that is not ours
        event = env.body.get("type")
        if event == "SYNTH_EVENT_START" and self.machine == SpeechState.SENT:
            self.machine.move(SpeechState.SPEAKING, "SYNTH_EVENT_START")
            self._speech("started", self.current)
        elif event == "SYNTH_EVENT_STOP" and self.machine == SpeechState.SPEAKING:
            self._finish("finished", env.ts)
        elif event == "SYNTH_EVENT_STOP" and self.machine == SpeechState.STOPPING:
            self._finish("stopped", env.ts)

    def _finish(self, state: str, cause: float) -> None:
        seg = self.current
        assert seg is not None
        if seg.turn == self.turn and state in ("finished", "timeout"):
            self.done += 1
        self.current = None
        self.machine.move(SpeechState.IDLE, state)

        def report() -> None:
            self._speech(state, seg)
            self._check_spoken()
        cued, self.cued = self.cued, None
        if cued is None:
            self._send_next(cause, then=report)  # the next command first: the avatar is waiting on it
            return
        if state != "finished":  # no SYNTH_EVENT_STOP reached the bridge either: it writes it now
            self._command(cued, max(cued.origin, cause))
        self.current = cued  # the bridge wrote it on that SYNTH_EVENT_STOP
        self.machine.move(SpeechState.SENT, f"segment {cued.index} of turn {cued.turn} (cued)")
        report()
        self._speech("sent", cued)
        self._cue_next()

    # -- deadlines -------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        if self.current is None:
            return None
        s = self.cfg["speech"]
        if self.machine == SpeechState.SENT:
            return self.machine.since + s["start_timeout"]
        if self.machine == SpeechState.STOPPING:
            return self.machine.since + s["cut_timeout"]
        return self.machine.since + s["stop_timeout_base"] + s["stop_timeout_per_char"] * len(self.current.text)

    def on_tick(self, now: float) -> None:
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return
        if self.machine == SpeechState.SENT:
            log.warning("no SYNTH_EVENT_START|%s within %.1f s of SYNTH_START with voice %r: is the voice "
                        "alias defined in your .ojt/.fph file? Going on.", self.model,
                        self.cfg["speech"]["start_timeout"], self.voice)
        elif self.machine == SpeechState.STOPPING:
            log.warning("no SYNTH_EVENT_STOP|%s within [speech] cut_timeout after SYNTH_STOP: going on", self.model)
        else:
            log.warning("no SYNTH_EVENT_STOP|%s in time for a %d-character segment: going on",
                        self.model, len(self.current.text) if self.current else 0)
        self._finish("timeout" if self.machine != SpeechState.STOPPING else "stopped", time.time())

    def _speech(self, state: str, seg: Segment) -> None:
        self.publish("speech", {"model": self.model, "index": seg.index, "text": seg.text, "state": state,
                                "tags": list(seg.tags), "voice": seg.voice or self.voice}, turn=seg.turn)


def main(cfg: config_mod.Config) -> int:
    setup_logging("sequencer")
    return SequencerStage(cfg).run()
