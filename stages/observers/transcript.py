"""``mmdagent-llm observe transcript``: the conversation, one JSON line per event, a file per session.

The file is ``<state>/transcripts/<session>.jsonl`` (``[transcript] folder`` to put it elsewhere;
the folder is the owner's only, mode 0700, and the files 0600). Each line is written whole and
flushed at once, so a killed observer loses no line it had written. When a file would pass
``max_bytes`` it becomes ``<session>.1.jsonl`` (the older ones shift up to ``keep``, the
oldest is removed) and a new one begins. ``mmdagent-llm transcript`` prints it readably.

Every line has ``time`` (local, ISO 8601 with ms), ``ts`` (epoch seconds), ``session``,
``turn`` (0 when none) and ``event``:

============ ==================================================================================
event        other fields
============ ==================================================================================
observer     ``pid``: this observer started (what came before it was not recorded)
user         ``text``: the user's utterance opened the turn
greeting     ``text``: the avatar opened the turn itself with the persona's greeting
tool         ``name``, ``ok``, ``seconds``, ``result`` (at most 300 characters): the LLM called a tool
             (``remember``: a fact written to the memory file)
summary      ``ok``, ``exchanges``, ``text`` (at most 2000 characters), ``error``: the oldest exchanges
             of the history were folded into its summary (now ``text``), or that failed
resumed      ``of``, ``skip``: the turn goes on with turn ``of``'s answer (a stage was lost in its
             middle), its first ``skip`` sentences said already
sentence     ``index``, ``text``, ``tags`` (its expression tags' names), ``heard``: ``full`` (spoken to its end), ``cut`` (cut off by an
             interruption), ``never`` (not said: dropped, superseded, or no speech event came)
interrupted  ``reason`` (``interrupted``, ``superseded``, ``away``), ``heard`` (the sentences
             that had begun)
error        ``cause`` (see :data:`broker.wire.CAUSES`), ``error`` (one line, no secrets)
turn         the turn is over: ``reason`` (``done``, ``error``, a cancel reason, ``stalled``),
             ``answer`` (the LLM's text, its ``[name]`` tags taken out), ``sentences``, ``latency_ms`` (see
             :mod:`stages.latency`: ``first_token``, ``first_synth``, ``first_speech``)
stage        ``stage``, ``change`` (``restarted``, ``gone``, ``back``), ``pid``
broken       ``stage``, ``reason``: a stage could not do its whole part of the turn
notice       ``level``, ``text``
============ ==================================================================================
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import config as config_mod
from broker import curve, wire
from broker.runtime import Stage, setup_logging
from stages.latency import TurnClock
from stages.segmenter.tags import strip_tags

log = logging.getLogger("mmdagent_llm")

SETTLE = 3.0  # after a cancel, how long the cut-off sentence's last speech events may take
FINAL = {"finished": "full", "interrupted": "cut", "dropped": "never"}


def path_of(cfg: config_mod.Config) -> Path:
    """The session's current transcript file (its folder is not created here)."""
    folder = cfg["transcript"]["folder"]
    base = Path(folder).expanduser() if folder else config_mod.state_dir() / "transcripts"
    return base / f"{config_mod.safe_name(cfg['bus']['session'])}.jsonl"


class RotatingLines:
    """Append-only UTF-8 lines, flushed one by one, the file rotated by size."""

    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        curve.private_dir(path.parent)
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.file = os.fdopen(fd, "ab")
        self.size = self.file.seek(0, os.SEEK_END)

    def write(self, line: str) -> None:
        data = line.encode("utf-8") + b"\n"
        if self.size and self.size + len(data) > self.max_bytes:
            self._rotate()
        self.file.write(data)
        self.file.flush()
        self.size += len(data)

    def rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.{n}{self.path.suffix}")

    def _rotate(self) -> None:
        self.file.close()
        for n in range(self.keep, 0, -1):
            older = self.path if n == 1 else self.rotated(n - 1)
            if older.exists():
                os.replace(older, self.rotated(n))
        self._open()

    def close(self) -> None:
        self.file.close()


@dataclass
class _Turn:
    segments: dict[int, str] = field(default_factory=dict)
    tags: dict[int, list[str]] = field(default_factory=dict)  # the expression tags of each sentence
    started: set[int] = field(default_factory=set)
    told: set[int] = field(default_factory=set)  # sentences already written
    answer: str = ""
    reason: str = ""
    settle_at: float | None = None  # monotonic: close the turn then (after a cancel)
    opened: float = field(default_factory=time.monotonic)


