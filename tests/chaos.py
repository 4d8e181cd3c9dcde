"""Chaos run: many turns under real supervisord while a random stage is SIGKILLed every few turns.

    python -m tests.chaos [--turns 100] [--kill-every 3] [--seed 1] [--no-prefill]

The pipeline runs under ``deploy/supervisord.conf`` (copied into a temporary folder), the llm
talks to a local streaming server through the real openai client, and the fake MMDAgent-EX
launches the bridge. Turn *i* asks ``質問<i>``; the server answers it with three sentences, two
naming *i*, and continues an answer whose beginning ends the request (``[llm] prefill``). Every ``kill_every`` turns a random stage (broker included) is killed with SIGKILL at
a random point of the turn: before the question, at ``turn_start``, at the first token, the
first segment, or once the avatar has started speaking. supervisord restarts it.

What the avatar received is then judged turn by turn, from MMDAgent-EX's side only:

- completed: the three sentences of answer *i*, in order, each once;
- notice: the failure notice was spoken (what was said before it belongs to answer *i*), and
  whether it came after the whole answer (it must not);
- wedged: neither within the deadline (must be 0);
- duplicated or out-of-turn segments: a sentence spoken twice, or a sentence of another
  answer in turn *i*'s window (must be 0);
- lost utterances: turns with no answer at all, wedged included (must be 0);
- recovery: for each kill, the time until the avatar next starts a sentence of an answer.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker.liveness import PIPELINE
from tests.e2e import managed, tokens_of
from tests.harness import BusWatcher

VOICE = "SYNTH_START|0|mei_voice_normal|"
MOMENTS = ("before", "turn_start", "token", "segment", "speaking")
TURN_DEADLINE = 60.0
FAST_AVATAR = {"seconds_per_char": 0.01, "min_speech": 0.05, "stop_delay": 0.1, "cut_delay": 0.1}


def answer_for(i: int) -> list[str]:
    return [f"これは{i}番目の答えです。", "少しだけ長く話します。", f"番号は{i}でした。"]


def reply(body: dict) -> list:
    """Answer *i*, streamed; a request ending with the answer's beginning (``[llm] prefill``, as
    llama.cpp or Ollama would take it) gets the rest of it."""
    messages = body["messages"]
    text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    match = re.search(r"質問(\d+)", text)
    i = int(match.group(1)) if match else -1
    answer = "".join(answer_for(i))
    if messages and messages[-1]["role"] == "assistant" and answer.startswith(messages[-1]["content"]):
        answer = answer[len(messages[-1]["content"]):]
    return tokens_of(answer, seed=i, delay=0.01)


@dataclass
class Report:
    turns: int = 0
    completed: int = 0
    notice: int = 0
    notice_after_complete: int = 0
    wedged: int = 0
    duplicated: int = 0
    out_of_turn: int = 0
    lost: int = 0
    kills: list[str] = field(default_factory=list)
    recoveries: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what went wrong, turn by turn

    def lines(self) -> list[str]:
        worst = max(self.recoveries) if self.recoveries else 0.0
        return [f"turns: {self.turns}", f"completed: {self.completed}", f"ended with the notice: {self.notice}",
                f"notice after a complete answer: {self.notice_after_complete}",
                f"wedged: {self.wedged}", f"duplicated segments: {self.duplicated}",
                f"out-of-turn segments: {self.out_of_turn}", f"utterances lost: {self.lost}",
                f"kills: {len(self.kills)} ({', '.join(f'{k}:{self.kills.count(k)}' for k in sorted(set(self.kills)))})",
                f"longest recovery: {worst:.2f} s"]

    def details(self) -> list[str]:
        return self.problems


def _pids(bus: BusWatcher) -> dict[str, int]:
    pids: dict[str, int] = {}
    for env in bus.of("heartbeat"):
        pids[env.body.get("stage", "")] = env.body.get("pid", 0)
    return pids


def _milestone(bus: BusWatcher, since: int, moment: str) -> bool:
    def seen(envs) -> bool:
        for e in envs[since:]:
            if moment == "turn_start" and e.kind == "turn_start":
                return True
            if moment == "token" and e.kind == "token":
                return True
            if moment == "segment" and e.kind == "segment":
                return True
            if moment == "speaking" and e.kind == "speech" and e.body.get("state") == "started":
                return True
        return False
    return bool(bus.wait_for(seen, 10.0))


def run(folder: Path, turns: int, kill_every: int, seed: int, prefill: bool = True) -> Report:
    rng = random.Random(seed)
    report = Report(turns=turns)
    with managed(folder, reply=reply, avatar_kwargs=FAST_AVATAR, bus={"peer_timeout": 2.5},
                 turn={"stall_timeout": 10.0, "max_age": 30.0, "notify_unreachable": False},
                 llm={"prefill": prefill}) as world:
        avatar, bus = world.avatar, world.bus
        notice = world.cfg["turn"]["failure_notice"]
        pending_kill: float | None = None
        for i in range(turns):
            start = len(avatar.received)
            inbox_start = len(avatar.inbox)
            since = len(bus.envelopes)
            victim = moment = None
            if kill_every and i % kill_every == kill_every - 1:
                victim, moment = rng.choice(PIPELINE), rng.choice(MOMENTS)
            if moment == "before":
                pending_kill = _kill(bus, victim, report)
            avatar.send("RECOG_EVENT_START")
            avatar.send(f"RECOG_EVENT_STOP|質問{i}")
            if victim and moment != "before":
                _milestone(bus, since, moment)
                pending_kill = _kill(bus, victim, report)
            if victim:
                report.problems.append(f"kill {victim} at {moment} in turn {i}")
            wanted = [VOICE + s for s in answer_for(i)]

            def over(_lines) -> bool:
                got = [r.line for r in avatar.received[start:]]
                last = next((k for k in range(len(got) - 1, -1, -1)
                             if got[k] in (wanted[-1], VOICE + notice)), None)
                if last is None:
                    return False
                # ...and the avatar has finished saying it
                stops = [r for r in avatar.inbox[inbox_start:] if r.line == "SYNTH_EVENT_STOP|0"]
                return bool(stops) and stops[-1].t >= avatar.received[start + last].t

            ended = avatar.wait_for(over, TURN_DEADLINE)
            got = [r.line[len(VOICE):] for r in avatar.received[start:] if r.line.startswith(VOICE)]
            if pending_kill is not None:
                first = next((r.t for r in avatar.received[start:] if r.line.startswith(VOICE)
                              and r.line[len(VOICE):] != notice), None)
                if first is not None:
                    report.recoveries.append(max(0.0, first - pending_kill))
                    pending_kill = None
            _judge(report, i, got, notice, ended)
    return report


def _kill(bus: BusWatcher, victim: str, report: Report) -> float:
    pid = _pids(bus).get(victim)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        report.kills.append(victim)
    return time.monotonic()


def _judge(report: Report, i: int, got: list[str], notice: str, ended: bool) -> None:
    mine = answer_for(i)
    spoken = [s for s in got if s != notice]
    before = (report.out_of_turn, report.duplicated, report.wedged, report.lost)
    if any(s not in mine for s in spoken):
        report.out_of_turn += sum(1 for s in spoken if s not in mine)
    if len(spoken) != len(set(spoken)):
        report.duplicated += len(spoken) - len(set(spoken))
    if not ended:
        report.wedged += 1
        report.lost += 1
    elif notice in got:
        report.notice += 1
        report.notice_after_complete += spoken == mine
    elif spoken == mine:
        report.completed += 1
    else:
        report.lost += 1
    if (report.out_of_turn, report.duplicated, report.wedged, report.lost) != before:
        report.problems.append(f"turn {i} ({'ended' if ended else 'wedged'}): {got}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--kill-every", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="list every kill and every problem")
    parser.add_argument("--no-prefill", action="store_true",
                        help="[llm] prefill = false (as with OpenAI): an llm killed mid-answer ends it with the notice")
    args = parser.parse_args(argv)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mmdagent-llm-chaos-") as tmp:
        # the run's own keys and histories, for the stages and for this process alike (supervisord's
        # stages get a HOME of their own: without this, they would make keys this process lacks)
        os.environ["XDG_STATE_HOME"] = str(Path(tmp) / "state")
        report = run(Path(tmp), args.turns, args.kill_every, args.seed, prefill=not args.no_prefill)
    print(f"mmdagent-llm chaos run under supervisord: seed {args.seed}, a SIGKILL every {args.kill_every} turns, "
          f"{time.monotonic() - began:.0f} s")
    for line in report.lines():
        print("  " + line)
    if args.verbose:
        for line in report.details():
            print("    " + line)
    bad = report.wedged + report.duplicated + report.out_of_turn + report.lost + report.notice_after_complete
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
