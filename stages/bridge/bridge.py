"""bridge: MMDAgent-EX's plugin process; its stdin/stdout to and from the bus.

Started by MMDAgent-EX as ``Plugin_AnyScript_Command=mmdagent-llm bridge``:
- stdin is read continuously, as bytes: MMDAgent-EX writes to us with a blocking write from
  its main loop, so a bridge that stopped reading would freeze the avatar. Where a pipe can be
  polled (not Windows) it is read in the stage's own loop, beside the bus, so a line is acted
  on (a cued ``SYNTH_START`` written from a ``SYNTH_EVENT_STOP``) with no thread in between;
  elsewhere a reader thread passes lines on. Each line is decoded as UTF-8 (invalid bytes become U+FFFD), a NUL byte becomes
  U+FFFD too (not dropped: the line keeps showing that something was there, and no NUL
  reaches a topic or a C reader of the bus), a trailing CR is dropped, and it is published
  on the bus as an ``mmd`` event, whatever its type, our own echoed output and a line with
  an empty type (``|...``) included. Empty lines are skipped. A line over
  :data:`MAX_IN_BYTES` is cut, the rest of it skipped, and reading goes on.
- bad input never stops the bridge: each problem (:data:`BAD_INPUT` reasons) is logged the
  first time only, then counted; the heartbeat's ``info`` carries the counts as ``bad_input``.
- a ``command`` is written only if its type is in ``[bridge] allow_types`` and its sender in
  ``[bridge] allow_senders`` (by default what the pipeline itself sends: speech and notices
  from the sequencer). Anything else, ``EXECUTE`` (which starts programs on Windows),
  ``KEY_POST``, ``PLUGIN_*``, ``MODEL_*``, ``KEYVALUE_SET``..., is refused: logged the first
  time per type or sender, counted in the heartbeat's ``refused``.
- each other ``command`` from the ``commands`` queue is written as one line and flushed, through
  :func:`stages.bridge.mmd_line.format_line`, which removes ``|``, CR, LF and control characters
  from every field and caps the line at 2000 bytes (a cue, ``after`` set, waits in turn control
  for the speech playing to end). Nothing else is ever written to stdout; logs go to stderr.
- turn control (:mod:`stages.bridge.turns`) sees every line first: it opens turns (``turn_start``),
  cancels them (``cancel``), writes ``SYNTH_STOP`` itself on an interruption, keeps
  ``SYNTH_START`` of a cancelled or old turn from being written, and drops recognition results
  that are the avatar's own voice or a backchannel (``[turn] echo_guard``, ``backchannels``;
  counted in the heartbeat's ``dropped``).
- end of input (MMDAgent-EX closed the pipe) ends the process with status 0.
- once on the bus, it has the avatar say the persona's greeting (``[persona] greet``; see
  :mod:`stages.persona`), as a turn of its own; likewise a reminder of the llm's ``set_timer``
  tool (a ``timer`` event) when MMDAgent-EX's ``TIMER_EVENT_STOP`` of its alias comes, at the
  first moment the avatar is free.

This is the one process MMDAgent-EX will not restart, so it stays small and imports no LLM code.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import BinaryIO, Callable, NoReturn

import zmq

from broker import wire
from stages import persona
from stages.bridge import mmd_line
from broker.runtime import Stage, request_stop, setup_logging
from broker.liveness import PIPELINE
from stages.bridge.turns import Action, Publish, TurnController, Write
from stages.states import ConversationState
from stages.expression import Vocabulary
from stages.latency import TurnClock

log = logging.getLogger("mmdagent_llm")

MAX_IN_BYTES = 64 * 1024  # longer stdin lines are cut; MMDAgent-EX itself never sends > 2 KiB
#: what is counted in the heartbeat's ``bad_input`` (and logged once)
BAD_INPUT = ("invalid UTF-8", "NUL bytes", "line too long", "empty line", "empty type")
MAX_REFUSAL_KINDS = 50  # distinct refused types/senders counted one by one; the rest as "other"
LAST_TURNS = 5  # turns whose latencies the heartbeat carries (``status`` shows them)
TIMER_ALIAS = "mmdagent_llm_timer_"  # MMDAgent-EX timer aliases of set_timer's reminders
MAX_REMINDERS = 20  # reminders pending at once; the oldest is forgotten past it


class Bridge(Stage):
    name = "bridge"
    topics = ("spoken", "broken", "turn_result", "turn_end", "token", "segment", "speech",  # turn progress
              "notice", "timer", "input")
    input_queue = "commands"

    def __init__(self, cfg, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
        super().__init__(cfg)
        self.stdin = stdin or sys.stdin.buffer
        self.stdout = stdout or sys.stdout.buffer
        self.lines_in = 0
        self.lines_out = 0
        self.bad_input: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.allow_types = frozenset(cfg["bridge"]["allow_types"])
        self.allow_senders = frozenset(cfg["bridge"]["allow_senders"])
        self._bad_lock = threading.Lock()  # the stdin thread counts cut lines
        self.turns = TurnController(cfg["turn"], cfg["speech"]["model"], cfg["speech"]["voice"],
                                    startup_grace=cfg["bus"]["peer_timeout"], vocabulary=Vocabulary(cfg),
                                    speech_limits=cfg["speech"])
        self.clock = TurnClock()
        self.greeting = greeting_of(cfg)
        self.reminders: dict[str, str] = {}  # timer alias -> what to say when it ends (set_timer)
        self.timers = 0  # reminders set: their aliases are numbered
        self.due: list[str] = []  # reminders whose timer ended, waiting for a quiet moment
        self._inbox: zmq.Socket | None = None
        self._splitter = mmd_line.LineSplitter(MAX_IN_BYTES)
        self._open_input(stdin is not None)

    def _open_input(self, given: bool) -> None:
        """Start reading MMDAgent-EX: in this loop where the pipe can be polled, else on a thread."""
        if not given and sys.platform != "win32":
            self.extra[self.stdin.fileno()] = self._read_fd
            return
        self._inbox = self.ctx.socket(zmq.PAIR)
        address = f"inproc://bridge-stdin-{id(self)}"
        self._inbox.bind(address)
        self.extra[self._inbox] = self._on_stdin
        self._reader = threading.Thread(target=self._read_stdin, args=(address,), name="stdin", daemon=True)
        self._reader.start()

    def _read_fd(self) -> None:
        try:
            data = os.read(self.stdin.fileno(), MAX_IN_BYTES)
        except OSError as exc:
            log.error("stdin read failed: %s", exc)
            data = b""
        if not data:
            for line in self._splitter.end():
                self._take(line)
            self._take(b"")
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Bytes read from MMDAgent-EX: each line they complete is taken."""
        for item in self._splitter.feed(data):
            if isinstance(item, int):
                self._bad("line too long", f"over {MAX_IN_BYTES} bytes: cut, {item} more bytes skipped")
            elif not self._take(item):
                return

    def _read_stdin(self, address: str) -> None:
        out = self.ctx.socket(zmq.PAIR)
        out.connect(address)
        try:
            while True:
                chunk = self.stdin.readline(MAX_IN_BYTES)
                if not chunk:
                    break
                if not chunk.endswith(b"\n"):
                    skipped = self._skip_rest_of_line()
                    if skipped:
                        self._bad("line too long", f"over {MAX_IN_BYTES} bytes: cut, {skipped} more bytes skipped")
                out.send(chunk)
        except (OSError, ValueError) as exc:
            log.error("stdin read failed: %s", exc)
        finally:
            out.send(b"")  # end of input
            out.close(linger=1000)

    def _skip_rest_of_line(self) -> int:
        skipped = 0
        while True:
            more = self.stdin.readline(MAX_IN_BYTES)
            skipped += len(more)
            if not more or more.endswith(b"\n"):
                return skipped

    def _on_stdin(self) -> None:
        while self._inbox is not None and self._inbox.poll(0):
            if not self._take(self._inbox.recv()):
                return

    def _take(self, raw: bytes) -> bool:
        """One line from MMDAgent-EX (``b""``: the end of input); False once input has ended."""
        if raw == b"":
            self._input_ended()
            return False
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            self._bad("invalid UTF-8", "undecodable bytes replaced by U+FFFD")
        if "\x00" in text:
            text = text.replace("\x00", "\ufffd")
            self._bad("NUL bytes", "replaced by U+FFFD")
        text = text.rstrip("\n").rstrip("\r")
        if not text:
            self._bad("empty line", "skipped")
            return True
        if text.startswith("|"):
            self._bad("empty type", "published with type \"\"")
        self.lines_in += 1
        arrived = time.time()
        msg_type, args = mmd_line.parse_line(text)
        self._carry_out(self.turns.on_line(msg_type, args, arrived), arrived,
                        then=lambda: self.publish("mmd", {"type": msg_type, "args": args}, origin=arrived))
        if msg_type == "TIMER_EVENT_STOP" and args[:1] and args[0] in self.reminders:
            self.due.append(self.reminders.pop(args[0]))
            self._remind()
        return True

    def _input_ended(self) -> None:
        log.info("end of input from MMDAgent-EX: exiting")
        request_stop()

    def _carry_out(self, actions: list[Action], origin: float, then: Callable[[], None] | None = None) -> None:
        """Writes first (SYNTH_STOP is what the user waits for), then ``then``, then bus events."""
        for action in actions:
            if isinstance(action, Write) and action.type.startswith("MOTION_") and action.type not in self.allow_types:
                self._refuse(f"type {action.type}", f"a {action.type!r}: not in [bridge] allow_types (no motions)")
            elif isinstance(action, Write):
                self._write(action.type, action.args, self.turns.turn, origin)
        if then is not None:
            then()
        for action in actions:
            if isinstance(action, Publish):
                if action.kind == "turn_start":
                    self.clock.start(action.turn, action.origin if action.origin is not None else origin)
                self.publish(action.kind, action.body, turn=action.turn, origin=action.origin)

    def on_work(self, env: wire.Envelope) -> None:
        if env.kind != "command":
            log.warning("ignored a %s on the commands queue", env.kind)
            return
        msg_type = env.body.get("type")
        args = env.body.get("args")
        if not isinstance(msg_type, str) or not isinstance(args, list):
            log.warning("ignored a command without type/args")
            return
        if env.sender not in self.allow_senders:
            self._refuse(f"sender {env.sender[:40]}", f"a {msg_type[:40]!r} from {env.sender[:40]!r}, which is not in "
                         f"[bridge] allow_senders")
            return
        if msg_type not in self.allow_types:
            self._refuse(f"type {msg_type[:40]}", f"a {msg_type[:40]!r} from {env.sender!r}: not in [bridge] allow_types")
            return
        if not self.turns.accepts(msg_type, env.turn):
            why = "cancelled" if env.turn == self.turns.turn else f"not the current turn ({self.turns.turn})"
            log.info("dropped a %s of turn %d: %s", msg_type, env.turn, why)
            return
        segment = env.body.get("segment")
        if type(segment) is int and self.turns.written_already(env.turn, segment):
            log.info("turn %d: segment %d was written already (from its cue): not again", env.turn, segment)
            return
        if type(segment) is int and self.turns.segment_gap(env.turn, segment):
            log.warning("turn %d: segment %d came where %d was due: one was lost", env.turn, segment,
                        self.turns.next_segment)
            self._carry_out(self.turns.on_stage_lost("broker", force=True), time.time())
            return
        if msg_type == "SYNTH_START":  # with its gesture; a cue (after) waits for the speech playing to end
            motion = env.body.get("motion")
            lines = [("MOTION_ADD", [str(a) for a in motion])] if isinstance(motion, list) and motion else []
            after = env.body.get("after")
            self._carry_out(self.turns.on_speech(lines + [(msg_type, [str(a) for a in args])], env.turn,
                                                 after if type(after) is int else None), env.origin)
            return
        self._write(msg_type, [str(a) for a in args], env.turn, env.origin)

    def _write(self, msg_type: str, args: list[str], turn: int, origin: float) -> None:
        line = mmd_line.format_line(msg_type, args)
        if not self._send(line):
            return
        self.lines_out += 1
        written_type, written_args = mmd_line.parse_line(line[:-1].decode("utf-8"))
        self.turns.on_written(written_type, written_args, turn)
        if written_type == "SYNTH_START":
            self.clock.mark(turn, "first_synth", time.time())
        self.publish("written", {"type": written_type, "args": written_args, "bytes": len(line) - 1},
                     turn=turn, origin=origin)

    def _send(self, line: bytes) -> bool:
        """Write one formatted line to MMDAgent-EX; False if it could not be written."""
        try:
            self.stdout.write(line)
            self.stdout.flush()
            return True
        except (BrokenPipeError, OSError, ValueError) as exc:
            log.error("stdout to MMDAgent-EX is gone (%s): exiting", exc)
            request_stop()
            return False

    def on_event(self, env: wire.Envelope) -> None:
        self.clock.observe(env)
        if env.kind == "timer":
            self._timer(env)
        elif env.kind == "input":
            self._carry_out(self.turns.on_input(env.body, env.origin), env.origin)
        elif env.kind == "notice":
            self._carry_out(self.turns.on_notice(str(env.body.get("level")), str(env.body.get("text", ""))),
                            env.origin)
        elif env.kind == "spoken":
            self.turns.on_spoken(env.turn)
            self._carry_out(self.turns.on_spoken_actions(), env.origin)
        elif env.kind == "broken":
            if env.turn == self.turns.turn:
                self._carry_out(self.turns.on_stage_lost(str(env.body.get("stage")), force=True), time.time())
        else:
            segments = env.body.get("segments") if env.kind == "turn_end" else None
            self.turns.on_progress(env.kind, env.sender, env.turn,
                                   segments=segments if type(segments) is int else None)
            if env.kind == "turn_result":
                self._carry_out(self.turns.on_result(env.turn, str(env.body.get("reason")),
                                                     str(env.body.get("cause", ""))), env.origin)

    def on_heartbeat(self, env: wire.Envelope) -> None:
        # Only a ready llm: a restarted one beats before it is ready, and a turn resent to it then
        # would race the "restarted" that its first ready beat brings (the turn asked twice).
        if env.body.get("stage") == "llm" and env.body.get("ready") is True:
            info = env.body.get("info") or {}
            if isinstance(info.get("turn"), int):
                self._carry_out(self.turns.on_llm_turn(info["turn"]), time.time())

    def on_peer(self, name: str, change: str) -> None:
        if name not in PIPELINE:
            return
        actions = self.turns.on_stage_lost(name) if change in ("gone", "restarted") else []
        if change in ("back", "restarted"):  # one first seen now is new: it holds nothing to cancel
            actions += self.turns.on_stage_back()
        missing = [n for n in self.liveness.missing() if n in PIPELINE]
        if missing and self.turns.pipeline_up:
            log.error("the pipeline is unreachable (%s down): utterances wait for it", ", ".join(missing))
        elif not missing and not self.turns.pipeline_up:
            log.info("the pipeline is reachable")
        was = self.turns.pipeline_up
        self._carry_out(actions + self.turns.on_pipeline(not missing), time.time())
        if was != self.turns.pipeline_up and self.ready:
            self._heartbeat()  # observers learn of it now, not within the next second

    def on_ready(self) -> None:
        self._carry_out(self.turns.on_ready(), time.time())
        self._greet()  # MMDAgent-EX started this bridge: the avatar has just started

    def _timer(self, env: wire.Envelope) -> None:
        """The llm's ``set_timer``: start MMDAgent-EX's timer (only its seconds and our alias go
        out); its reminder is said when ``TIMER_EVENT_STOP`` of that alias comes."""
        seconds, text = env.body.get("seconds"), str(env.body.get("text", "")).strip()
        if env.sender != "llm" or type(seconds) is not int or not 1 <= seconds <= wire.TIMER_MAX_SECONDS or not text:
            self._refuse(f"timer from {env.sender[:40]}", f"a timer from {env.sender[:40]!r} that is not the llm's "
                         f"or not 1-{wire.TIMER_MAX_SECONDS} s with a text")
            return
        if "TIMER_START" not in self.allow_types:
            self._refuse("type TIMER_START", "a reminder's TIMER_START: not in [bridge] allow_types")
            return
        if len(self.reminders) >= MAX_REMINDERS:
            del self.reminders[next(iter(self.reminders))]
        self.timers += 1
        alias = f"{TIMER_ALIAS}{self.turns.epoch}_{self.timers}"  # no two bridges' alike
        self.reminders[alias] = text[:wire.TIMER_MAX_TEXT]
        self._write("TIMER_START", [alias, str(seconds)], env.turn, env.origin)

    def _remind(self) -> None:
        """Say a due reminder, if the avatar is free (else at the next tick)."""
        if self.due and self.turns.machine == ConversationState.IDLE:
            actions = self.turns.say_own(self.due[0], time.time())
            if actions or self.turns.machine != ConversationState.IDLE:
                self.due.pop(0)
                self._carry_out(actions, time.time())

    def _greet(self) -> None:
        """The persona's greeting, as a turn of its own (``[persona] greet``)."""
        if self.greeting:
            self._carry_out(self.turns.say_own(self.greeting, time.time()), time.time())

    def next_deadline(self) -> float | None:
        own = self.turns.next_deadline()
        if self.due:  # a reminder waits for the avatar to be free: look again soon
            soon = time.monotonic() + 0.2
            return soon if own is None else min(own, soon)
        return own

    def on_tick(self, now: float) -> None:
        self._carry_out(self.turns.on_tick(now), time.time())
        self._remind()

    def _bad(self, reason: str, detail: str) -> None:
        """Count a stdin problem; log only the first of each reason (MMDAgent-EX may repeat it)."""
        with self._bad_lock:
            self.bad_input[reason] = self.bad_input.get(reason, 0) + 1
            first = self.bad_input[reason] == 1
        if first:
            log.warning("stdin: %s: %s (further ones are only counted, see the heartbeat's bad_input)",
                        reason, detail)

    def _refuse(self, key: str, detail: str) -> None:
        """Count a refused command; log only the first of each type or sender."""
        if key not in self.refused and len(self.refused) >= MAX_REFUSAL_KINDS:
            key = "other"
        self.refused[key] = self.refused.get(key, 0) + 1
        if self.refused[key] == 1:
            log.warning("refused %s (further ones are only counted, see the heartbeat's refused)", detail)

    def info(self) -> dict:
        with self._bad_lock:
            bad_input = dict(self.bad_input)
        return {"lines_in": self.lines_in, "lines_out": self.lines_out, "turn": self.turns.turn,
                "state": self.turns.machine.state.value, "pipeline": self.turns.pipeline_up, "bad_input": bad_input,
                "refused": dict(self.refused), "restarts": dict(self.liveness.restarts),
                "dropped": dict(self.turns.dropped),
                "turns": [{"turn": t.turn, **t.as_ms()} for t in self.clock.last(LAST_TURNS)]}

    def close(self) -> None:
        if self._inbox is not None:
            self._inbox.close(linger=0)


def greeting_of(cfg) -> str:
    """What the avatar says when it starts: the persona file's greeting, if ``[persona] greet``."""
    path = persona.find(cfg["persona"]["file"])
    if not cfg["persona"]["greet"] or path is None:
        return ""
    try:
        return persona.load(path).greeting.strip()
    except persona.PersonaError as exc:
        log.error("%s: no greeting", exc)
        return ""


def main(cfg) -> int:
    setup_logging("bridge")
    exit_now(Bridge(cfg).run())


def exit_now(code: int) -> NoReturn:
    """End the process after the bridge's own clean-up, skipping the interpreter's: the stdin
    thread may be blocked inside ``sys.stdin.buffer.readline``, and a normal shutdown would then
    abort with ``Fatal Python error: _enter_buffered_busy`` (status 134) on Ctrl-C."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)
