"""An input that asks the avatar only when it is free: the shell shared by comments and idle talk.

:class:`Asker` is a :class:`broker.runtime.Stage` that watches the bus for what keeps the avatar
busy (:class:`stages.inputs.activity.Activity`), and when it has been quiet long enough
(:meth:`Asker.due`, the subclass's rule) publishes one ``input`` (``action = "ask"``, ``when =
"idle"``: the bridge refuses it, ``busy``, if the user or a turn came first) and waits for its
``input_result`` before asking anything else:

- ``ok``: a turn of its own has begun; the subclass is told (:meth:`Asker.on_result`).
- ``busy`` or ``away``: the avatar was not free after all; the subclass keeps what it asked
  for, and asks again when the bus shows the avatar free, and not before :data:`RETRY` seconds.
- no answer within :data:`ANSWER_WAIT` seconds (no bridge, or it was restarting): the same.

Every wait has a deadline (:meth:`Asker.next_deadline`), so the process sleeps in its poll
between events and wakes only when something is due.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from broker import config as config_mod
from broker import wire
from broker.runtime import Stage
from stages.inputs.activity import Activity

log = logging.getLogger("mmdagent_llm")

ANSWER_WAIT = 3.0  # seconds for the bridge's input_result
RETRY = 1.0        # seconds after a refusal before asking again


@dataclass
class Asked:
    """An ``input`` published and not answered yet."""
    id: str
    what: Any          # the subclass's own (the comment asked about)
    sent_at: float     # monotonic
    deadline: float
    turn: int = 0      # the turn the bridge opened for it (once it said ok)


class Asker(Stage):
    topics = ("turn_start", "spoken", "turn_result", "cancel", "input_result", "mmd.RECOG_EVENT_")
    watches_peers = False  # the bridge's answers are all it needs of the others

    def __init__(self, cfg: config_mod.Config) -> None:
        super().__init__(cfg)
        self.activity = Activity(cfg["turn"]["listen_timeout"], time.monotonic())
        self.asked: Asked | None = None
        self.retry_at = 0.0
        self._ids = itertools.count(1)

    # -- what a subclass decides -----------------------------------------------------------
    def due(self, now: float, quiet_since: float) -> float | None:
        """When to ask next, the avatar quiet since ``quiet_since`` (monotonic); None: nothing to ask."""
        return None

    def next_ask(self, now: float) -> tuple[str, str, Any] | None:
        """``(text, from, what)`` to ask now, or None after all."""
        return None

    def on_result(self, asked: Asked, reason: str, now: float) -> None:
        """What came of ``asked``: "" (a turn began), ``busy``, ``away``, ``no answer``, or another refusal."""

    # -- the machinery ---------------------------------------------------------------------
    def on_event(self, env: wire.Envelope) -> None:
        now = time.monotonic()
        if env.kind != "input_result":
            self.activity.on_event(env, now)
            return
        asked = self.asked
        if asked is None or env.body.get("id") != asked.id:
            return  # another input's
        self.asked = None
        asked.turn = env.body.get("turn") if type(env.body.get("turn")) is int else 0
        reason = "" if env.body.get("ok") else str(env.body.get("reason", "refused"))[:40]
        if reason:
            self.retry_at = now + RETRY
        self.on_result(asked, reason, now)

    def on_tick(self, now: float) -> None:
        if self.asked is not None and now >= self.asked.deadline:
            asked, self.asked = self.asked, None
            self.retry_at = now + RETRY
            log.warning("no answer from the bridge within %.0f s: asking again later", ANSWER_WAIT)
            self.on_result(asked, "no answer", now)
        if not self.ready or self.asked is not None or now < self.retry_at:
            return
        quiet = self.activity.quiet_since(now)
        due = self.due(now, quiet) if quiet is not None else None
        if due is None or now < due:
            return
        ask = self.next_ask(now)
        if ask is None:
            self.retry_at = now + RETRY  # due, yet nothing after all: no deadline in the past to spin on
            return
        text, whom, what = ask
        self.asked = Asked(f"{self.name}-{os.getpid()}-{next(self._ids)}", what, now, now + ANSWER_WAIT)
        self.publish("input", {"action": "ask", "text": text, "when": "idle", "id": self.asked.id,
                               "source": self.name, "from": whom})

    def next_deadline(self) -> float | None:
        now = time.monotonic()
        quiet = self.activity.quiet_since(now)  # first: it lets spans that ran out end, so no deadline is past
        times = [self.activity.next_change()]
        if self.asked is not None:
            times.append(self.asked.deadline)
        elif self.ready:
            due = self.due(now, quiet) if quiet is not None else None
            if due is not None:
                times.append(max(due, self.retry_at))
        return min((t for t in times if t is not None), default=None)
