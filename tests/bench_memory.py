"""What memory costs over a long conversation: request size and first-token time, turn by turn.

    python -m tests.bench_memory [--turns 1000] [--budget 3000] [--first-token 0.2]

Runs the real stage processes (the launcher), the simulated MMDAgent-EX (fast speech) and a
local server answering every turn after ``--first-token`` seconds and every summary request
like a model keeping names would (:class:`tests.e2e.Summarizing`), with ``[llm] model =
"gpt-4o-mini"`` (counted with its own encoding), ``history_tokens = --budget``, the default
``history_turns``, a remembered fact every 100 turns (the ``remember`` tool's file) and a name
in every 50th utterance. Prints, for each tenth of the run: the median and largest request
size in tokens (counted as the model counts them), the median first-token time (the
utterance written to the bridge -> the first token in the llm stage), the llm process's
resident memory, and in all: the summaries made, the summary's and the history file's size.

A benchmark, not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from stages.llm.history_store import read
from stages.llm.memory import Memory, path_beside
from stages.llm.offline_responder import ChatCompletionServer
from stages.llm.tokens import TokenCounter
from tests.e2e import Summarizing, is_summary, launched
from tests.test_restart import pid_of

MODEL = "gpt-4o-mini"
TOPICS = ["今日の天気", "好きな食べ物", "週末の予定", "最近読んだ本", "おすすめの映画", "旅行の思い出"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(turns: int, budget: int, first_token: float) -> None:
    counter = TokenCounter(MODEL)
    counter.wait_loaded(30)
    reply = Summarizing(first_token=first_token)
    server = ChatCompletionServer(reply).start()
    rows, window = [], max(1, turns // 10)
    sizes: list[int] = []
    firsts: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="mmdagent-llm-bench-memory-") as tmp:
            history = Path(tmp) / "history-bench.json"
            memory = Memory(path_beside(history))
            with launched(Path(tmp), server=server, llm={"model": MODEL, "history_tokens": budget, "summarize": True,
                                                         "history_file": str(history)},
                          avatar_kwargs={"seconds_per_char": 0.0005, "min_speech": 0.01}) as world:
                for i in range(1, turns + 1):
                    if i % 100 == 0:
                        memory.remember(f"{i}回目の会話の頃、ユーザーは{TOPICS[i // 100 % len(TOPICS)]}の話をした")
                    name = f"私の名前は{i}号です。" if i % 50 == 1 else ""
                    asked = len(server.requests)
                    sent = time.time()
                    turn = world.talk(f"{name}{i}番目です。{TOPICS[i % len(TOPICS)]}について話しましょう。")
                    mine = [r for r in server.requests[asked:] if not is_summary(r)]
                    sizes.append(counter.messages(mine[-1]["messages"]))
                    firsts.append(turn.result["first_token"] - sent)
                    if i % window == 0:
                        rows.append((i, statistics.median(sizes), max(sizes), statistics.median(firsts) * 1000,
                                     rss_mb(pid_of(world, "llm"))))
                        sizes, firsts = [], []
                conversation = read(history.read_bytes())
                folds = [r for r in server.requests if is_summary(r)]
                print(f"bench_memory: {turns} turns, [llm] history_tokens = {budget}, first token after "
                      f"{first_token:.2f} s, model {MODEL}")
                print(f"{'turns':>6} {'request tokens (median, max)':>30} {'first token ms':>15} {'llm RSS MB':>11}")
                for i, median, top, first, rss in rows:
                    print(f"{i:>6} {median:>18.0f} {top:>11} {first:>15.1f} {rss:>11.1f}")
                print(f"summaries asked: {len(folds)}, of which ok: "
                      f"{sum(1 for e in world.bus.of('summary') if e.body['ok'])}; summary now "
                      f"{len(conversation.summary)} characters covering {conversation.folded} exchanges; "
                      f"{len(conversation.pairs)} exchanges unfolded; history file {history.stat().st_size} bytes; "
                      f"memory file {len(memory.facts())} facts")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--budget", type=int, default=3000)
    parser.add_argument("--first-token", type=float, default=0.2)
    args = parser.parse_args()
    run(args.turns, args.budget, args.first_token)


if __name__ == "__main__":
    main()
