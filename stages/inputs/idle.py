"""``mmdagent-llm input idle``: after a while with nothing going on, the avatar talks first.

Optional, like every input: it runs only when started (``mmdagent-llm input idle``,
``supervisorctl start inputs:idle``, or its ``Procfile`` line). ``[idle]`` says when and what:

- when: the avatar has been free ``after`` seconds (no turn, nobody speaking, recognition not
  paused; :class:`stages.inputs.activity.Activity`) and ``every`` seconds have passed since it last
  talked first (:class:`Schedule`);
- what: ``prompt``, with ``{topic}`` the next of ``topics`` in turn (:func:`text`), asked as an
  ``input`` (``ask``, as if the user had said it, ``when = "idle"``: the bridge refuses it, and
  it is asked again later, if the user or anything else came first; :mod:`stages.inputs.asking`).

Captions and subtitles show nothing of the prompt as the user's line: nobody said it.
"""

from __future__ import annotations

import logging
from typing import Any

from broker import config as config_mod
from broker.runtime import setup_logging
from stages.inputs.asking import Asked, Asker

log = logging.getLogger("mmdagent_llm")


class Schedule:
    """When the avatar next talks first: ``after`` seconds quiet, ``every`` seconds apart."""

    def __init__(self, after: float, every: float) -> None:
        self.after, self.every = after, every
        self.last: float | None = None  # when it last asked (monotonic), if it did

    def due(self, quiet_since: float) -> float:
        at = quiet_since + self.after
        return at if self.last is None else max(at, self.last + self.every)

    def talked(self, at: float) -> None:
        self.last = at


def text(prompt: str, topics: list[str], n: int) -> str:
    """``prompt`` with ``{topic}`` the ``n``-th topic (round the list); no other placeholder."""
    if "{topic}" not in prompt or not topics:
        return prompt
    return prompt.replace("{topic}", topics[n % len(topics)])


class Idle(Asker):
    name = "idle"

    def __init__(self, cfg: config_mod.Config) -> None:
        super().__init__(cfg)
        self.section = cfg["idle"]
        self.schedule = Schedule(self.section["after"], self.section["every"])
        self.talks = 0

    def due(self, now: float, quiet_since: float) -> float | None:
        return self.schedule.due(quiet_since)

    def next_ask(self, now: float) -> tuple[str, str, Any] | None:
        return text(self.section["prompt"], self.section["topics"], self.talks), "", None

    def on_result(self, asked: Asked, reason: str, now: float) -> None:
        # no answer: the bridge may have taken it all the same, so it counts: never more often than every
        if reason in ("", "no answer"):
            self.schedule.talked(asked.sent_at)
        if not reason:
            self.talks += 1
            log.info("talking first (%d since start)", self.talks)

    def info(self) -> dict[str, Any]:
        return {"talks": self.talks}


def main(cfg: config_mod.Config) -> int:
    setup_logging("idle")
    return Idle(cfg).run()
