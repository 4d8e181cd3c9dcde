"""``mmdagent-llm avatar``: the simulated MMDAgent-EX as a command, for a person at a terminal.

It starts a plugin command line the way MMDAgent-EX's Plugin_AnyScript does (no shell, the
current folder as the ``.mdf`` folder, see :mod:`stages.commands.avatar_sim`) and plays
MMDAgent-EX around it. By default the plugin is ``mmdagent-llm bridge``, which attaches to the
session's running pipeline (honcho, supervisord); ``--plugin "mmdagent-llm plugin"`` tries the
one-line plugin; any command line works, as in a ``.mdf``. Type:

- a line: the user says it (``RECOG_EVENT_START``, ``RECOG_EVENT_STOP|<line>``); said while the
  avatar speaks, it interrupts;
- ``/stop``: the user starts speaking, and says nothing (``RECOG_EVENT_START`` only);
- ``/send TYPE|args``: any message, as another plugin or the ``.fst`` would post it;
- ``/quit`` or Ctrl-D: leave (Ctrl-C too, at any moment).

Every message on MMDAgent-EX's queue is shown as the plugin receives it (its own output comes
back as an echo, as in MMDAgent-EX); ``--quiet`` shows only what the avatar says. The console
(``mmdagent-llm console``) is this same terminal with a pipeline of its own.

A line longer than one MMDAgent-EX message (2,047 bytes with ``RECOG_EVENT_STOP|``) is cut
with a note: the real recognizer's output could not be longer.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Callable, TextIO

import zmq

from broker import config as config_mod
from broker import wire
from broker.runtime import connect
from stages.commands import ctrl_c
from stages.commands.avatar_sim import MAX_MESSAGE_BYTES, SimulatedMMDAgent

try:
    import readline  # line editing, and the typed text to redraw under a new message
except ImportError:  # Windows: no readline; the prompt is redrawn without the typed text
    readline = None  # type: ignore[assignment]

PROMPT = "you> "
QUIT = ("/quit", "/exit")
RECOG = "RECOG_EVENT_STOP|"
MAX_UTTERANCE_BYTES = MAX_MESSAGE_BYTES - len(RECOG.encode()) - 1  # the newline takes one


def fit(text: str) -> tuple[str, str]:
    """``text`` cut to one MMDAgent-EX message (at a character boundary), and a note if it was."""
    data = text.encode("utf-8")
    if len(data) <= MAX_UTTERANCE_BYTES:
        return text, ""
    kept = data[:MAX_UTTERANCE_BYTES].decode("utf-8", errors="ignore")
    return kept, (f"(your line was cut to its first {len(kept)} of {len(text)} characters: MMDAgent-EX passes "
                  f"at most {MAX_MESSAGE_BYTES} bytes per message, and a longer one would arrive broken)")


class Terminal:
    """Messages printed above the prompt, which comes back (with what was typed) after each."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        self.reading = False

    def show(self, text: str) -> None:
        with self.lock:
            if self.reading and self.out.isatty():
                typed = readline.get_line_buffer() if readline is not None else ""
                self.out.write(f"\r\x1b[K{text}\n{PROMPT}{typed}")
            else:
                self.out.write(f"{text}\n")
            self.out.flush()

    def read(self) -> str | None:
        """One line typed, or None at end of input (Ctrl-D)."""
        self.reading = True
        try:
            return input(PROMPT)
        except EOFError:
            return None
        finally:
            self.reading = False


def show_bus(cfg: config_mod.Config, term: Terminal, stop: threading.Event) -> None:
    """On its own thread: what a person should know from the bus, until ``stop``: a failed
    turn's cause, an error notice (the start-up check), an interruption, what the llm carried
    over from an earlier conversation."""
    sub = connect(cfg, zmq.SUB, "events_out", ("turn_result", "notice", "cancel"))
    try:
        while not stop.is_set():
            if not sub.poll(200):
                continue
            try:
                env = wire.decode(sub.recv_multipart())
            except wire.WireError:
                continue
            if env.kind == "notice" and env.body.get("level") in ("error", "info"):
                term.show(f"  (mmdagent-llm: {str(env.body.get('text'))[:300]})")
            elif env.kind == "cancel" and env.body.get("reason") in ("interrupted", "superseded"):
                term.show("  (avatar interrupted)")
            elif env.kind == "turn_result" and env.body.get("reason") == "error":
                cause = env.body.get("cause")
                if cause in wire.CAUSES:
                    term.show(f"  (mmdagent-llm: {cause}: {wire.CAUSES[cause]})")
    finally:
        sub.close(linger=0)


def converse(avatar: SimulatedMMDAgent, term: Terminal, hint: str = "") -> int:
    """Read lines and play them to ``avatar`` until /quit or Ctrl-D; 0, or 1 if the plugin ended."""
    term.show(hint or "Type what you say to the avatar (/stop interrupts, /quit or Ctrl-D leaves).")
    while True:
        line = term.read()
        if line is None or line.strip() in QUIT:
            return 0
        if avatar.returncode is not None:
            term.show(f"  (the plugin has ended, status {avatar.returncode})")
            return 1
        text = line.strip()
        if not text:
            continue  # an empty line is not an utterance, nor a way out
        if text == "/stop":
            avatar.send("RECOG_EVENT_START")
        elif text.startswith("/send "):
            avatar.send(text[6:].strip())
        elif text.startswith("/"):
            term.show("  (commands: /stop, /send TYPE|args, /quit)")
        else:
            said, note = fit(text)
            if note:
                term.show(f"  {note}")
            avatar.send("RECOG_EVENT_START")
            avatar.send(RECOG + said)


def main(cfg: config_mod.Config, plugin: str = "", mdf_dir: Path | None = None, quiet: bool = False) -> int:
    ctrl_c.install()
    for stream in (sys.stdin, sys.stdout):
        stream.reconfigure(encoding="utf-8")  # type: ignore[union-attr]
    term = Terminal()
    command = plugin or f'"{sys.executable}" -m stages.commands.cli bridge'  # quoted: a path with spaces
    on_message: Callable[[str], None] | None = None if quiet else (lambda line: term.show(f"  | {line}"))
    avatar = SimulatedMMDAgent(command, mdf_dir=mdf_dir or Path.cwd(), voices=_voices(cfg), on_message=on_message,
                               on_speech=lambda model, text, started: term.show(f"avatar> {text}") if started else None)
    stop = threading.Event()
    threading.Thread(target=show_bus, args=(cfg, term, stop), name="bus", daemon=True).start()
    avatar.start()
    try:
        return converse(avatar, term, f"Started `{command}` as MMDAgent-EX would. Type what you say "
                                      f"(/stop interrupts, /send TYPE|args posts a message, /quit or Ctrl-D leaves).")
    finally:
        stop.set()
        avatar.close_stdin()
        if avatar.wait_exit(5) is None:
            avatar.kill()


def _voices(cfg: config_mod.Config) -> tuple[str, ...]:
    """The configured voice, and the example content's (its .ojt defines them)."""
    return (cfg["speech"]["voice"], "mei_voice_normal", "mei_voice_happy", "mei_voice_sad", "mei_voice_angry",
            "mei_voice_bashful", "slt_voice_normal")
