"""bridge: MMDAgent-EX's plugin process; its stdin/stdout to and from the bus.

Started by MMDAgent-EX as ``Plugin_AnyScript_Command=mmdagent-llm bridge``:
- stdin is read on its own thread, continuously, as bytes: MMDAgent-EX writes to us with a
  blocking write from its main loop, so a bridge that stopped reading would freeze the
  avatar. Each line is decoded as UTF-8 (invalid bytes become U+FFFD, logged), a trailing
  CR is dropped, and it is published on the bus as an ``mmd`` event, whatever its type,
  our own echoed output included. A line over :data:`MAX_IN_BYTES` is cut (logged), the
  rest of it skipped, and reading goes on.
- each ``command`` from the ``commands`` queue is written as one line and flushed, through
  :func:`stages.mmd_line.format_line`, which removes ``|``, CR, LF and control characters
  from every field and caps the line at 2000 bytes. Nothing else is ever written to stdout;
  logs go to stderr.
- turn control (:mod:`stages.turns`) sees every line first: it opens turns (``turn_start``),
  cancels them (``cancel``), writes ``SYNTH_STOP`` itself on an interruption, and keeps
  ``SYNTH_START`` of a cancelled or old turn from being written.
- end of input (MMDAgent-EX closed the pipe) ends the process with status 0.

This is the one process MMDAgent-EX will not restart, so it stays small and imports no LLM code.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import BinaryIO

import zmq

from broker import wire
from stages import mmd_line
from stages.runtime import Stage, request_stop, setup_logging
from stages.turns import Publish, TurnController, Write

log = logging.getLogger("mmdagent_llm")

MAX_IN_BYTES = 64 * 1024  # longer stdin lines are cut; MMDAgent-EX itself never sends > 2 KiB


class Bridge(Stage):
    name = "bridge"
    topics = ("spoken",)
    input_queue = "commands"

    def __init__(self, cfg, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
        super().__init__(cfg)
        self.stdin = stdin or sys.stdin.buffer
        self.stdout = stdout or sys.stdout.buffer
        self.lines_in = 0
        self.lines_out = 0
        t = cfg["turn"]
        self.turns = TurnController(t["barge_in"], t["echo_grace"], t["listen_timeout"], cfg["speech"]["model"])
        self._inbox = self.ctx.socket(zmq.PAIR)
        address = f"inproc://bridge-stdin-{id(self)}"
        self._inbox.bind(address)
        self.extra[self._inbox] = self._on_stdin
        self._reader = threading.Thread(target=self._read_stdin, args=(address,), name="stdin", daemon=True)
        self._reader.start()

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
                        log.warning("stdin line over %d bytes: cut, %d more bytes skipped", MAX_IN_BYTES, skipped)
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
        while self._inbox.poll(0):
            raw = self._inbox.recv()
            if raw == b"":
                log.info("end of input from MMDAgent-EX: exiting")
                request_stop()
                return
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                log.warning("stdin line is not valid UTF-8: undecodable bytes replaced by U+FFFD")
            text = text.rstrip("\n").rstrip("\r")
            if not text:
                continue
            self.lines_in += 1
            arrived = time.time()
            msg_type, args = mmd_line.parse_line(text)
            actions = self.turns.on_line(msg_type, args, arrived)
            for action in actions:  # SYNTH_STOP before anything else: it is what the user waits for
                if isinstance(action, Write):
                    self._write(action.type, action.args, self.turns.turn, arrived)
            self.publish("mmd", {"type": msg_type, "args": args}, origin=arrived)
            for action in actions:
                if isinstance(action, Publish):
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
        if not self.turns.accepts(msg_type, env.turn):
            log.info("dropped a %s of turn %d: not the current turn (%d)", msg_type, env.turn, self.turns.turn)
            return
        self._write(msg_type, [str(a) for a in args], env.turn, env.origin)

    def _write(self, msg_type: str, args: list[str], turn: int, origin: float) -> None:
        line = mmd_line.format_line(msg_type, args)
        try:
            self.stdout.write(line)
            self.stdout.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            log.error("stdout to MMDAgent-EX is gone (%s): exiting", exc)
            request_stop()
            return
        self.lines_out += 1
        written_type, written_args = mmd_line.parse_line(line[:-1].decode("utf-8"))
        self.turns.on_written(written_type, written_args)
        self.publish("written", {"type": written_type, "args": written_args, "bytes": len(line) - 1},
                     turn=turn, origin=origin)

    def on_event(self, env: wire.Envelope) -> None:
        if env.kind == "spoken":
            self.turns.on_spoken(env.turn)

    def next_deadline(self) -> float | None:
        return self.turns.next_deadline()

    def on_tick(self, now: float) -> None:
        self.turns.on_tick(now)

    def info(self) -> dict:
        return {"lines_in": self.lines_in, "lines_out": self.lines_out, "turn": self.turns.turn,
                "state": self.turns.machine.state.value}

    def close(self) -> None:
        self._inbox.close(linger=0)


def main(cfg) -> int:
    setup_logging("bridge")
    return Bridge(cfg).run()
