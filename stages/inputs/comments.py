"""``mmdagent-llm input comments``: the avatar answers live-stream comments when it is free.

Sources (``[comments]``, both off by default; the process refuses to start with neither):
OneComme's local WebSocket API, which gathers YouTube, Twitch, niconico and more
(``onecomme_url``, :mod:`stages.inputs.onecomme`), and a Twitch channel's chat read anonymously
(``twitch_channel``, :mod:`stages.inputs.twitch`). They run on a thread of their own
(:mod:`stages.inputs.feeds`) and reconnect by themselves.

Which comment, and when (:mod:`stages.inputs.policy`; ``[comments]``): ignored viewers and
words, comments with no words, a viewer answered less than ``per_viewer`` seconds ago are
dropped; the rest wait, one per viewer, at most ``max_queue``, at most ``max_age`` seconds. When
the avatar has been free for ``quiet`` seconds (no turn, nobody speaking: the streamer gets the
first word), the newest waiting comment (or the oldest: ``while_busy``) is asked as an ``input``
with ``when = "idle"`` (:mod:`stages.inputs.asking`), so it never cuts off the streamer or the
avatar: the bridge refuses it, ``busy``, if anything came first, and the comment waits again.

What the model gets is a fixed sentence and the comment as JSON data, never the comment as
the user's words (:mod:`stages.comment_prompt`); the ``input``'s ``from`` is the viewer's name,
which the turn's ``turn_start`` carries for the captions and subtitles (``<name>: <comment>``).
The heartbeat's ``info``: ``sources`` (each ``connecting``, ``connected`` or ``down``), ``queued``,
``received``, ``asked``, ``answered`` and ``dropped`` (reason -> count).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from broker import config as config_mod
from broker import wire
from broker.runtime import setup_logging
from stages.inputs.asking import Asked, Asker
from stages.inputs.feeds import Feeds, Source, Withdraw
from stages.inputs.policy import Comment, Policy
from stages.comment_prompt import prompt

log = logging.getLogger("mmdagent_llm")


def sources_of(section: dict[str, Any]) -> dict[str, Source]:
    """The sources ``[comments]`` turns on (their modules imported only when used)."""
    sources: dict[str, Source] = {}
    if section["onecomme_url"]:
        from stages.inputs import onecomme
        sources["onecomme"] = onecomme.follow(section["onecomme_url"], section["max_chars"])
    if section["twitch_channel"]:
        from stages.inputs import twitch
        sources["twitch"] = twitch.follow(section["twitch_channel"], section["twitch_server"], section["max_chars"])
    return sources


class Comments(Asker):
    name = "comments"

    def __init__(self, cfg: config_mod.Config, sources: dict[str, Source]) -> None:
        super().__init__(cfg)
        self.section = cfg["comments"]
        self.policy = Policy(self.section)
        self.feeds = Feeds(sources)
        self.extra[self.feeds.fileno()] = self._arrived
        self.counts = {"received": 0, "asked": 0, "answered": 0}
        self.answering: tuple[int, Comment, float] | None = None  # (turn, comment, when), until the turn ends
        self._told: set[str] = set()  # drop reasons logged once

    def on_ready(self) -> None:
        self.feeds.start()

    def _arrived(self) -> None:
        now = time.monotonic()
        busy = self.asked is not None or self.activity.busy(now)
        for item in self.feeds.take():
            if isinstance(item, Withdraw):
                if self.policy.forget(comment_id=item.comment_id, viewer=item.viewer, everything=item.everything):
                    log.info("withdrawn by a moderator: %s", item.comment_id or item.viewer or "every comment")
                continue
            self.counts["received"] += 1
            reason = self.policy.offer(item, now, busy)
            if reason and reason not in self._told:
                self._told.add(reason)
                log.info("a comment was not kept: %s (further ones are only counted: the heartbeat's dropped)",
                         reason)

    def due(self, now: float, quiet_since: float) -> float | None:
        return quiet_since + self.section["quiet"] if self.policy.queue else None

    def next_ask(self, now: float) -> tuple[str, str, Any] | None:
        comment = self.policy.take(now)
        if comment is None:
            return None
        self.counts["asked"] += 1
        log.info("asking about a comment of %s (%s, %.1f s old; %d waiting)", comment.name, comment.source,
                 now - comment.at, len(self.policy.queue))
        return prompt(comment.name, comment.text), comment.name, comment

    def on_event(self, env: wire.Envelope) -> None:
        super().on_event(env)
        if self.answering is None or env.turn != self.answering[0] or env.kind not in ("cancel", "spoken"):
            return
        _, comment, began = self.answering
        self.answering = None
        if env.kind == "cancel" and not env.body.get("spoken"):
            # the user began to speak as the turn began: not a word of the answer was said
            log.info("the answer to a comment of %s was cut off before a word of it: it waits again", comment.name)
            self.policy.cut_off(comment, began, time.monotonic())
        else:
            self.counts["answered"] += 1

    def on_result(self, asked: Asked, reason: str, now: float) -> None:
        comment: Comment = asked.what
        if not reason:
            self.answering = (asked.turn, comment, now)  # answered once a word of it is said (or all was said)
            self.policy.answered(comment, now)
        elif reason in ("busy", "away", "no answer"):
            self.policy.put_back(comment, now)
        else:
            log.warning("the bridge refused a comment of %s: %s", comment.name, reason)

    def info(self) -> dict[str, Any]:
        dropped = dict(self.policy.dropped)
        if self.feeds.overflow:
            dropped["inbox full"] = self.feeds.overflow
        return {"sources": dict(self.feeds.status), "queued": len(self.policy.queue), **self.counts,
                "dropped": dropped}

    def close(self) -> None:
        self.feeds.stop()


def main(cfg: config_mod.Config) -> int:
    setup_logging("comments")
    sources = sources_of(cfg["comments"])
    if not sources:
        log.error("no comment source: set [comments] onecomme_url (OneComme's WebSocket API, e.g. "
                  "\"ws://127.0.0.1:11180/sub\") or twitch_channel (see the README's \"Live-stream comments\")")
        return 2
    return Comments(cfg, sources).run()
