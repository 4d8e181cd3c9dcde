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

What the microphone hears while the avatar speaks: its own voice from a loudspeaker ([turn]
``echo_guard``) or a backchannel (``うん``; [turn] ``backchannels``). Matching is
:mod:`stages.bridge.echo`'s; the decisions are these.

- The echo guard drops (logs, counts) a ``RECOG_EVENT_STOP`` whose text is at least
  ``echo_similarity`` alike to what the avatar could have heard of itself: what it said from
  the moment that voice began (its ``RECOG_EVENT_START``, less the recognizer's lag), or, with
  no start, within ``echo_grace`` before the result; whatever the state. A dropped result opens
  nothing and cancels nothing.
- A backchannel is dropped while a turn's answer is in progress and the avatar is audible, or
  while its voice was heard (HEARING). Once the answer is over it is an utterance like any other:
  ``はい`` may answer the avatar's question.
- **When a voice interrupts** (the hard part: both begin with ``RECOG_EVENT_START``, as a user
  does, before any word is known). Decided: with either guard on, once the avatar has begun to
  answer (a sentence written, or, for the echo guard, its last one ended within the lag),
  ``RECOG_EVENT_START`` does not stop it; the conversation goes to HEARING and the answer goes
  on. Then its ``RECOG_EVENT_STOP``: the avatar's voice, a backchannel or empty: nothing is
  cancelled (back to ANSWERING); other words: cancel (reason ``interrupted``, ``SYNTH_STOP`` at
  once) and a new turn for them. With no words yet: without the echo guard, ``backchannel_wait``
  seconds after the voice began it is taken as an interruption (a backchannel is short: cancel,
  LISTENING, as a ``RECOG_EVENT_START`` did before); with the echo guard there is no such limit
  (an echo lasts as long as the avatar's sentence, so any shorter limit would make it stop
  itself): the words alone decide, and none within ``listen_timeout`` was a noise. Before the
  avatar has said anything of the answer (the LLM still thinking) there is nothing to hear but
  the user: a voice interrupts at once, as with both guards off. So the cost: a real
  interruption stops the avatar at its words or ``backchannel_wait``, whichever comes first
  (echo guard: at its words) instead of at its first sound; with both off it is exactly as
  before. Rejected: stopping at once and resuming after a backchannel (the sentence would be
  said twice, and MMDAgent-EX cannot pause a speech), and deciding by the timing of
  ``RECOG_EVENT_START`` alone (an echo and a user who starts with the avatar look the same).
- ``RECOG_EVENT_AWAY|ON`` cancels a turn in progress (reason ``away``) and discards utterances
  until ``RECOG_EVENT_AWAY|OFF``.
- An input process's ``input`` (:meth:`TurnController.on_input`; the control API, comments, idle
  talk): ``ask`` opens a turn as an utterance would, ``say`` one that says fixed words, ``stop``
  cancels the turn in progress (reason ``stopped``). With ``when = "idle"`` only if nothing is
  going on (no turn, nobody speaking, not away), else refused: the user always comes first.
  Each is answered with ``input_result``.
- Cancelling: ``SYNTH_STOP|<model>`` first if the model is speaking or a ``SYNTH_START`` of
  ours is outstanding, then ``cancel`` on the bus with ``stopped`` (whether ``SYNTH_STOP`` was
  written, so the sequencer knows a ``SYNTH_EVENT_STOP`` is still to come) and ``spoken`` (the
  segments of the turn whose ``SYNTH_EVENT_START`` came: what history should keep).
- :meth:`TurnController.accepts` lets through only speech of the current, uncancelled turn: a
  ``SYNTH_START`` of an old turn still in the queue is never written.
