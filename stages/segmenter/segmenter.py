"""segmenter: the ``tokens`` queue in, speakable ``segment`` items out, per turn.

Cutting rules live in :mod:`stages.segmenter.sentences`, expression tags are taken out by
:mod:`stages.segmenter.tags` (an unknown or malformed one is logged once); this stage only keeps one cutter per turn,
numbers the segments, and passes ``turn_end`` on with the segment count. When the stream
pauses for ``pause_release`` seconds, a finished sentence that only waits for the character
after its end mark is released (see :meth:`stages.segmenter.sentences.SentenceCutter.ripe`). Items of a turn
older than the newest one seen, or of a cancelled turn (``cancel`` on the bus, read before
the queue), are dropped: a late token of a superseded answer must never become speech.
Tokens are numbered per turn; a gap (we or the broker restarted in the middle of a turn) makes
the turn *broken*: nothing more of it is cut, and ``broken`` on the bus tells the bridge.
A resumed answer (the llm sends the whole answer again under a new turn after a stage was lost,
its first token carrying ``skip``) is cut from its start, as it was the first time, and its first
``skip`` segments, which the user heard already, are not sent: the cuts depend on the text alone,
never on how it was split into tokens, so they fall where they fell before.
"""

from __future__ import annotations

import logging
import time

from broker import wire
from broker import config as config_mod
from broker.runtime import Stage, setup_logging
from stages.segmenter.sentences import SentenceCutter
from stages.segmenter.tags import TagReader, TaggedCutter

log = logging.getLogger("mmdagent_llm")


class SegmenterStage(Stage):
    name = "segmenter"
    topics = ("cancel",)
    watches_peers = False
    input_queue = "tokens"
    output_queue = "segments"

    def __init__(self, cfg: config_mod.Config) -> None:
        super().__init__(cfg)
        self.turn = 0
        self.cutter = self._new_cutter()
        self.count = 0
        self.tokens = 0       # tokens of the current turn received, in order
        self.broken = False   # the current turn lost tokens before they reached us
        self.cancelled = 0
        self.skip = 0         # segments of the current turn cut but not sent: a resumed answer's heard ones
        self.last_token: wire.Envelope | None = None  # of the current turn, while text is held
        self.last_token_at = 0.0
        self.ignored_tags: set[tuple[str, str]] = set()  # logged once each

    def on_event(self, env: wire.Envelope) -> None:
        if env.kind == "cancel" and env.turn > self.cancelled:
            self.cancelled = env.turn
            if self.turn <= env.turn:  # nothing held of it may be released by a pause either
                self.cutter, self.count, self.last_token = self._new_cutter(), 0, None

    def _new_cutter(self) -> TaggedCutter:
        c = self.cfg["segmenter"]
        return TaggedCutter(SentenceCutter(first_soft_chars=c["first_soft_chars"], soft_cut_chars=c["soft_cut_chars"],
                                           max_bytes=c["max_bytes"]), TagReader(set(self.cfg["expression"]["names"])))

    def on_work(self, env: wire.Envelope) -> None:
        if env.turn < self.turn or env.turn <= self.cancelled:
            log.debug("dropped a %s of old or cancelled turn %d", env.kind, env.turn)
            return
        if env.turn > self.turn:
            self.turn, self.cutter, self.count, self.tokens, self.broken = env.turn, self._new_cutter(), 0, 0, False
            self.skip = 0
        if env.kind == "token" and env.body.get("index") == 0 and type(env.body.get("skip")) is int:
            self.skip = max(0, env.body["skip"])  # a resumed answer: these sentences were said already
        if self.broken:
            return
        if env.kind == "token":
            if env.body.get("index", self.tokens) != self.tokens:
                return self._break(f"token {env.body.get('index')} came where {self.tokens} was due")
            self.tokens += 1
            self._emit(self.cutter.feed(str(env.body.get("text", ""))), env)
            self.last_token = env if self.cutter.has_pending() else None
            self.last_token_at = time.monotonic()
        elif env.kind == "turn_end":
            self.last_token = None
            if env.body.get("tokens", self.tokens) != self.tokens:
                return self._break(f"the turn had {env.body.get('tokens')} tokens, {self.tokens} came")
            self._emit(self.cutter.flush(), env)
            self.push("turn_end", {**env.body, "segments": self.count}, turn=env.turn, origin=env.origin)
        else:
            log.warning("ignored a %s on the tokens queue", env.kind)

    def _break(self, reason: str) -> None:
        """Part of this turn's text never reached us (we were restarted, or the broker was): what
        we would say would be garbled. Say nothing more of it; the bridge decides what to do."""
        self.broken, self.last_token = True, None
        log.warning("turn %d is broken: %s", self.turn, reason)
        self.publish("broken", {"stage": self.name, "reason": reason}, turn=self.turn)

    def next_deadline(self) -> float | None:
        if self.last_token is None:
            return None
        return self.last_token_at + self.cfg["segmenter"]["pause_release"]

    def on_tick(self, now: float) -> None:
        deadline = self.next_deadline()
        if deadline is not None and now >= deadline and self.last_token is not None:
            env, self.last_token = self.last_token, None
            self._emit(self.cutter.ripe(), env)

    def _emit(self, segments: list[tuple[str, list[str]]], env: wire.Envelope) -> None:
        for text, tags in segments:
            if self.skip:  # cut exactly as before (the cuts depend on the text alone), but heard already
                self.skip -= 1
                continue
            self.push("segment", {"text": text, "index": self.count, "tags": tags}, turn=env.turn, origin=env.origin)
            self.count += 1
        for tag in self.cutter.ignored:
            if (tag.kind, tag.name) not in self.ignored_tags:  # the LLM may repeat it in every answer
                self.ignored_tags.add((tag.kind, tag.name))
                log.warning("turn %d: %s tag [%s] not spoken%s", env.turn, tag.kind, tag.name[:40],
                            " (not in [expression.names])" if tag.kind == "unknown" else "")
        self.cutter.ignored.clear()


def main(cfg: config_mod.Config) -> int:
    setup_logging("segmenter")
    return SegmenterStage(cfg).run()
