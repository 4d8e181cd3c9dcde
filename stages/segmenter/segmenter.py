"""segmenter: the ``tokens`` queue in, speakable ``segment`` items out, per turn.

Cutting rules live in :mod:`stages.segmenter.sentences` (where speech may pause: clauses and
sentence ends), expression tags are taken out by :mod:`stages.segmenter.tags` (an unknown or
malformed one is logged once), and :mod:`stages.segmenter.pacing` decides which waiting pieces go
out together and when: the first clause at once, then whole sentences while the avatar talks,
clauses when it would otherwise fall silent. For that this stage follows the sequencer's
``speech`` events of the current turn (:class:`stages.segmenter.pacing.SpeakingClock`, which
learns the voice's speaking rate from them). It numbers the segments and passes ``turn_end`` on
with the segment count. When the stream pauses for ``pause_release`` seconds, a finished sentence
that only waits for the character after its end mark is released (see
:meth:`stages.segmenter.sentences.SentenceCutter.ripe`). Items of a turn older than the newest one
seen, or of a cancelled turn (``cancel`` on the bus, read before the queue), are dropped: a late
token of a superseded answer must never become speech.
Tokens are numbered per turn; a gap (we or the broker restarted in the middle of a turn) makes
the turn *broken*: nothing more of it is cut, and ``broken`` on the bus tells the bridge.
A resumed answer (the llm sends the whole answer again under a new turn after a stage was lost,
its first token carrying ``heard``: the sentences the user heard) is cut from its start, as it
was the first time, and the pieces whose letters the user heard are not sent: the cuts depend on
the text alone, so they fall where they fell before, and each segment was whole pieces.
"""

from __future__ import annotations

import logging
import time

from broker import wire
from broker import config as config_mod
from broker.runtime import Stage, setup_logging
from stages.segmenter import pacing
from stages.segmenter.sentences import Piece, SentenceCutter, letters
from stages.segmenter.tags import TagReader, TaggedCutter

log = logging.getLogger("mmdagent_llm")