class Transcript(Stage):
    name = "transcript"
    topics = ("turn_start", "segment", "speech", "written", "cancel", "spoken", "turn_result",
              "broken", "notice", "tool", "summary")

    def __init__(self, cfg: config_mod.Config, lines: RotatingLines | None = None) -> None:
        super().__init__(cfg)
        t = cfg["transcript"]
        self.lines = lines or RotatingLines(path_of(cfg), t["max_bytes"], t["keep"])
        self.clock = TurnClock()
        self.turns: dict[int, _Turn] = {}
        self.stall = cfg["turn"]["stall_timeout"] + cfg["llm"]["turn_timeout"]
        self.record("observer", pid=os.getpid())

    def record(self, event: str, turn: int = 0, ts: float | None = None, **fields: Any) -> None:
        ts = time.time() if ts is None else ts
        when = datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")
        line = {"time": when, "ts": round(ts, 3), "session": self.sender.session, "turn": turn, "event": event,
                **fields}
        self.lines.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")))

    def on_event(self, env: wire.Envelope) -> None:
        self.clock.observe(env)
        body, n = env.body, env.turn
        if env.kind == "turn_start":
            for older in [t for t in self.turns if t < n]:
                self._close(older, self.turns[older].reason or "superseded")
            self.turns[n] = _Turn()
            if "resume" in body:  # the same utterance: the rest of turn `of`'s answer, after a stage was lost
                self.record("resumed", n, env.ts, of=body.get("resume"), skip=len(body.get("heard") or []))
            elif isinstance(body.get("say"), str):
                self.record("greeting", n, env.origin, text=body["say"])
            else:
                self.record("user", n, env.origin, text=str(body.get("text", "")))
            return
        if env.kind == "broken":
            self.record("broken", n, env.ts, stage=str(body.get("stage")), reason=str(body.get("reason")))
            return
        if env.kind == "tool":
            self.record("tool", n, env.ts, name=str(body.get("name")), ok=body.get("ok") is True,
                        seconds=body.get("seconds"), result=str(body.get("result", ""))[:wire.TOOL_RESULT_MAX])
            return
        if env.kind == "summary":
            self.record("summary", n, env.ts, ok=body.get("ok") is True, exchanges=body.get("exchanges"),
                        text=str(body.get("text", ""))[:wire.SUMMARY_MAX], error=str(body.get("error", ""))[:300])
            return
        if env.kind == "notice":
            self.record("notice", n, env.ts, level=str(body.get("level")), text=str(body.get("text")))
            return
        turn = self.turns.get(n)
        if turn is None:
            return
        if env.kind == "segment" and type(body.get("index")) is int:
            turn.segments[body["index"]] = str(body.get("text", ""))
            turn.tags[body["index"]] = [str(t) for t in body.get("tags") or []]
        elif env.kind == "speech":
            self._speech(n, turn, body)
        elif env.kind == "cancel":
            turn.reason = str(body.get("reason", "interrupted"))
            spoken = body.get("spoken")
            self.record("interrupted", n, env.ts, reason=turn.reason,
                        heard=[str(s) for s in spoken] if isinstance(spoken, list) else [])
            turn.settle_at = time.monotonic() + SETTLE
        elif env.kind == "turn_result":
            turn.answer = str(body.get("answer", ""))
            if body.get("reason") == "error":
                turn.reason = turn.reason or "error"
                self.record("error", n, env.ts, cause=str(body.get("cause") or "other"), error=str(body.get("error", "")))
        elif env.kind == "spoken":
            self._close(n, turn.reason or "done")

    def _speech(self, n: int, turn: _Turn, body: dict) -> None:
        index, state = body.get("index"), body.get("state")
        if type(index) is not int or index in turn.told:
            return
        turn.segments.setdefault(index, str(body.get("text", "")))
        turn.tags.setdefault(index, [str(t) for t in body.get("tags") or []])
        if state == "started":
            turn.started.add(index)
        heard = FINAL.get(str(state))
        if state == "timeout":
            heard = "full" if index in turn.started else "never"  # no SYNTH_EVENT_STOP, or no START
        if heard is not None:
            self._sentence(n, turn, index, heard)

    def _sentence(self, n: int, turn: _Turn, index: int, heard: str) -> None:
        turn.told.add(index)
        self.record("sentence", n, index=index, text=turn.segments.get(index, ""), heard=heard,
                    tags=turn.tags.get(index, []))

    def _close(self, n: int, reason: str) -> None:
        turn = self.turns.pop(n)
        for index in sorted(set(turn.segments) - turn.told):
            self._sentence(n, turn, index, "cut" if index in turn.started else "never")
        times = self.clock.turns.get(n)
        self.record("turn", n, reason=reason, answer=strip_tags(turn.answer), sentences=len(turn.segments),
                    latency_ms=times.as_ms() if times else {})

    def next_deadline(self) -> float | None:
        ends = [t.settle_at for t in self.turns.values() if t.settle_at is not None]
        ends += [t.opened + self.stall for t in self.turns.values()]
        return min(ends) if ends else None

    def on_tick(self, now: float) -> None:
        for n, turn in list(self.turns.items()):
            if turn.settle_at is not None and now >= turn.settle_at:
                self._close(n, turn.reason)
            elif now >= turn.opened + self.stall:
                self._close(n, "stalled")

    def on_peer(self, name: str, change: str) -> None:
        if change in ("restarted", "gone", "back"):
            peer = self.liveness.peers.get(name)
            self.record("stage", stage=name, change=change, pid=peer.pid if peer else 0)

    def close(self) -> None:
        self.lines.close()


def main(cfg: config_mod.Config) -> int:
    setup_logging("transcript")
    return Transcript(cfg).run()
