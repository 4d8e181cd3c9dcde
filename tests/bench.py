"""Every performance figure in one table: ``python -m tests.bench [--turns 20] [--rounds 3]``.

The LLM is the local streaming server (the real openai client on both sides), answering each
turn with three sentences in tokens of 1-3 characters, 30 ms apart. The same token streams go,
in the same run and alternating round by round, to:

- the pipeline (real stage processes, the fake MMDAgent-EX running ``mmdagent-llm bridge``);
- the single-process baseline, :mod:`tests.seed_baseline` (the official streaming sample).

Figures, each as the median of the rounds' medians with the spread of those medians:

- **over the limit**: from the moment the server sent the character that completes the first
  sentence to that sentence's ``SYNTH_START`` read from the plugin's stdout (p50, p99);
- **hops** (pipeline only): the arrival in ``llm`` of the token that completed the first
  sentence to its ``SYNTH_START`` flushed on the bridge's stdout (p50, p99);
- **between sentences**: ``SYNTH_EVENT_STOP`` written to the plugin's stdin to the next
  ``SYNTH_START`` read from its stdout (p50, p99);
- **first SYNTH_START** after ``RECOG_EVENT_STOP`` (p50), and turns lost;
- **footprint** (resident memory of every process of the side) and **idle CPU** (over 10 s with
  nothing said, % of one core);
- **start-up**: the one-line plugin from a cold start (no pipeline running) to a bridge that
  reports the whole pipeline reachable (built-in keeper, and under supervisord);
- the same pipeline figures while :mod:`tests.bus_tap`, an observer process, decodes every
  message on the bus; the transport's floor (:func:`transport_floor`); a 20,000-character answer
  (:func:`long_answer`); a long conversation (:func:`conversation`, ``--conversation N``).
  ``--tagged`` starts every answer with an expression tag.

Reported, never asserted (the CI suite has no timing assertions).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import zmq

from broker import config as config_mod
from broker.runtime import connect
from stages.commands.avatar_sim import SimulatedMMDAgent
from stages.commands.launcher import stop_all, wait_ready
from stages.llm.offline_responder import ChatCompletionServer, Token
from tests.e2e import bridge_sees_pipeline, launched, tokens_of
from tests.harness import ROOT, pipeline_env, write_config

GAP = 0.03
ANSWERS = ["はい、今日はとても良い天気ですね。散歩に行きたくなります。何か予定はありますか？",
           "それは面白い質問ですね！少し考えてみます。たぶん答えは三つあります。",
           "こんにちは。元気にしていましたか？私はずっとここで待っていました。"]
# speech slow enough that the whole answer has streamed before the first sentence ends: "between
# sentences" is then the handoff alone, never a wait for the LLM
AVATAR = {"seconds_per_char": 0.05, "min_speech": 0.3}


class Streams:
    """The server's reply: each turn's answer in 1-3 character tokens, ``GAP`` apart."""

    def __init__(self, tagged: bool = False) -> None:
        self.turn = 0
        self.answers: list[str] = []
        self.tag = "[happy]" if tagged else ""  # --tagged: every answer starts with an expression tag

    def __call__(self, body: dict) -> list[Token]:
        if body.get("max_tokens") == 1:  # the start-up check
            return [Token("OK", 0.0)]
        answer = self.tag + ANSWERS[self.turn % len(ANSWERS)]
        self.answers.append(answer)
        self.turn += 1
        return tokens_of(answer, seed=self.turn - 1, delay=GAP, longest=3)


def completing_time(record, sentence: str, answer: str) -> float:
    """When the server sent the character that completes ``sentence`` (its first appearance)."""
    end = answer.index(sentence) + len(sentence)
    sent = 0
    for at, text in record.sent:
        sent += len(text)
        if sent >= end:
            return at
    raise ValueError("the sentence was never completed")


def talk_turns(avatar: SimulatedMMDAgent, server: ChatCompletionServer, streams: Streams, turns: int) -> dict:
    out: dict[str, list[float]] = {"over": [], "between": [], "first": [], "lost": []}
    for i in range(turns):
        got, inbox = len(avatar.received), len(avatar.inbox)
        conns = len(server.connections)
        avatar.send("RECOG_EVENT_START")
        avatar.send(f"RECOG_EVENT_STOP|質問です {i}")
        answer = streams.tag + ANSWERS[streams.turn % len(ANSWERS)]

        def done() -> bool:  # the answer was streamed whole, and every sentence spoken to its end
            record = next((c for c in server.connections[conns:] if c.sent), None)
            starts = sum(1 for r in avatar.received[got:] if r.line.startswith("SYNTH_START|"))
            stops = sum(1 for r in avatar.inbox[inbox:] if r.line.startswith("SYNTH_EVENT_STOP"))
            return record is not None and record.closed is not None and starts and stops >= starts

        deadline, calm = time.monotonic() + 20, None
        while time.monotonic() < deadline:  # done, and still done 0.5 s later: no sentence was pending
            if not done():
                calm = None
            elif calm is None:
                calm = time.monotonic()
            elif time.monotonic() - calm >= 0.5:
                break
            time.sleep(0.02)
        else:
            out["lost"].append(1.0)
            continue
        starts = [r for r in avatar.received[got:] if r.line.startswith("SYNTH_START|")]
        stops = [r for r in avatar.inbox[inbox:] if r.line.startswith("SYNTH_EVENT_STOP")]
        recog = next(r.t for r in avatar.inbox[inbox:] if r.line.startswith("RECOG_EVENT_STOP|"))
        record = next(c for c in server.connections[conns:] if c.sent)
        first = starts[0].line.split("|", 3)[3]
        out["over"].append(starts[0].t - completing_time(record, first, answer))
        out["first"].append(starts[0].t - recog)
        out["between"] += [nxt.t - stop.t for stop, nxt in zip(stops, starts[1:])]
    return out


HOPS = (("llm: token in -> pushed", "p_llm"), ("-> segmenter cut the segment", "p_seg"),
        ("-> sequencer sent the command", "p_seq"), ("-> bridge wrote SYNTH_START", "p_bridge"))


def hop_profile(envs: list) -> dict[str, list[float]]:
    """Where the hops' time goes, from each envelope's ``ts`` (when its stage made it), for the
    first sentence of each turn: the token that completed it, the segment, the command, the line."""
    out: dict[str, list[float]] = {key: [] for _, key in HOPS}
    by_turn: dict[int, dict] = {}
    for e in envs:
        first = by_turn.setdefault(e.turn, {})
        if e.kind == "segment" and e.body.get("index") == 0:
            first.setdefault("segment", e)
        elif e.kind == "command" and e.body.get("type") == "SYNTH_START":
            first.setdefault("command", e)
        elif e.kind == "written" and e.body.get("type") == "SYNTH_START":
            first.setdefault("written", e)
        elif e.kind == "token":
            first.setdefault("tokens", {})[e.origin] = e
    for first in by_turn.values():
        seg, cmd, line = first.get("segment"), first.get("command"), first.get("written")
        token = first.get("tokens", {}).get(seg.origin) if seg else None
        if not (seg and cmd and line and token):
            continue
        for key, value in (("p_llm", token.ts - token.origin), ("p_seg", seg.ts - token.ts),
                           ("p_seq", cmd.ts - seg.ts), ("p_bridge", line.ts - cmd.ts)):
            out[key].append(value)
    return out


def rss_and_cpu(pids: list[int], idle: float) -> tuple[float, float, float]:
    """Resident MB of ``pids`` (summed RSS, and PSS: each shared page counted once, split among
    the processes sharing it, so the sum is what the group really holds), and their CPU over
    ``idle`` seconds as % of one core."""
    def cpu() -> float:
        total = 0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")
    def field(path: str, name: str) -> int:
        return sum(int(next(line.split()[1] for line in Path(path.format(pid)).read_text().splitlines()
                            if line.startswith(name))) for pid in pids)
    rss, pss = field("/proc/{}/status", "VmRSS:") / 1024, field("/proc/{}/smaps_rollup", "Pss:") / 1024
    before = cpu()
    time.sleep(idle)
    return rss, pss, (cpu() - before) / idle * 100 if idle else 0.0


def descendants(pid: int) -> list[int]:
    out = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out += descendants(int(entry.name))
            except (OSError, ValueError):
                continue
    return out


@contextmanager
def bus_tap(env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """:mod:`tests.bus_tap`, an observer process subscribed to the whole bus, once it is tapping."""
    tap = subprocess.Popen([sys.executable, "-m", "tests.bus_tap"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    try:
        ready, _, _ = select.select([tap.stdout], [], [], 10)  # heartbeats come every second
        assert ready and tap.stdout.readline().strip() == "ready", "the bus tap did not start"
        yield tap
    finally:
        stop_all([tap])


def pipeline_round(turns: int, idle: float, observer: bool = False, tagged: bool = False) -> dict:
    """``turns`` turns through the pipeline; ``observer``: with :func:`bus_tap` tapping the bus."""
    streams = Streams(tagged)
    server = ChatCompletionServer(streams).start()
    try:
        with tempfile.TemporaryDirectory(prefix="mmdagent-llm-bench-") as tmp:
            with launched(Path(tmp), server=server, avatar_kwargs=AVATAR) as world, \
                    (bus_tap(world.env) if observer else nullcontext()):
                since = len(world.bus.envelopes)
                out = talk_turns(world.avatar, server, streams, turns)
                hops = [e.ts - e.origin for e in world.bus.envelopes[since:] if e.kind == "written"
                        and e.body.get("type") == "SYNTH_START" and e.body.get("args", [""])[-1] in
                        {s.line.split("|", 3)[3] for s in world.avatar.received if s.line.startswith("SYNTH_START|")}]
                firsts = {}
                for e in world.bus.envelopes[since:]:
                    if e.kind == "written" and e.body.get("type") == "SYNTH_START":
                        firsts.setdefault(e.turn, e.ts - e.origin)
                out["hops"] = list(firsts.values()) or hops
                out.update(hop_profile(world.bus.envelopes[since:]))
                pids = [p.pid for p in world.pipeline.procs.values()] + [world.avatar.pid]
                out["rss"], out["pss"], out["idle_cpu"] = rss_and_cpu(pids, idle)
    finally:
        server.stop()
    return out


@contextmanager
def seed_script(server: ChatCompletionServer, avatar_kwargs: dict) -> Iterator[SimulatedMMDAgent]:
    """:mod:`tests.seed_baseline` run by the fake MMDAgent-EX (``avatar_kwargs``) against
    ``server``, in a folder of its own; killed on exit."""
    env = dict(os.environ, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="none", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(prefix="mmdagent-llm-seed-") as tmp:
        avatar = SimulatedMMDAgent(f"{sys.executable} -u -m tests.seed_baseline", mdf_dir=tmp, env=env,
                                   stderr=subprocess.DEVNULL, **avatar_kwargs).start()
        try:
            yield avatar
        finally:
            avatar.kill()


def baseline_round(turns: int, idle: float, tagged: bool = False) -> dict:
    streams = Streams(tagged)
    server = ChatCompletionServer(streams).start()
    try:
        with seed_script(server, AVATAR) as avatar:
            out = talk_turns(avatar, server, streams, turns)
            out["rss"], out["pss"], out["idle_cpu"] = rss_and_cpu(descendants(avatar.pid), idle)
    finally:
        server.stop()
    return out


def startup(rounds: int, pipeline: str = "builtin") -> list[float]:
    """The plugin from a cold start to a bridge that sees the whole pipeline (``[plugin] pipeline``)."""
    times = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="mmdagent-llm-cold-") as tmp:
            folder = Path(tmp)
            cfg_path = write_config(folder, llm={"history_file": "none"}, plugin={"pipeline": pipeline},
                                    bus={"session": f"cold-{os.getpid()}-{len(times)}"})
            cfg = config_mod.load(cfg_path)
            env = {k: v for k, v in pipeline_env(cfg_path, None).items() if k != "MMDAGENT_LLM_CONFIG"}
            began = time.monotonic()
            avatar = SimulatedMMDAgent("mmdagent-llm plugin", mdf_dir=folder, env=env,
                                       stderr=open(os.devnull, "wb")).start()
            try:
                wait_ready(cfg, ["bridge"], 30)
                bridge_sees_pipeline(cfg, 30)
                times.append(time.monotonic() - began)
            finally:
                avatar.kill()
                time.sleep(3)  # its pipeline goes with it
    return times


def long_answer(chars: int = 20000, gap: float = 0.001) -> dict[str, float]:
    """A ``chars``-character answer streamed at ``gap`` s per token: does the segmenter keep up?
    Returns tokens, the stream's length, the segmenter's lag after the last token (its last
    segment's creation minus the last token's arrival in llm) and its throughput."""
    text = "".join(ANSWERS) * (chars // len("".join(ANSWERS)) + 1)
    text = text[:chars]
    tokens = tokens_of(text, seed=7, delay=gap, longest=3)
    server = ChatCompletionServer(lambda body: [Token("OK", 0.0)] if body.get("max_tokens") == 1 else tokens).start()
    try:
        with tempfile.TemporaryDirectory(prefix="mmdagent-llm-long-") as tmp:
            with launched(Path(tmp), server=server, avatar_kwargs={"seconds_per_char": 0.0001, "min_speech": 0.01},
                          segmenter={"max_bytes": 600}) as world:
                world.avatar.send("RECOG_EVENT_START")
                world.avatar.send("RECOG_EVENT_STOP|長く話して")
                assert world.bus.wait_for(lambda envs: any(e.kind == "turn_end" and e.sender == "segmenter"
                                                           for e in envs), 120), "the long answer did not end"
                envs = list(world.bus.envelopes)
    finally:
        server.stop()
    toks = [e for e in envs if e.kind == "token" and e.sender == "llm"]
    segs = [e for e in envs if e.kind == "segment"]
    span = segs[-1].ts - toks[0].origin
    return {"tokens": len(toks), "stream_s": toks[-1].origin - toks[0].origin,
            "lag_ms": (segs[-1].ts - toks[-1].origin) * 1000, "tokens_per_s": len(toks) / span,
            "segments": len(segs)}


def conversation(turns: int, block: int = 100) -> list[dict]:
    """One conversation of ``turns`` short turns (answers of 2 sentences, tokens 2 ms apart, the
    llm keeping its history in memory, trimmed by ``[llm] history_turns``). Per block of
    ``block`` turns: the first ``SYNTH_START`` after ``RECOG_EVENT_STOP`` (p50, ms), the
    pipeline's CPU per turn (ms), its summed RSS at the block's end (MB), and how many messages
    the llm's last request of the block carried. Flat figures: nothing grows with the turns."""
    answer = "はい、わかりました。ほかに何かありますか？"
    sizes: list[int] = []

    def reply(body: dict) -> list[Token]:
        if body.get("max_tokens") == 1:
            return [Token("OK", 0.0)]
        sizes.append(len(body.get("messages") or []))
        return [Token(answer[i:i + 2], 0.002) for i in range(0, len(answer), 2)]

    server = ChatCompletionServer(reply).start()
    blocks: list[dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="mmdagent-llm-conv-") as tmp:
            with launched(Path(tmp), server=server, avatar_kwargs={"seconds_per_char": 0.001, "min_speech": 0.01},
                          llm={"history_file": "none"}) as world:
                avatar = world.avatar
                pids = [p.pid for p in world.pipeline.procs.values()] + [avatar.pid]

                def cpu() -> float:
                    return sum(sum(int(x) for x in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
                               for pid in pids) / os.sysconf("SC_CLK_TCK")
                firsts, cpu_at = [], cpu()
                for i in range(turns):
                    got, since, inbox = len(avatar.received), len(world.bus.envelopes), len(avatar.inbox)
                    avatar.send("RECOG_EVENT_START")
                    avatar.send(f"RECOG_EVENT_STOP|質問 {i}")
                    first = avatar.wait_line("SYNTH_START|", 10, after=got)
                    assert first is not None, f"turn {i} was not answered"
                    asked = next(r.t for r in avatar.inbox[inbox:] if r.line.startswith("RECOG_EVENT_STOP|"))
                    firsts.append(first.t - asked)
                    assert world.bus.wait_for(lambda envs: any(e.kind == "spoken" for e in envs[since:]), 10), \
                        f"turn {i} did not end"
                    if (i + 1) % block == 0:
                        rss, _, _ = rss_and_cpu(pids, 0)
                        now = cpu()
                        blocks.append({"turns": i + 1, "first_ms": statistics.median(firsts) * 1000,
                                       "cpu_ms": (now - cpu_at) / block * 1000, "rss": rss, "messages": sizes[-1]})
                        firsts, cpu_at = [], now
    finally:
        server.stop()
    return blocks


def _echo(cfg_path: str) -> None:
    """The far end of :func:`transport_floor`: whatever comes from ``tokens`` goes back on ``segments``."""
    cfg = config_mod.load(cfg_path)
    pull, push = connect(cfg, zmq.PULL, "tokens_out"), connect(cfg, zmq.PUSH, "segments_in")
    while (frames := pull.recv_multipart())[-1] != b"stop":
        push.send_multipart(frames)


def _direct_echo(into: str, back: str) -> None:
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind(into)
    push.connect(back)
    while (frames := pull.recv_multipart())[-1] != b"stop":
        push.send_multipart(frames)


def transport_floor(samples: int = 1000) -> dict[str, list[float]]:
    """What moving one message costs on this machine with no stage logic at all: ping-pong of a
    300-byte message between two Python processes, 5 ms apart (each end asleep in between, as
    stages are between tokens); half the round trip is one pass. Through the real broker (its C
    proxy, CURVE, tcp) and, for comparison, directly (PUSH to PULL, no broker, no CURVE, ipc)."""
    out: dict[str, list[float]] = {}
    fork = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="mmdagent-llm-floor-") as tmp:
        cfg_path = write_config(Path(tmp), bus={"session": f"floor-{os.getpid()}"})
        cfg = config_mod.load(cfg_path)
        broker = subprocess.Popen([sys.executable, "-m", "stages.commands.cli", "broker"], cwd=ROOT,
                                  env=pipeline_env(cfg_path, None), stderr=subprocess.DEVNULL)
        echo = fork.Process(target=_echo, args=(str(cfg_path),), daemon=True)
        direct = fork.Process(target=_direct_echo, args=(f"ipc://@{tmp}-in", f"ipc://@{tmp}-back"), daemon=True)
        ctx = zmq.Context()
        try:
            wait_ready(cfg, ["broker"], 20)
            echo.start()
            direct.start()
            push, pull = connect(cfg, zmq.PUSH, "tokens_in", ctx=ctx), connect(cfg, zmq.PULL, "segments_out", ctx=ctx)
            dpush, dpull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
            dpull.bind(f"ipc://@{tmp}-back")
            dpush.connect(f"ipc://@{tmp}-in")
            for name, a, b in (("broker", push, pull), ("direct", dpush, dpull)):
                times = []
                for i in range(samples + 50):  # the first 50 only warm the connections up
                    began = time.perf_counter()
                    a.send_multipart([b"tokens.x", b"x" * 300])
                    assert b.poll(5000), f"the {name} echo did not answer"
                    b.recv_multipart()
                    if i >= 50:
                        times.append((time.perf_counter() - began) / 2)
                    time.sleep(0.005)
                a.send_multipart([b"tokens.x", b"stop"])
                out[name] = times
        finally:
            ctx.destroy(linger=0)
            stop_all([broker])
            for proc in (echo, direct):
                proc.join(2)
                if proc.is_alive():
                    proc.kill()
    return out