- A *cue* (:meth:`TurnController.on_cue`: the sequencer's next ``SYNTH_START``, sent ahead) is
  held until the speech now playing ends, then written at once from its ``SYNTH_EVENT_STOP``:
  between two sentences there is no hop at all. A cancel, a new turn or any ``SYNTH_START``
  written first drops it.

Crashes and restarts (the bridge is told by :mod:`broker.liveness`):

- An utterance that comes while a pipeline stage is down is held (HOLDING, with an on-screen
  ``NOTIFY_SHOW`` if configured) and sent when the pipeline is back; if by then it is older
  than ``max_age``, or the pipeline stays down that long, the turn ends with the failure notice.
- A stage lost (gone, or restarted by supervisord) while it still had work for the current turn:
  if nothing of the answer was written yet, the turn is cancelled and asked again under a new
  turn id (no stale token, segment or command of the old id can be spoken); otherwise it is
  cancelled and the bridge speaks ``failure_notice`` itself. A turn never restarts after a
  word of it was said, so nothing is half-spoken twice.
- A turn with no sign of life in the pipeline for ``stall_timeout`` ends with the notice too:
  every turn ends.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from broker.wire import CAUSES, INPUT_ACTIONS, INPUT_MAX_TEXT
from stages.bridge.echo import ONSET_LAG, Backchannels, EchoGuard
from stages.bridge.motions import Motions
from stages.bridge.voice import Voice
from stages.expression import Vocabulary
from stages.states import CONVERSATION_TRANSITIONS, ConversationState as C, Machine

log = logging.getLogger("mmdagent_llm")

POLICIES = ("interrupt", "ignore")
ANSWER_STATES = (C.ANSWERING, C.HEARING)  # a turn's answer is in progress
RESEND_AFTER = 1.5  # seconds; a heartbeat may be older than the turn_start it crossed


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


class TurnController:
    def __init__(self, turn_cfg: dict[str, Any], model: str, voice: str, startup_grace: float = 0.0,
                 vocabulary: Vocabulary | None = None, speech_limits: dict[str, Any] | None = None) -> None:
        policy = turn_cfg["barge_in"]
        if policy not in POLICIES:
            raise ValueError(f"[turn] barge_in = {policy!r}: expected one of {', '.join(POLICIES)}")
        self.cfg = turn_cfg
        self.policy = policy
        self.echo_grace = turn_cfg["echo_grace"]
        self.listen_timeout = turn_cfg["listen_timeout"]
        # what the microphone hears while the avatar speaks (stages.bridge.echo); None: not looked at
        self.echo = EchoGuard(self.echo_grace) if turn_cfg["echo_guard"] else None
        self.echo_similarity = turn_cfg["echo_similarity"]
        self.backchannels = Backchannels(turn_cfg["backchannel_words"]) if turn_cfg["backchannels"] else None
        self.backchannel_wait = turn_cfg["backchannel_wait"]
        self.heard_at = 0.0     # when the voice now heard began (its RECOG_EVENT_START): echoes are looked for from then
        self.heard_last = 0.0   # its latest RECOG_EVENT_START (the noise timer of HEARING with the echo guard)
        self.waited_out = False  # the last voice was taken as an interruption at backchannel_wait, before its words
        self.dropped = {"echo": 0, "backchannel": 0}  # results not answered, for the heartbeat
        self.model, self.voice_alias = model, voice
        self.machine: Machine[C] = Machine("conversation", CONVERSATION_TRANSITIONS, C.IDLE)
        self.turn = 0
        self.cancelled = 0  # highest cancelled turn
        self.voice = Voice(quiet_since=-1e9)
        self.pipeline_up = False
        # just started: the stages' heartbeats may not have come yet; no alarm during this time
        self.quiet_until = time.monotonic() + startup_grace
        self.user_text = ""           # the utterance of the current (or held) turn
        self.asked_at = 0.0           # monotonic time it was said: its age decides replay or notice
        self.asked_origin = 0.0
        self.progress_at = 0.0        # last sign of life of the current turn in the pipeline
        self.sent_at = 0.0            # when its turn_start was (last) published
        self.next_segment = 0         # index of the current turn's next segment to write
        self.total_segments: int | None = None  # how many it has, once the segmenter knows
        self.done_by: set[str] = set()  # stages whose part of the current turn is complete
        self.cued: list[tuple[str, list[str]]] | None = None  # lines to write when the speech ends
        self.written: list[str] = []  # the answer's segments written to MMDAgent-EX, under all its ids
        self.resuming = False         # a stage was lost mid-answer: its rest is asked for once the avatar is quiet
        self.asked_turn = 0           # the id the current answer was first asked under (the llm knows it by it)
        self.start_body: dict[str, Any] = {}  # the current turn's turn_start, to send it again
        self.vocabulary = vocabulary
        self.motions = Motions(vocabulary, model)  # listening, thinking, gestures (stages.bridge.motions)
        self.speech_limits = speech_limits  # [speech] timeouts: how long a speech may go without its events
        # every turn id of this bridge is at least this; all below belong to bridges gone before it
        self.epoch = int(time.time() * 1000)
        self.last_cancel: Publish | None = None  # published again to a process that may have missed it
        self.say = ""  # the held or current turn's fixed words (a greeting), "" for an utterance
        self.came_from: dict[str, str] = {}  # the held or current turn's input (source, from), if one opened it

    # -- input ---------------------------------------------------------------------------
    def on_line(self, msg_type: str, args: list[str], origin: float, now: float | None = None) -> list[Action]:
        """A line MMDAgent-EX wrote to us (``origin``: wall-clock time it arrived)."""
        now = time.monotonic() if now is None else now
        if msg_type == "RECOG_EVENT_START":
            return self._recog_start(origin, now)
        if msg_type == "RECOG_EVENT_STOP":
            return self._recog_stop("|".join(args).strip(), origin, now)
        if msg_type == "RECOG_EVENT_AWAY":
            return self._away(args[:1] == ["ON"], origin)
        if args[:1] == [self.model]:
            if msg_type == "SYNTH_START" and self.echo is not None and len(args) >= 3:
                self.echo.speak(args[2], now)  # ours echoed back, or another plugin's: both reach the microphone
            elif msg_type == "SYNTH_EVENT_START":
                self.voice.speaking = True
                self.voice.since = now
                if self.voice.outstanding is not None and self.answering:
                    self.voice.spoken.append(self.voice.outstanding)
            elif msg_type == "SYNTH_EVENT_STOP":
                ended = self.voice.speaking  # else the end of speech cut off before ours started
                self.voice.speaking = False
                self.voice.outstanding = None
                self.voice.quiet_since = now
                if self.echo is not None:
                    self.echo.quiet(now)
                if ended and self.cued is not None and self.answering:
                    lines, self.cued = self.cued, None
                    return self._speech(lines)
                return self._resume_when_quiet(now)
            elif msg_type.startswith("MOTION_EVENT_"):
                self.motions.on_line(msg_type, args)
        return []

    def on_speech(self, lines: list[tuple[str, list[str]]], turn: int, after: int | None = None) -> list[Action]:
        """A sentence of ``turn`` (already accepted) to write: its gesture's ``MOTION_ADD`` if any,
        then its ``SYNTH_START``. A cue (``after`` set) is held while segment ``after`` is the
        last one written and still audible; anything else is written now, except a sentence that
        comes while the turn's previous one is still audible: only a sequencer that cannot know
        sends that (one restarted meanwhile, handed what the broker kept for it), and written now
        it would cut the avatar off. It is held as a cue instead."""
        if (turn == self.turn and self.answering and self.next_segment and self.voice.audible
                and (after is None or self.next_segment == after + 1)):
            if after is None:
                log.info("turn %d: segment %d came while segment %d still plays: held until it ends", turn,
                         self.next_segment, self.next_segment - 1)
            self.cued = lines
            return []
        return self._speech(lines)

    def _speech(self, lines: list[tuple[str, list[str]]]) -> list[Action]:
        return [Write(t, a) for t, a in [*self.motions.before_speech(), *lines]]

    def on_written(self, msg_type: str, args: list[str], turn: int = 0, now: float | None = None) -> None:
        """A line the bridge wrote to MMDAgent-EX (``turn``: the turn it belongs to, 0 if none)."""
        now = time.monotonic() if now is None else now
        self.motions.on_written(msg_type, args, now)
        if msg_type == "SYNTH_START" and args[:1] == [self.model] and len(args) >= 3:
            if self.echo is not None:
                self.echo.speak(args[2], now)
            self.voice.outstanding = args[2]
            self.voice.since = now
            self.cued = None  # a cue is for the sentence after the one playing: this replaced it
            if turn == self.turn:
                self.next_segment += 1
                self.written.append(args[2])

    def on_progress(self, kind: str, sender: str, turn: int, now: float | None = None,
                    segments: int | None = None) -> None:
        """A pipeline event of some turn: the current one shows it is moving. ``segments``: the
        count the segmenter's ``turn_end`` carries."""
        if turn != self.turn:
            return
        self.progress_at = time.monotonic() if now is None else now
        if kind == "turn_result":
            self.done_by.add("llm")
        elif kind == "turn_end" and sender == "segmenter":
            self.done_by.add("segmenter")
            self.total_segments = segments

    def on_result(self, turn: int, reason: str, cause: str) -> list[Action]:
        """The llm closed ``turn``: a failure of the current turn is shown on screen with its
        cause (``[turn] notify_errors``), so the person at the avatar learns what to fix."""
        if turn != self.turn or reason != "error" or cause not in CAUSES or not self.cfg["notify_errors"]:
            return []
        return [Write("NOTIFY_SHOW", [f"mmdagent-llm: {CAUSES[cause]}"])]

    def on_notice(self, level: str, text: str) -> list[Action]:
        """A ``notice`` on the bus: an error one (the start-up check found the key refused, say)
        is shown on screen too, with ``[turn] notify_errors``."""
        if level != "error" or not self.cfg["notify_errors"]:
            return []
        return [Write("NOTIFY_SHOW", [f"mmdagent-llm: {text}"])]

    def _all_said(self) -> bool:
        """Every segment of the current turn was written and the avatar has finished the last
        one, though the sequencer's ``spoken`` may still be on its way: the turn is over, and a
        user who speaks now interrupts nothing."""
        return (self.answering and self.total_segments is not None
                and self.next_segment >= self.total_segments and not self.voice.audible)

    @property
    def answering(self) -> bool:
        """A turn's answer is in progress (a voice may be heard meanwhile: HEARING)."""
        return self.machine.state in ANSWER_STATES

    def _settle(self) -> None:
        """A turn all said is over, though its ``spoken`` may be on its way; a voice heard goes on."""
        if self._all_said():
            self.machine.move(C.IDLE if self.machine == C.ANSWERING else C.LISTENING, f"turn {self.turn} all said")

    def on_spoken(self, turn: int, now: float | None = None) -> None:
        """The sequencer reports every segment of ``turn`` spoken (or given up). A voice heard
        meanwhile (HEARING) is listened to on: its words are a new utterance."""
        if turn == self.turn and self.answering:
            self.machine.move(C.IDLE if self.machine == C.ANSWERING else C.LISTENING, f"turn {turn} spoken")
            self.voice.quiet_since = time.monotonic() if now is None else now

    def on_spoken_actions(self) -> list[Action]:
        """After :meth:`on_spoken`: a turn that ended without a word ends its thinking motion too."""
        return [Write(t, a) for t, a in self.motions.end_mood()] if not self.answering else []

    def accepts(self, msg_type: str, turn: int) -> bool:
        """Whether a command from the queue may be written: speech only for the current turn."""
        if msg_type != "SYNTH_START" or turn == 0:
            return True
        return turn == self.turn and turn > self.cancelled

    def next_deadline(self) -> float | None:
        due = [d for d in (self._own_deadline(), self.motions.next_deadline(), self.voice.deadline(self.speech_limits))
               if d is not None]
        return min(due) if due else None

    def _own_deadline(self) -> float | None:
        state = self.machine.state
        if state == C.LISTENING:
            return self.machine.since + self.listen_timeout
        if state == C.HOLDING:
            return self.asked_at + self.cfg["max_age"]
        if state == C.ANSWERING:
            return self.progress_at + self.cfg["stall_timeout"]
        if state == C.HEARING:
            return min(self.progress_at + self.cfg["stall_timeout"], self._hearing_deadline())
        return None

    def _hearing_deadline(self) -> float:
        """When a voice heard in HEARING is decided without its words: with the echo guard, it
        was a noise after ``listen_timeout`` (an echo lasts as long as the sentence, so no
        shorter wait can tell); without, ``backchannel_wait`` (a backchannel is short)."""
        if self.echo is not None:
            return self.heard_last + self.listen_timeout
        return self.heard_at + self.backchannel_wait

    def on_tick(self, now: float) -> list[Action]:
        voice_due = self.voice.deadline(self.speech_limits)
        if voice_due is not None and now >= voice_due:
            log.warning("no SYNTH_EVENT_%s|%s in time for %r: taken as over (is the voice alias defined in "
                        "your .ojt/.fph file?)", "STOP" if self.voice.speaking else "START", self.model,
                        (self.voice.outstanding or "")[:30])
            self.voice.over(now)
            if self.echo is not None:
                self.echo.quiet(now)
        answering = self.answering and not self.written
        motions: list[Action] = [Write(t, a) for t, a in self.motions.on_tick(now, answering)]
        if self.cued is not None and not self.voice.audible and self.answering:
            lines, self.cued = self.cued, None  # what it waited for is taken as over: its turn now
            motions += self._speech(lines)
        motions += self._resume_when_quiet(now)
        deadline = self._own_deadline()
        if deadline is None or now < deadline:
            return motions
        state = self.machine.state
        if state == C.LISTENING:
            log.info("no RECOG_EVENT_STOP within [turn] listen_timeout = %.1f s of RECOG_EVENT_START: "
                     "taken as a noise", self.listen_timeout)
            self.machine.move(C.IDLE, "listen timeout")
            return motions + [Write(t, a) for t, a in self.motions.end_mood()]
        if state == C.HEARING and now >= self._hearing_deadline():
            return motions + self._heard_long()
        return motions + self._tick_turn(state)

    def _heard_long(self) -> list[Action]:
        """A voice heard while the avatar answers has gone on with no words until its deadline."""
        self._settle()
        if self.machine != C.HEARING:
            return []
        if self.echo is not None:
            log.info("turn %d: no RECOG_EVENT_STOP within [turn] listen_timeout = %.1f s: a noise, the answer "
                     "goes on", self.turn, self.listen_timeout)
            self.machine.move(C.ANSWERING, "noise")
            return []
        log.info("turn %d: a voice longer than [turn] backchannel_wait = %.1f s is no backchannel: interrupted",
                 self.turn, self.backchannel_wait)
        actions = self._cancel("interrupted", time.time())
        self.machine.move(C.LISTENING, "interrupted")
        self.waited_out = True
        return actions + [Write(t, a) for t, a in self.motions.listening()]

    def _tick_turn(self, state: C) -> list[Action]:
        if self._all_said():  # only the sequencer's "spoken" went missing (a broker restart)
            self._settle()
            return []
        if state == C.HOLDING:
            return self._fail(f"the pipeline was not back within [turn] max_age = {self.cfg['max_age']} s",
                              self.asked_origin)
        return self._fail(f"no progress for [turn] stall_timeout = {self.cfg['stall_timeout']} s", time.time())

    # -- the pipeline's health -----------------------------------------------------------
    def on_ready(self) -> list[Action]:
        """The bridge is on the bus: every turn before its own belongs to a bridge that has gone
        (MMDAgent-EX closed and opened again). Cancelled at once, so no stage waits for a
        ``SYNTH_EVENT_STOP`` or a turn that cannot come."""
        self.last_cancel = Publish("cancel", {"reason": "gone", "stopped": False, "spoken": []}, self.epoch - 1)
        return [self.last_cancel]

    def on_avatar_gone(self, origin: float, now: float | None = None) -> list[Action]:
        """The avatar app went away (a remote bridge's connection ended; the bridge itself goes
        on): whatever it was saying, hearing or about to say is gone with it. A turn in progress
        is cancelled (reason ``gone``: nothing to stop, no ``SYNTH_EVENT_STOP`` will come), a held
        utterance is dropped, and the conversation waits, idle, for the app to come back: its
        next utterance is a turn like any other."""
        now = time.monotonic() if now is None else now
        state = self.machine.state
        self.voice.over(now)
        if self.echo is not None:
            self.echo.quiet(now)
        self.motions = Motions(self.vocabulary, self.model)  # a restarted app plays none of ours
        actions: list[Action] = []
        if state in (C.ANSWERING, C.HEARING, C.HOLDING) and self.turn > self.cancelled:
            actions = self._cancel("gone", origin, stop=False)
        self.cued, self.resuming = None, False
        if state != C.IDLE:
            self.machine.move(C.IDLE, "the avatar app is gone")
        return actions

    def on_stage_back(self) -> list[Action]:
        """A pipeline process (re)started, or the broker did: the latest cancel may never have
        reached it, and a bus event is not sent twice by itself."""
        return [self.last_cancel] if self.last_cancel is not None else []

    def on_pipeline(self, up: bool, now: float | None = None) -> list[Action]:
        """Every pipeline stage is alive (``up``), or one is not (logged by the caller)."""
        now = time.monotonic() if now is None else now
        was, self.pipeline_up = self.pipeline_up, up
        actions: list[Action] = []
        if was and not up and self.cfg["notify_unreachable"]:
            actions.append(Write("NOTIFY_SHOW", [self.cfg["unreachable_text"]]))
        if up and self.machine == C.HOLDING:
            actions += self._release_held(now)
        return actions + self._resume_when_quiet(now)

    def on_llm_turn(self, llm_turn: int, now: float | None = None) -> list[Action]:
        """The llm's heartbeat names the turn it is on. Still behind ours a while after we sent
        it: our ``turn_start`` was lost (the broker or the llm restarted in between); send it again."""
        now = time.monotonic() if now is None else now
        if llm_turn >= self.epoch and self.turn < self.epoch:  # before our first turn: see _behind_clock
            return self._behind_clock(llm_turn)
        if (not self.answering or llm_turn >= self.turn or "llm" in self.done_by or self.next_segment
                or self.resuming or now - self.sent_at < RESEND_AFTER):
            return []
        self.sent_at = now
        log.info("turn %d: the llm has not received it (it is on turn %d): sending it again", self.turn, llm_turn)
        return [Publish("turn_start", self.start_body, self.turn, self.asked_origin)]

    def _behind_clock(self, llm_turn: int) -> list[Action]:
        """The llm is on a turn id above every id this bridge would use: the last bridge's ids ran
        ahead of this machine's clock (it was set back). Ours start above it, and everything up
        to it is cancelled, or the stages would take our turns for old ones and drop them."""
        log.warning("the clock is behind the last bridge's turn ids (the llm is on turn %d): this bridge's turns "
                    "start above it", llm_turn)
        self.epoch = llm_turn + 1
        self.last_cancel = Publish("cancel", {"reason": "gone", "stopped": False, "spoken": []}, llm_turn)
        return [self.last_cancel]

    def segment_gap(self, turn: int, segment: int) -> bool:
        """A speech command of the current turn whose segment index is past the next one due:
        an earlier segment was lost on the way (the broker died holding it)."""
        return turn == self.turn and segment > self.next_segment

    def written_already(self, turn: int, segment: int) -> bool:
        """A speech command of the current turn for a segment written already: the sequencer's
        plain copy of a cue that its ``SYNTH_EVENT_STOP`` released just before (a race with the
        sequencer's timeout). Writing it again would say the sentence twice."""
        return turn == self.turn and segment < self.next_segment

    def on_stage_lost(self, name: str, now: float | None = None, force: bool = False) -> list[Action]:
        """Stage ``name`` died (gone, or restarted): what it held of the current turn is lost.

        Nothing of the turn said yet: it is asked again as a new turn (so no stale piece of it
        can be spoken). Something said: it ends with the failure notice, never half-spoken twice.
        ``force``: the stage itself reported the turn broken, even if its part looked done.
        """
        now = time.monotonic() if now is None else now
        if not self.answering or (name in self.done_by and not force):
            return []
        if self.total_segments is not None and self.next_segment >= self.total_segments:
            return []  # every sentence was written already: nothing of it is lost
        if self.written or self.resuming:  # something of the answer was said
            if force and name == "llm":  # a restarted llm that cannot go on with it (no [llm] prefill)
                return self._fail(f"{name} was lost in the middle of the answer", time.time())
            return self._lose(name, now)
        log.info("turn %d: %s was lost before anything was said: asking again", self.turn, name)
        actions = self._cancel("restarted", time.time())
        self._hold(self.user_text, self.asked_at, self.asked_origin)
        if self.pipeline_up:
            actions += self._release_held(now)
        return actions

    def _lose(self, name: str, now: float) -> list[Action]:
        """A stage was lost after the avatar began to answer: the llm still holds the answer (or,
        restarted, can ask for its rest). What was written stays (the avatar finishes its
        sentence); the rest of this id is dropped everywhere (``cancel`` ``lost``), and once the
        avatar is quiet and the pipeline reachable, the answer is asked for again under a new id
        (:meth:`_resume_when_quiet`, from the loop's tick, a ``SYNTH_EVENT_STOP`` or the pipeline's
        return), the sentences written so far skipped: each sentence is heard once, in order."""
        if self.resuming:
            return []
        log.info("turn %d: %s was lost after %d sentences were written: the rest follows", self.turn, name,
                 len(self.written))
        self.resuming = True
        self.next_segment, self.total_segments, self.cued = 0, None, None
        self.cancelled = self.turn
        self.last_cancel = Publish("cancel", {"reason": "lost", "stopped": False, "spoken": list(self.voice.spoken)},
                                   self.turn, time.time())
        return [self.last_cancel]

    def _resume_when_quiet(self, now: float) -> list[Action]:
        """The lost answer's rest, asked for as a new turn: once the avatar has finished what was
        written (a new SYNTH_START would cut it off) and the pipeline is reachable. ``resume`` names
        the id the answer was first asked under: the one the llm knows it by, however many ids
        of it came to nothing in a broker that died."""
        if not self.resuming or not self.answering or self.voice.audible or not self.pipeline_up:
            return []
        self.resuming = False
        self.turn = max(self.turn + 1, int(time.time() * 1000), self.epoch)
        self.next_segment, self.total_segments, self.done_by, self.cued = 0, None, set(), None
        self.progress_at = self.sent_at = now
        self.start_body = {"text": self.user_text, "resume": self.asked_turn, "heard": list(self.written)}
        return [Publish("turn_start", self.start_body, self.turn, self.asked_origin)]

    # -- transitions ---------------------------------------------------------------------
    def _recog_start(self, origin: float, now: float) -> list[Action]:
        self._settle()
        state = self.machine.state
        if state in (C.AWAY, C.HOLDING):
            return []
        if state == C.ANSWERING:
            if self.policy == "ignore":
                log.info("user speaks while the avatar answers: ignored ([turn] barge_in = ignore)")
                return []
            self.heard_at = self.heard_last = now
            if self._words_decide(now):
                log.info("turn %d: a voice while the avatar answers: it goes on until the words say whether it is "
                         "its own voice or a backchannel", self.turn)
                self.machine.move(C.HEARING, "RECOG_EVENT_START")
                return []
            actions = self._cancel("interrupted", origin)
            self.machine.move(C.LISTENING, "interrupted")
            return actions + [Write(t, a) for t, a in self.motions.listening()]
        if state == C.IDLE:
            self.heard_at = now
            self.machine.move(C.LISTENING, "RECOG_EVENT_START")
            return [Write(t, a) for t, a in self.motions.listening()]
        if state == C.HEARING:
            self.heard_last = now
            return []
        self.machine.since = time.monotonic()  # still listening: the noise timer starts again
        return []

    def _words_decide(self, now: float) -> bool:
        """Whether a voice that begins now may be the avatar's own or a backchannel, so that its
        words decide whether it interrupts: a guard is on and the avatar has begun to answer (or,
        for the echo guard, fell silent so lately that this may be the echo of its last sentence).
        Else it interrupts at once."""
        if self.echo is None and self.backchannels is None:
            return False
        if self.voice.audible or self.written:
            return True
        return self.echo is not None and now < self.voice.quiet_since + ONSET_LAG

    def _recog_stop(self, text: str, origin: float, now: float) -> list[Action]:
        self._settle()
        state = self.machine.state
        if state == C.AWAY:
            log.info("recognition result discarded: away (RECOG_EVENT_AWAY|ON)")
            return []
        if self.policy == "ignore" and (self.voice.audible or now < self.voice.quiet_since + self.echo_grace):
            log.info("recognition result discarded: the avatar is speaking or just spoke "
                     "([turn] barge_in = ignore, echo_grace = %.1f s)", self.echo_grace)
            return []
        waited_out, self.waited_out = self.waited_out, False
        if text and self._not_for_us(text, state, now, waited_out):
            if state == C.HEARING:
                self.machine.move(C.ANSWERING, "not an interruption")
                return []
            if state == C.LISTENING:
                self.machine.move(C.IDLE, "not an utterance")
                return [Write(t, a) for t, a in self.motions.end_mood()]
            return []
        if not text and state == C.HEARING:
            log.info("empty recognition result ignored: the answer goes on")
            self.machine.move(C.ANSWERING, "empty result")
            return []
        if not text:
            log.info("empty recognition result ignored")
            if state == C.LISTENING:
                self.machine.move(C.IDLE, "empty result")
            return []
        actions: list[Action] = []
        if state in ANSWER_STATES:  # a voice heard while answering whose words are for us: it interrupts now
            actions = self._cancel("interrupted" if state == C.HEARING else "superseded", origin)
        self._hold(text, now, origin)
        if self.pipeline_up:
            return actions + self._release_held(now)
        log.warning("turn %d: the pipeline is not reachable; the utterance waits for it (at most "
                    "[turn] max_age = %.0f s)", self.turn, self.cfg["max_age"])
        if self.cfg["notify_unreachable"] and time.monotonic() >= self.quiet_until:
            actions.append(Write("NOTIFY_SHOW", [self.cfg["unreachable_text"]]))
        return actions

    def _not_for_us(self, text: str, state: C, now: float, waited_out: bool) -> bool:
        """A recognition result to drop (logged): the avatar's own voice ([turn] echo_guard), or a
        backchannel while it answers ([turn] backchannels)."""
        if self.echo is not None:
            score, like = self.echo.match(text, self.heard_at if state in (C.LISTENING, C.HEARING) else None, now,
                                          enough=self.echo_similarity)
            if score >= self.echo_similarity:
                self.dropped["echo"] += 1
                log.info("recognition result %r dropped: the avatar's own voice (%.2f like %r, [turn] echo_guard)",
                         text[:40], score, like[:40])
                return True
        if self.backchannels is None or text not in self.backchannels:
            return False
        if state == C.HEARING or (state == C.ANSWERING and self.voice.audible):
            self.dropped["backchannel"] += 1
            log.info("turn %d: %r is a backchannel: the answer goes on", self.turn, text[:40])
            return True
        if waited_out:
            log.warning("%r came after [turn] backchannel_wait = %.1f s and interrupted the avatar: raise it if "
                        "the recognizer is this slow", text[:40], self.backchannel_wait)
        return False

    def say_own(self, words: str, origin: float, now: float | None = None) -> list[Action]:
        """The avatar says ``words`` of its own (the persona's greeting when it starts, a
        reminder when its timer ends) as a turn, once the pipeline is up; only when nothing else
        is going on (a user who already spoke comes first: nothing is done, ask again later)."""
        now = time.monotonic() if now is None else now
        if not words or self.machine != C.IDLE:
            return []
        self._hold("", now, origin)
        self.say = words
        log.info("turn %d: words of its own, %s", self.turn, "now" if self.pipeline_up else "once the pipeline is up")
        return self._release_held(now) if self.pipeline_up else []

    def on_input(self, body: dict[str, Any], origin: float, now: float | None = None) -> list[Action]:
        """An input process's request (bus ``input``; :data:`broker.wire.KINDS` is its spec):
        carried out, or refused, and answered with ``input_result`` either way."""
        now = time.monotonic() if now is None else now
        ident = str(body.get("id", ""))[:64]
        action, when = body.get("action"), body.get("when", "now")
        text = " ".join(str(body.get("text", "")).split())[:INPUT_MAX_TEXT]  # one line: it is spoken

        def result(reason: str = "", turn: int = 0) -> list[Action]:
            return [Publish("input_result", {"id": ident, "ok": not reason, "reason": reason, "turn": turn}, turn)]

        if action not in INPUT_ACTIONS or when not in ("now", "idle"):
            log.info("input refused: not a request this bridge knows (%r, %r)", str(action)[:20], str(when)[:20])
            return result("invalid")
        self._settle()
        state = self.machine.state
        if action == "stop":
            if state in ANSWER_STATES:
                stopped = self.turn
                actions = self._cancel("stopped", origin) + [Write(t, a) for t, a in self.motions.end_mood()]
                self.machine.move(C.IDLE, "stopped")
                return actions + result(turn=stopped)
            if state == C.HOLDING:
                log.info("turn %d: the held utterance is dropped: stopped", self.turn)
                self.cancelled = self.turn
                self.machine.move(C.IDLE, "stopped")
            return result()
        if not text:
            return result("empty")
        if state == C.AWAY:
            return result("away")
        if when == "idle" and state != C.IDLE:
            return result("busy")
        actions = self._cancel("superseded", origin) if state in ANSWER_STATES else []
        self._hold(text if action == "ask" else "", now, origin)
        self.say = text if action == "say" else ""
        self.came_from = {"source": str(body.get("source", ""))[:32], "from": str(body.get("from", ""))[:64]}
        log.info("turn %d: %s from input %s", self.turn, action, self.came_from["source"] or "?")
        if self.pipeline_up:
            actions += self._release_held(now)
        return actions + result(turn=self.turn)

    def _hold(self, text: str, asked_at: float, origin: float) -> None:
        """Open a new turn for ``text``, not yet sent to the pipeline."""
        self.turn = max(self.turn + 1, int(time.time() * 1000), self.epoch)
        self.user_text, self.asked_at, self.asked_origin = text, asked_at, origin
        self.voice.spoken = []
        self.resuming, self.written = False, []
        self.next_segment = 0
        self.total_segments = None
        self.done_by = set()
        self.cued = None
        self.say = ""
        self.came_from = {}
        self.machine.move(C.HOLDING, f"turn {self.turn}")

    def _release_held(self, now: float) -> list[Action]:
        if now - self.asked_at > self.cfg["max_age"]:
            return self._fail(f"the utterance is older than [turn] max_age = {self.cfg['max_age']} s",
                              self.asked_origin)
        self.progress_at = self.sent_at = now
        self.motions.think_from(now)
        self.machine.move(C.ANSWERING, f"turn {self.turn} sent")
        self.asked_turn = self.turn
        self.start_body = {"text": self.user_text, **({"say": self.say} if self.say else {}), **self.came_from}
        return [Publish("turn_start", self.start_body, self.turn, self.asked_origin)]

    def _fail(self, why: str, origin: float) -> list[Action]:
        """End the current turn with the failure notice (spoken by the bridge itself)."""
        log.error("turn %d failed: %s", self.turn, why)
        actions: list[Action] = []
        if self.answering:
            actions = self._cancel("failed", origin, stop=False)
        else:  # held, never sent: nothing to stop, but nothing of it may run later either
            self.cancelled = self.turn
        actions += [Write(t, a) for t, a in self.motions.end_mood()]
        notice = self.cfg["failure_notice"] if not self.say else ""  # nobody asked for a greeting
        if notice:  # a SYNTH_START cuts off whatever the model says: no SYNTH_STOP needed first
            actions.append(Write("SYNTH_START", [self.model, self.voice_alias, notice]))
        self.machine.move(C.IDLE, "failed")
        return actions

    def _away(self, on: bool, origin: float) -> list[Action]:
        state = self.machine.state
        if on and state != C.AWAY:
            actions = self._cancel("away", origin) if state in ANSWER_STATES else []
            actions += [Write(t, a) for t, a in self.motions.end_mood()]
            if state == C.HOLDING:
                log.info("turn %d: the held utterance is dropped: away", self.turn)
            self.machine.move(C.AWAY, "RECOG_EVENT_AWAY|ON")
            return actions
        if not on and state == C.AWAY:
            self.machine.move(C.IDLE, "RECOG_EVENT_AWAY|OFF")
        return []

    def _cancel(self, reason: str, origin: float, stop: bool = True) -> list[Action]:
        actions: list[Action] = []
        stopped = self.voice.audible
        if stopped and stop:
            actions.append(Write("SYNTH_STOP", [self.model]))
        actions += [Write(t, a) for t, a in self.motions.stop_gesture()]  # the gesture goes with the speech
        if stopped:
            self.voice.outstanding = None
        self.cued = None
        self.resuming = False
        self.cancelled = self.turn
        log.info("turn %d cancelled (%s)%s", self.turn, reason, ": SYNTH_STOP sent" if stopped and stop else "")
        self.last_cancel = Publish("cancel", {"reason": reason, "stopped": stopped, "spoken": list(self.voice.spoken)},
                                   self.turn, origin)
        actions.append(self.last_cancel)
        return actions
