"""``mmdagent-llm observe captions``: subtitles inside the MMDAgent-EX window.

What it sends (through the ``commands`` queue and the bridge, like every line to MMDAgent-EX;
the bridge's default ``[bridge] allow_senders``/``allow_types`` admit it):

- ``CAPTION_SETSTYLE|<style>|<font>|<color>|<edge1>|<edge2>|<basecolor>`` (6 arguments, the
  only other count MMDAgent-EX takes being 3) before the first caption, and again after the
  bridge was restarted (a new pid: perhaps a new MMDAgent-EX, which has no styles).
- ``CAPTION_START|mmdagent-llm|<style>|<text>|<size>|<position>|<height>|<frames>`` (exactly 7
  arguments) when a sentence's ``SYNTH_EVENT_START`` came (the sequencer's ``speech``
  ``started``). ``frames`` (30 = 1 s) is the longest the sentence may take to speak, so a
  caption goes away by itself even if this observer dies.
- ``CAPTION_STOP|mmdagent-llm`` when its ``SYNTH_EVENT_STOP`` came, or it was cut off.
- with ``[captions] show_user``: the user's utterance as ``CAPTION_START|mmdagent-llm-user|...``
  for ``user_seconds``, at its own height; for a turn a live-stream comment opened, the comment
  as ``<viewer>: <comment>``, and nothing for one the idle input opened
  (:func:`stages.comment_prompt.user_line`).

The observer follows the sequencer's events, so it lags the speech by a few hops: on a loaded
machine a caption may come on a moment after its sentence started, or even after it ended (a
short one), and go off after the next sentence started. It never comes on before its sentence
started nor goes off before it ended (or was cut off), and each caption goes off before the
next comes on.

Text is made safe by :func:`caption_text`. An event older than :data:`STALE` seconds (this
process was stopped, then resumed) is not shown: a late caption would belong to other speech.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata

from broker import config as config_mod
from broker import wire
from broker.runtime import Stage, setup_logging
from stages.comment_prompt import user_line
from stages.observers.line_breaks import wrap

log = logging.getLogger("mmdagent_llm")

ALIAS = "mmdagent-llm"
USER_ALIAS = "mmdagent-llm-user"
FPS = 30  # CAPTION_START's duration is in frames
STALE = 2.0
MAX_TEXT_BYTES = 1500  # the whole line stays under the bridge's 2000-byte cap
POSITIONS = ("CENTER", "LEFT", "RIGHT")
_COLOR = re.compile(r"^\s*-?\d+(\.\d+)?(\s*,\s*-?\d+(\.\d+)?)*\s*$")


def caption_text(text: str, line_chars: int, max_lines: int) -> str:
    """``text`` as one CAPTION_START text argument.

    - control characters, CR, LF and tabs become spaces, runs of spaces one space;
    - ``|`` (it would change the argument count: nothing shown) becomes ``｜``, ``"`` (it
      would end the quoting) ``”`` and ``\\`` (it could join our ``\\n``) ``＼``;
    - lines are wrapped at ``line_chars`` full-width characters (two half-width ones count as
      one) by the Japanese line-breaking rules, Latin words kept whole
      (:func:`stages.observers.line_breaks.wrap`: a line may be up to two characters longer
      where closing marks or the text's last characters stay on it), and joined with ``\\n``,
      MMDAgent-EX's line break;
    - at most ``max_lines`` lines and :data:`MAX_TEXT_BYTES` bytes: the rest becomes ``…``;
    - text with a space is wrapped in ``"..."``, as MMDAgent-EX requires.
    """
    cleaned = "".join(" " if unicodedata.category(c)[0] in "CZ" and c != "\u3000" else c for c in text)
    cleaned = re.sub(r" +", " ", cleaned).strip().replace("|", "｜").replace('"', "”").replace("\\", "＼")
    lines = wrap(cleaned, max(2, line_chars * 2))
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:-1] + "…"
    joined = "\\n".join(lines)
    while len(joined.encode("utf-8")) > MAX_TEXT_BYTES:
        joined = joined[:-2] + "…"
    return f'"{joined}"' if " " in joined else joined


def check(section: dict) -> None:
    """ConfigError for a ``[captions]`` value MMDAgent-EX would silently refuse."""
    for key, count in (("color", 4), ("edge", 5), ("edge2", 5), ("background", 4)):
        value = section[key]
        if not _COLOR.match(value) or len(value.split(",")) != count:
            raise config_mod.ConfigError(f"[captions] {key} = {value!r}: expected {count} numbers separated by commas")
    if section["position"] not in POSITIONS:
        raise config_mod.ConfigError(f"[captions] position = {section['position']!r}: expected one of "
                                     f"{', '.join(POSITIONS)}")
    for key in ("height", "user_height"):
        if not 0.0 <= section[key] <= 1.0:
            raise config_mod.ConfigError(f"[captions] {key} = {section[key]}: expected 0.0 to 1.0")
    if "|" in section["style"] + section["font"] or not section["style"].strip():
        raise config_mod.ConfigError("[captions] style and font must be non-empty and without '|'")


class Captions(Stage):
    name = "captions"
    topics = ("speech", "turn_start", "cancel")
    output_queue = "commands"

    def __init__(self, cfg: config_mod.Config) -> None:
        super().__init__(cfg)
        self.c = cfg["captions"]
        check(self.c)
        self.speech = cfg["speech"]
        self.styled = False
        self.showing: tuple[int, int] | None = None  # (turn, index) of the sentence on screen

    def _send(self, msg_type: str, args: list[str], turn: int = 0) -> None:
        self.push("command", {"type": msg_type, "args": args}, turn=turn)

    def _style(self) -> None:
        c = self.c
        self._send("CAPTION_SETSTYLE", [c["style"], c["font"], c["color"], c["edge"], c["edge2"], c["background"]])
        self.styled = True

    def _start(self, alias: str, text: str, height: float, seconds: float, turn: int) -> None:
        if not self.styled:
            self._style()
        shown = caption_text(text, self.c["line_chars"], self.c["max_lines"])
        self._send("CAPTION_START", [alias, self.c["style"], shown, f"{self.c['size']:g}", self.c["position"],
                                     f"{height:g}", str(max(1, round(seconds * FPS)))], turn)

    def on_event(self, env: wire.Envelope) -> None:
        if env.kind == "turn_start":
            line = user_line(env.body)  # a comment turn: "<viewer>: <comment>"; an idle turn: nothing
            if self.c["show_user"] and line and time.time() - env.ts < STALE and "resume" not in env.body:
                self._start(USER_ALIAS, line, self.c["user_height"], self.c["user_seconds"], env.turn)
            return
        if env.kind == "cancel":
            if env.body.get("reason") != "lost":  # lost: the sentence plays on, and the answer with it
                self._stop(env.turn)
            return
        if env.body.get("model") != self.speech["model"]:
            return
        state, index = env.body.get("state"), env.body.get("index")
        if state == "started":
            if time.time() - env.ts >= STALE:
                return
            text = str(env.body.get("text", ""))
            seconds = self.speech["stop_timeout_base"] + self.speech["stop_timeout_per_char"] * len(text)
            self._start(ALIAS, text, self.c["height"], seconds, env.turn)
            self.showing = (env.turn, index)
        elif state in ("finished", "interrupted", "stopped", "timeout") and self.showing == (env.turn, index):
            self._stop(env.turn)

    def _stop(self, turn: int) -> None:
        if self.showing is not None:
            self.showing = None
            self._send("CAPTION_STOP", [ALIAS], turn)

    def on_peer(self, name: str, change: str) -> None:
        # Only a new bridge process can mean a new MMDAgent-EX (it starts the bridge), whose
        # styles and captions are gone. Not "up": the bridge's first heartbeat may come up to a
        # second after this observer started and showed a caption through that very bridge;
        # forgetting it then lost the caption's CAPTION_STOP. Not "back": the same process was
        # only silent for a while (a loaded machine), and its MMDAgent-EX still shows our caption.
        if name == "bridge" and change == "restarted":
            self.styled = False
            self.showing = None


def main(cfg: config_mod.Config) -> int:
    setup_logging("captions")
    return Captions(cfg).run()