def machine() -> str:
    """The CPU, its cores, the system and Python, for a bench's heading."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "") if Path("/proc/cpuinfo").exists() else ""
    return (f"{cpu or platform.processor()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def pct(values: list[float], q: float) -> float:
    ms = sorted(values)
    return ms[min(len(ms) - 1, round(q * (len(ms) - 1)))] if ms else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--conversation", type=int, default=1000, help="turns of the long conversation (0: skip)")
    parser.add_argument("--tagged", action="store_true", help="every answer starts with [happy] (the seed speaks it)")
    args = parser.parse_args()
    sides: dict[str, list[dict]] = {"pipeline": [], "observed": [], "baseline": []}
    for r in range(args.rounds):
        sides["pipeline"].append(pipeline_round(args.turns, args.idle, tagged=args.tagged))
        sides["observed"].append(pipeline_round(args.turns, args.idle, observer=True, tagged=args.tagged))
        sides["baseline"].append(baseline_round(args.turns, args.idle, tagged=args.tagged))
        print(f"round {r + 1} done", file=sys.stderr, flush=True)
    cold = startup(args.rounds)
    cold_supervisord = startup(args.rounds, "supervisord")
    long = long_answer()
    floor = transport_floor()
    talk = conversation(args.conversation) if args.conversation else []

    def fig(side: str, key: str, q: float, scale: float = 1000) -> tuple[float, float, float]:
        per = [pct(run[key], q) * scale for run in sides[side] if run.get(key)]
        return (statistics.median(per), min(per), max(per)) if per else (float("nan"),) * 3

    def one(side: str, key: str) -> tuple[float, float, float]:
        per = [run[key] for run in sides[side]]
        return statistics.median(per), min(per), max(per)

    def row(name: str, p: tuple, o: tuple, b: tuple) -> None:
        ratio = p[0] / b[0] if b[0] == b[0] and b[0] else float("nan")
        cells = [f"{v[0]:>8.2f} ({v[1]:.2f}-{v[2]:.2f})" if v[0] == v[0] else f"{'-':>8}" for v in (p, o, b)]
        print(f"{name:<30} {cells[0]:>24} {cells[1]:>24} {cells[2]:>24} {ratio:>6.2f}")

    rows = [("over the limit p50 (ms)", "over", 0.5, 1000), ("over the limit p99 (ms)", "over", 0.99, 1000),
            ("hops p50 (ms)", "hops", 0.5, 1000), ("hops p99 (ms)", "hops", 0.99, 1000),
            ("between sentences p50 (ms)", "between", 0.5, 1000), ("between sentences p99 (ms)", "between", 0.99, 1000),
            ("first SYNTH_START p50 (ms)", "first", 0.5, 1000)]
    print(f"\nmachine: {machine()}; {args.rounds} rounds x {args.turns} turns per side, tokens of 1-3 "
          f"characters {GAP * 1000:.0f} ms apart. Each figure: median of the rounds (min-max of the rounds)")
    print(f"{'figure':<30} {'pipeline':>24} {'+ observer of everything':>24} {'seed baseline':>24} {'ratio':>6}")
    for name, key, q, scale in rows:
        row(name, fig("pipeline", key, q, scale), fig("observed", key, q, scale), fig("baseline", key, q, scale))
    for name, key in (("resident memory, RSS sum (MB)", "rss"), ("resident memory, PSS sum (MB)", "pss"),
                      ("idle CPU (% of a core)", "idle_cpu")):
        row(name, one("pipeline", key), one("observed", key), one("baseline", key))
    lost = {s: sum(len(run["lost"]) for run in sides[s]) for s in sides}
    print(f"{'turns lost':<30} {lost['pipeline']:>24} {lost['observed']:>24} {lost['baseline']:>24}")
    print("where the pipeline's hops go (first sentence of each turn, p50 / p99 ms):")
    for name, key in HOPS:
        p50, p99 = fig("pipeline", key, 0.5), fig("pipeline", key, 0.99)
        print(f"  {name:<34} {p50[0]:>7.3f} / {p99[0]:.3f}")
    print("the transport's floor, no stage logic (one pass, p50 / p99 ms):")
    for name, label in (("broker", "through the broker (C proxy, CURVE, tcp)"), ("direct", "direct PUSH->PULL (no broker, ipc)")):
        print(f"  {label:<44} {pct(floor[name], 0.5) * 1000:>6.3f} / {pct(floor[name], 0.99) * 1000:.3f}")
    print(f"20,000-character answer at 1 ms per token: {long['tokens']} tokens in {long['stream_s']:.1f} s, "
          f"{long['segments']} segments; the segmenter's last segment {long['lag_ms']:.1f} ms after the last token; "
          f"{long['tokens_per_s']:.0f} tokens/s through llm and segmenter")
    print(f"{'plugin cold start (s)':<30} {statistics.median(cold):>8.2f} ({min(cold):.2f}-{max(cold):.2f})"
          f"   under supervisord: {statistics.median(cold_supervisord):.2f} "
          f"({min(cold_supervisord):.2f}-{max(cold_supervisord):.2f})")
    if talk:
        print(f"a {args.conversation}-turn conversation, per {talk[0]['turns']} turns: first SYNTH_START p50 (ms) | "
              f"pipeline CPU per turn (ms) | RSS sum at the end (MB) | messages in the llm's request")
        for block in talk:
            print(f"  turns {block['turns'] - talk[0]['turns'] + 1:>4}-{block['turns']:<5} {block['first_ms']:>8.1f} "
                  f"{block['cpu_ms']:>8.1f} {block['rss']:>8.1f} {block['messages']:>6}")


if __name__ == "__main__":
    main()
