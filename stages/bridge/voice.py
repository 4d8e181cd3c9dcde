"""What the bridge knows of the avatar's voice (one model's speech), from the lines it wrote and read.

MMDAgent-EX says when a speech starts (``SYNTH_EVENT_START``) and ends (``SYNTH_EVENT_STOP``),
except when it says nothing at all (a voice alias the content does not define): so the speech in
progress also ends by a deadline, :meth:`Voice.deadline`, as the sequencer's does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Voice:
    """One model's speech as the bridge last saw it."""
    speaking: bool = False           # SYNTH_EVENT_START came, SYNTH_EVENT_STOP not yet
    outstanding: str | None = None   # text of our SYNTH_START not yet ended by SYNTH_EVENT_STOP
    spoken: list[str] = field(default_factory=list)  # current turn's segments that started
    quiet_since: float = 0.0         # monotonic time the last speech ended
    since: float = 0.0               # monotonic time of the last SYNTH_START written or SYNTH_EVENT_START read

    @property
    def audible(self) -> bool:
        return self.speaking or self.outstanding is not None

    def deadline(self, limits: dict[str, Any] | None) -> float | None:
        """When the speech in progress counts as over though no event said so: MMDAgent-EX sends
        nothing at all for a ``SYNTH_START`` with an unknown voice (``[speech] start_timeout``), and
        the end of a speech is bounded as the sequencer bounds it."""
        if limits is None or not self.audible:
            return None
        if not self.speaking:
            return self.since + limits["start_timeout"]
        return self.since + limits["stop_timeout_base"] + limits["stop_timeout_per_char"] * len(self.outstanding or "")

    def over(self, now: float) -> None:
        self.speaking, self.outstanding, self.quiet_since = False, None, now
