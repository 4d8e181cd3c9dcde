"""Whether the avatar is busy, as an input process can tell from the bus: pure logic.

The bridge decides (an ``input`` with ``when = "idle"`` that comes while something is going on is
refused as ``busy``); this view only spares it requests it would refuse, and tells the inputs
how long it has been quiet (the comments' ``quiet``, the idle talk's ``after``). Busy is:

- a turn in progress: from its ``turn_start`` to its ``spoken``, its ``cancel`` (not ``lost``:
  the answer goes on under a new id), or a ``turn_result`` other than ``done`` (a failed turn is
  over for the bridge);
- the user speaking: from ``RECOG_EVENT_START`` to ``RECOG_EVENT_STOP``;
- recognition paused: ``RECOG_EVENT_AWAY|ON`` to ``|OFF``.

Each busy span also ends by itself after a while (the user's after ``[turn] listen_timeout``, as
the bridge takes it for a noise; a turn's after :data:`TURN_LIMIT` seconds with no event of it),
so an event this process missed (it was restarting) cannot keep it waiting for ever: at worst it
asks, and the bridge says ``busy``.
"""

from __future__ import annotations

from broker import wire

TURN_LIMIT = 120.0  # seconds; the bridge's own stall_timeout ends a stuck turn long before


class Activity:
    def __init__(self, listen_timeout: float, now: float) -> None:
        self.listen_timeout = listen_timeout
        self.turn = 0
        self.turn_at: float | None = None       # the current turn's last event, None when none runs
        self.listening_at: float | None = None  # RECOG_EVENT_START not yet followed by its STOP
        self.away = False
        self.quiet_at = now                     # when the last busy span ended

    def on_event(self, env: wire.Envelope, now: float) -> None:
        """A bus event: ``turn_start``, ``spoken``, ``cancel``, ``turn_result``, ``mmd.RECOG_EVENT_*``."""
        if env.kind == "turn_start":
            self.turn = max(self.turn, env.turn)
            self.turn_at = now
        elif env.kind in ("spoken", "cancel", "turn_result") and env.turn >= self.turn and self.turn_at is not None:
            ended = (env.kind == "spoken" or (env.kind == "cancel" and env.body.get("reason") != "lost")
                     or (env.kind == "turn_result" and env.body.get("reason") != "done"))
            if ended:
                self.turn_at = None
                self._quiet(now)
            else:
                self.turn_at = now
        elif env.kind == "mmd":
            kind, args = env.body.get("type"), env.body.get("args") or [""]
            if kind == "RECOG_EVENT_START":
                self._settle(now)
                self.listening_at = now
            elif kind == "RECOG_EVENT_STOP":
                self.listening_at = None
                self._quiet(now)
            elif kind == "RECOG_EVENT_AWAY":
                self.away = str(args[0]).upper() == "ON"
                self._quiet(now)

    def _quiet(self, now: float) -> None:
        self.quiet_at = now

    def _settle(self, now: float) -> None:
        """Let spans that ran out end (at the moment they ran out)."""
        if self.listening_at is not None and now - self.listening_at >= self.listen_timeout:
            self.quiet_at = max(self.quiet_at, self.listening_at + self.listen_timeout)
            self.listening_at = None
        if self.turn_at is not None and now - self.turn_at >= TURN_LIMIT:
            self.quiet_at = max(self.quiet_at, self.turn_at + TURN_LIMIT)
            self.turn_at = None

    def quiet_since(self, now: float) -> float | None:
        """Since when nothing has gone on (monotonic), or None: busy now."""
        self._settle(now)
        if self.away or self.listening_at is not None or self.turn_at is not None:
            return None
        return self.quiet_at

    def busy(self, now: float) -> bool:
        return self.quiet_since(now) is None

    def next_change(self) -> float | None:
        """When a busy span runs out by itself, if one runs (a deadline for the stage's loop)."""
        ends = [t + limit for t, limit in ((self.listening_at, self.listen_timeout), (self.turn_at, TURN_LIMIT))
                if t is not None]
        return min(ends) if ends else None
