"""Expression: what a sentence's tags make the avatar do (``[expression]`` in the configuration).

The LLM starts a sentence with ``[name]``; :mod:`stages.segmenter.tags` takes the tags out of
the text and the segment carries their names. This module turns them into MMDAgent-EX fields:

- the sentence's *voice*: that of the last tag in it that sets one; with none, the answer's last
  expression's (``untagged = "keep"``) or ``neutral``'s (``"neutral"``); each answer starts from
  ``[speech] voice``;
- the sentence's *gesture*: the motion of the last tag in it that has one, as ``MOTION_ADD``
  arguments on the one alias :data:`GESTURE` (MMDAgent-EX swaps the motion of an alias that is
  playing, so a new gesture replaces the previous one instead of piling up). An untagged
  sentence plays none: the gesture is not repeated.
- the listening and thinking motions, on their own alias :data:`MOOD`, which the bridge plays
  before the answer and ends when speech begins.

Names, voices and files come from the configuration only (checked by :mod:`broker.config`:
nothing in them can break a message line or leave the content folder); the LLM only picks a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

GESTURE = "mmdagent_llm_gesture"  # motion alias of sentence gestures
MOOD = "mmdagent_llm_mood"        # motion alias of the listening and thinking motions


@dataclass(frozen=True)
class Expression:
    voice: str
    motion: list[str] | None  # MOTION_ADD arguments, or None


class Vocabulary:
    def __init__(self, cfg: dict[str, Any]) -> None:
        exp = cfg["expression"]
        self.model = cfg["speech"]["model"]
        self.default_voice = cfg["speech"]["voice"]
        self.names: dict[str, dict[str, Any]] = exp["names"]
        self.keep = exp["untagged"] == "keep"
        self.listening, self.thinking = exp["listening"], exp["thinking"]
        self.thinking_after = float(exp["thinking_after"])
        self.prompt = exp["prompt"].replace("{names}", " ".join(f"[{n}]" for n in self.names)) if exp["prompt"] else ""
        self._voice = self.default_voice

    def start_answer(self) -> None:
        """A new answer starts from the default voice."""
        self._voice = self.default_voice

    def sentence(self, tags: Sequence[str]) -> Expression:
        """The voice and gesture of the answer's next sentence, whose tags are ``tags`` (known names)."""
        entries = [self.names[t] for t in tags if t in self.names]
        voice = next((e["voice"] for e in reversed(entries) if "voice" in e), None)
        if voice is None:
            voice = self._voice if self.keep else self.names.get("neutral", {}).get("voice", self.default_voice)
        self._voice = voice
        name = next((t for t in reversed(tags) if self.names.get(t, {}).get("motion")), None)
        return Expression(voice, self.motion_args(name, GESTURE) if name else None)

    def motion_args(self, name: str, alias: str) -> list[str]:
        """``MOTION_ADD`` arguments playing ``name``'s motion on ``alias``."""
        e = self.names[name]
        return [self.model, alias, e["motion"], e.get("body", "PART"), e.get("play", "ONCE"), "ON", "OFF",
                f"{float(e.get('priority', 0)):g}"]

    def motion_files(self) -> dict[str, str]:
        """name -> motion file, for every name that has one."""
        return {n: e["motion"] for n, e in self.names.items() if e.get("motion")}
