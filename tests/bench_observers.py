"""Benchmark: can a stopped observer slow speech?

    python -m tests.bench_observers [--turns 20] [--rounds 3] [--pause 10]

Real stage processes, the fake MMDAgent-EX (fast speech) and the four observers (transcript,
captions, subtitles, metrics) as processes of their own. Each round runs three conditions of
``--turns`` turns each, in turn so that the machine's drift falls on all:

- ``no observers``: the pipeline alone;
- ``observers``: the four observers running;
- ``observers stopped``: the same, all four SIGSTOPped for ``--pause`` seconds from the third
  turn on (then SIGCONT), so most turns run while they take nothing from the bus.

Per turn it measures ``RECOG_EVENT_STOP`` -> first ``SYNTH_START`` (response) and
``RECOG_EVENT_STOP`` -> the turn's last ``SYNTH_EVENT_STOP`` (whole turn), as the fake
MMDAgent-EX saw them, and the pipeline's own share: the arrival in ``llm`` of the token that
completed the first sentence -> its ``SYNTH_START`` flushed on the bridge's stdout (the
response itself is mostly the offline responder's deliberate 0.25-0.35 s wait). After each stopped run it also reports whether every observer beats
again and how many of the run's turns the transcript holds (a stopped subscriber's share of
the bus is dropped, never waited for). Reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from stages.observers.transcript import path_of
from tests.e2e import Observer, World, launched

OBSERVERS = ("transcript", "captions", "subtitles", "metrics")
UTTERANCES = ["こんにちは、今日はいい天気ですね", "Hello, what can you do?", "おすすめの本を教えて",
              "Tell me something about the weather.", "好きな食べ物は何ですか？", "How are you today?"]
CONDITIONS = ("no observers", "observers", "observers stopped")


def turn_times(world: World, text: str) -> tuple[float, float, float]:
    sent_at, got_at = len(world.avatar.inbox), len(world.avatar.received)
    turn = world.talk(text)
    recog = next(r.t for r in world.avatar.inbox[sent_at:] if r.line.startswith("RECOG_EVENT_STOP|"))
    first = next(r.t for r in world.avatar.received[got_at:] if r.line.startswith("SYNTH_START|"))
    last = [r.t for r in world.avatar.inbox[sent_at:] if r.line.startswith("SYNTH_EVENT_STOP|")][-1]
    written = next(e for e in world.bus.of("written", turn.turn) if e.body["type"] == "SYNTH_START")
    return first - recog, last - recog, written.ts - written.origin


def run(condition: str, turns: int, pause: float) -> dict:
    out: dict = {"response": [], "turn": [], "overhead": []}
    with tempfile.TemporaryDirectory(prefix="mmdagent-llm-bench-obs-") as tmp:
        with launched(Path(tmp), avatar_kwargs={"seconds_per_char": 0.001, "min_speech": 0.02}) as world:
            observers = [Observer(world, name).start() for name in OBSERVERS] if condition != "no observers" else []
            resume_at = None
            try:
                for i in range(turns):
                    if condition == "observers stopped" and i == 2:
                        for o in observers:
                            o.proc.send_signal(signal.SIGSTOP)
                        resume_at = time.monotonic() + pause
                    if resume_at is not None and time.monotonic() >= resume_at:
                        for o in observers:
                            o.proc.send_signal(signal.SIGCONT)
                        resume_at = None
                        out["resumed_after_turn"] = i
                    response, whole, overhead = turn_times(world, f"{UTTERANCES[i % len(UTTERANCES)]} ({i})")
                    out["response"].append(response)
                    out["turn"].append(whole)
                    out["overhead"].append(overhead)
                if resume_at is not None:
                    time.sleep(max(0.0, resume_at - time.monotonic()))
                    for o in observers:
                        o.proc.send_signal(signal.SIGCONT)
                    out["resumed_after_turn"] = turns
                if condition == "observers stopped":
                    since = len(world.bus.envelopes)
                    alive = world.bus.wait_for(lambda envs: {e.body.get("stage") for e in envs[since:]
                                                             if e.kind == "heartbeat"} >= set(OBSERVERS), 10)
                    out["observers_beat_again"] = bool(alive)
                    deadline = time.monotonic() + 10
                    path = path_of(world.cfg)
                    while True:
                        recs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
                        done = sum(1 for r in recs if r["event"] == "turn")
                        if done >= turns or time.monotonic() > deadline:
                            break
                        time.sleep(0.2)
                    out["transcript_turns"] = done
            finally:
                for o in observers:
                    o.proc.send_signal(signal.SIGCONT)
                    o.stop()
    return out


def summary(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return f"n={len(ms)} median={statistics.median(ms):.2f} ms p95={p95:.2f} ms max={ms[-1]:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pause", type=float, default=10.0)
    args = parser.parse_args()
    results = {c: {"response": [], "turn": [], "overhead": []} for c in CONDITIONS}
    notes = []
    for r in range(args.rounds):
        for condition in CONDITIONS:
            got = run(condition, args.turns, args.pause)
            results[condition]["response"] += got["response"]
            results[condition]["turn"] += got["turn"]
            results[condition]["overhead"] += got["overhead"]
            if condition == "observers stopped":
                notes.append(f"round {r + 1}: resumed after turn {got.get('resumed_after_turn')}, observers beat "
                             f"again: {got.get('observers_beat_again')}, transcript holds "
                             f"{got.get('transcript_turns')} of {args.turns} turns")
            print(f"round {r + 1} {condition}: response {summary(got['response'])}", flush=True)
    print(f"\n{os.cpu_count()} cores; {args.rounds} rounds x {args.turns} turns per condition; pause {args.pause:g} s")
    for condition in CONDITIONS:
        print(f"{condition:>18}: RECOG_EVENT_STOP -> first SYNTH_START  {summary(results[condition]['response'])}")
        print(f"{'':>18}  RECOG_EVENT_STOP -> last SYNTH_EVENT_STOP {summary(results[condition]['turn'])}")
        print(f"{'':>18}  token in llm -> SYNTH_START on stdout   {summary(results[condition]['overhead'])}")
    print("\n".join(notes))


if __name__ == "__main__":
    main()