class SegmenterStage(Stage):
    name = "segmenter"
    topics = ("cancel", "speech")
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
        self.heard = 0        # letters of a resumed answer's start the user heard: not sent again
        self.waiting: list[tuple[Piece, float]] = []  # cut, not sent yet, with the origin of each
        self.clock = pacing.SpeakingClock()
        self.last_token: wire.Envelope | None = None  # of the current turn, while text is held
        self.last_token_at = 0.0
        self.ignored_tags: set[tuple[str, str]] = set()  # logged once each

    def info(self) -> dict:
        """The speaking rate learned per voice (seconds per character), for ``status`` and tests."""
        return {"seconds_per_char": {voice: round(rate, 4) for voice, rate in self.clock.rates.items()}}

    def _new_turn(self) -> None:
        self.cutter, self.count, self.last_token, self.waiting = self._new_cutter(), 0, None, []
        self.clock.reset()

    def on_event(self, env: wire.Envelope) -> None:
        if env.kind == "cancel" and env.turn > self.cancelled:
            self.cancelled = env.turn
            if self.turn <= env.turn:  # nothing held of it may be released by a pause either
                self._new_turn()
        elif env.kind == "speech" and env.turn == self.turn and type(env.body.get("index")) is int:
            self.clock.speech(env.body["index"], str(env.body.get("state", "")), env.ts, str(env.body.get("voice", "")))
            self._pace()

    def _new_cutter(self) -> TaggedCutter:
        c = self.cfg["segmenter"]
        return TaggedCutter(SentenceCutter(soft_cut_chars=c["soft_cut_chars"], max_bytes=c["max_bytes"]),
                            TagReader(set(self.cfg["expression"]["names"])))

    def on_work(self, env: wire.Envelope) -> None:
        if env.turn < self.turn or env.turn <= self.cancelled:
            log.debug("dropped a %s of old or cancelled turn %d", env.kind, env.turn)
            return
        if env.turn > self.turn:
            self.turn, self.tokens, self.broken, self.heard = env.turn, 0, False, 0
            self._new_turn()
        if env.kind == "token" and env.body.get("index") == 0 and isinstance(env.body.get("heard"), list):
            self.heard = len(letters("".join(str(h) for h in env.body["heard"])))  # a resumed answer
        if self.broken:
            return
        if env.kind == "token":
            if env.body.get("index", self.tokens) != self.tokens:
                return self._break(f"token {env.body.get('index')} came where {self.tokens} was due")
            self.tokens += 1
            self._add(self.cutter.feed(str(env.body.get("text", ""))), env)
            self.last_token = env if self.cutter.has_pending() else None
            self.last_token_at = time.monotonic()
        elif env.kind == "turn_end":
            self.last_token = None
            if env.body.get("tokens", self.tokens) != self.tokens:
                return self._break(f"the turn had {env.body.get('tokens')} tokens, {self.tokens} came")
            self._add(self.cutter.flush(), env, final=True)
            self.push("turn_end", {**env.body, "segments": self.count}, turn=env.turn, origin=env.origin)
        else:
            log.warning("ignored a %s on the tokens queue", env.kind)

    def _break(self, reason: str) -> None:
        """Part of this turn's text never reached us (we were restarted, or the broker was): what
        we would say would be garbled. Say nothing more of it; the bridge decides what to do."""
        self.broken, self.last_token, self.waiting = True, None, []
        log.warning("turn %d is broken: %s", self.turn, reason)
        self.publish("broken", {"stage": self.name, "reason": reason}, turn=self.turn)

    def next_deadline(self) -> float | None:
        deadlines = []
        if self.last_token is not None:
            deadlines.append(self.last_token_at + self.cfg["segmenter"]["pause_release"])
        free_at = self.clock.free_at() if self.waiting else None
        if free_at is not None:  # clauses wait for the avatar to near its end (wall clock -> monotonic)
            deadlines.append(time.monotonic() + max(0.0, free_at - pacing.LEAD - time.time()))
        return min(deadlines) if deadlines else None

    def on_tick(self, now: float) -> None:
        if self.last_token is not None and now >= self.last_token_at + self.cfg["segmenter"]["pause_release"]:
            env, self.last_token = self.last_token, None
            self._add(self.cutter.ripe(), env)
        elif self.waiting:
            self._pace()

    def _add(self, pieces: list[Piece], env: wire.Envelope, final: bool = False) -> None:
        for piece in pieces:
            if self.heard:  # the user heard it before a stage was lost: said once only
                piece, self.heard = pacing.unheard(piece, self.heard)
                if piece is None:
                    continue
            self.waiting.append((piece, env.origin))
        self._pace(final)
        for tag in self.cutter.ignored:
            if (tag.kind, tag.name) not in self.ignored_tags:  # the LLM may repeat it in every answer
                self.ignored_tags.add((tag.kind, tag.name))
                log.warning("turn %d: %s tag [%s] not spoken%s", env.turn, tag.kind, tag.name[:40],
                            " (not in [expression.names])" if tag.kind == "unknown" else "")
        self.cutter.ignored.clear()

    def _pace(self, final: bool = False) -> None:
        """Send what :func:`stages.segmenter.pacing.release` says goes out now, segment by segment."""
        c = self.cfg["segmenter"]
        while self.waiting:
            pieces = [p for p, _ in self.waiting]
            n = pacing.release(pieces, first=self.count == 0, final=final, free_in=self.clock.free_in(time.time()),
                               merge_chars=c["soft_cut_chars"], max_bytes=c["max_bytes"])
            if not n:
                return
            text, origin = pacing.join(pieces[:n]), self.waiting[n - 1][1]
            self.waiting = self.waiting[n:]
            self.push("segment", {"text": text, "index": self.count, "tags": list(pieces[0].tags)},
                      turn=self.turn, origin=origin)
            self.clock.sent(self.count, len(text), time.time())
            self.count += 1


def main(cfg: config_mod.Config) -> int:
    setup_logging("segmenter")
    return SegmenterStage(cfg).run()
