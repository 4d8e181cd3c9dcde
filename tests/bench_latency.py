"""Latency benchmark of the streaming pipeline on the embedded default (no LLM key).

    python -m tests.bench_latency [--turns 200] [--compare REV [--rounds 4]]

Runs the real stage processes and the simulated MMDAgent-EX (fast speech), talks ``--turns``
times, alternating Japanese and English, and prints:

- response: ``RECOG_EVENT_STOP`` written to the bridge's stdin -> the first ``SYNTH_START`` line
  read from its stdout, per turn. Includes the offline responder's deliberate 0.25-0.35 s wait
  before its first token and the time until the first sentence is complete.
- overhead: a token's arrival in the ``llm`` process -> the ``SYNTH_START`` line it completed
  written and flushed on the bridge's stdout (``written`` event: ``ts - origin``), for every
  segment sent as soon as it was cut (the first of each turn; later ones wait for the avatar).
- first token: ``RECOG_EVENT_STOP`` -> first token in ``llm`` (the LLM's share of the response).

``--compare REV`` measures the code of git revision ``REV`` (e.g. the commit before a change)
and the working tree in the same run: ``--rounds`` rounds, each ``--turns`` turns of REV then
of this tree, alternating so that the machine's drift falls on both. This very file measures
both (it is copied into REV's tree), each tree's processes run its own code (``PYTHONPATH``),
and each run has a state folder of its own.

Timing goals are reported here, never asserted in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e import launched


def summary(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    if not ms:
        return f"{name}: no samples"
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return (f"{name}: n={len(ms)} median={statistics.median(ms):.2f} ms p99={p99:.2f} ms "
            f"min={ms[0]:.2f} ms max={ms[-1]:.2f} ms")


UTTERANCES = ["こんにちは、今日はいい天気ですね", "Hello, what can you do?", "おすすめの本を教えて",
              "Tell me something about the weather.", "好きな食べ物は何ですか？", "How are you today?"]


def run(turns: int) -> dict[str, list[float]]:
    response, overhead, first_token = [], [], []
    with tempfile.TemporaryDirectory(prefix="mmdagent-llm-bench-") as tmp:
        with launched(Path(tmp), avatar_kwargs={"seconds_per_char": 0.001, "min_speech": 0.02}) as world:
            for i in range(turns):
                text = f"{UTTERANCES[i % len(UTTERANCES)]} ({i})"
                sent_at = len(world.avatar.inbox)
                got_at = len(world.avatar.received)
                turn = world.talk(text)
                recog = next(r.t for r in world.avatar.inbox[sent_at:] if r.line.startswith("RECOG_EVENT_STOP|"))
                first = next(r.t for r in world.avatar.received[got_at:] if r.line.startswith("SYNTH_START|"))
                response.append(first - recog)
                written = [e for e in world.bus.of("written", turn.turn) if e.body["type"] == "SYNTH_START"]
                overhead.append(written[0].ts - written[0].origin)
                start = world.bus.of("turn_start", turn.turn)[0]
                token = next(e for e in world.bus.of("token", turn.turn) if e.sender == "llm")
                first_token.append(token.origin - start.origin)
    return {"response": response, "overhead": overhead, "first_token": first_token}


NAMES = {"response": "RECOG_EVENT_STOP -> first SYNTH_START",
         "overhead": "token arrival in llm -> SYNTH_START on bridge stdout",
         "first_token": "RECOG_EVENT_STOP -> first token in llm"}
ROOT = Path(__file__).resolve().parent.parent


def run_tree(tree: Path, turns: int, state: Path) -> dict[str, list[float]]:
    """One run of this benchmark in ``tree``'s code, as a child process; its raw samples."""
    env = dict(os.environ, PYTHONPATH=str(tree), XDG_STATE_HOME=str(state))
    done = subprocess.run([sys.executable, "-m", "tests.bench_latency", "--turns", str(turns), "--json"], cwd=tree,
                          env=env, stdout=subprocess.PIPE, check=True, timeout=60 + turns * 10)
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def compare(rev: str, turns: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {rev: {k: [] for k in NAMES}, "this tree": {k: [] for k in NAMES}}
    with tempfile.TemporaryDirectory(prefix="mmdagent-llm-compare-") as tmp:
        old = Path(tmp) / "before"
        old.mkdir()
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, stdout=subprocess.PIPE, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        shutil.copy(Path(__file__), old / "tests" / "bench_latency.py")
        for i in range(rounds):
            for name, tree in ((rev, old), ("this tree", ROOT)):
                samples = run_tree(tree, turns, Path(tmp) / f"state-{i}-{tree.name}")
                for key, values in samples.items():
                    results[name][key] += values
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print the raw samples as one JSON line")
    parser.add_argument("--compare", metavar="REV", help="also measure git revision REV, alternating with this tree")
    parser.add_argument("--rounds", type=int, default=4, help="with --compare: rounds of --turns turns each")
    args = parser.parse_args(argv)
    began = time.monotonic()
    if args.json:
        print(json.dumps(run(args.turns)))
        return 0
    if args.compare:
        both = compare(args.compare, args.turns, args.rounds)
        print(f"mmdagent-llm latency benchmark, embedded offline responder, {args.rounds} x {args.turns} turns "
              f"each of {args.compare} and this tree, alternating, {time.monotonic() - began:.0f} s")
        for name, results in both.items():
            print(f"{name}:")
            for key, label in NAMES.items():
                print("  " + summary(label, results[key]))
        old, new = (statistics.median(r["overhead"]) * 1000 for r in both.values())
        print(f"token arrival -> SYNTH_START, median: {old:.3f} ms -> {new:.3f} ms ({new - old:+.3f} ms)")
        return 0
    results = run(args.turns)
    print(f"mmdagent-llm latency benchmark, embedded offline responder, {args.turns} turns, "
          f"{time.monotonic() - began:.0f} s")
    for key, label in NAMES.items():
        print(summary(label, results[key]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
