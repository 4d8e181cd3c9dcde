"""Many avatars on one pipeline host: ``python -m tests.bench_avatars [--avatars 1 5 20] [--rounds 3]``.

Issue 18. For each count N, one ``mmdagent-llm remote --listen`` serves N avatars (one pipeline
per avatar, each started by its avatar's process); N fake MMDAgent-EX apps dial it in client mode,
each from its own loopback address. Then:

- memory: RSS and PSS (``/proc/<pid>/smaps_rollup``: shared pages split between their users)
  of every process of ours once all are connected and idle, and per avatar (all but the
  listener, divided by N); and the CPU they use idle, over :data:`IDLE` seconds;
- first audio: ``rounds`` rounds in which all N avatars are asked at once (after one round not
  measured); per utterance, the time from ``RECOG_EVENT_STOP`` to the first ``SYNTH_START`` the
  app received. The LLM (the local streaming server, the real openai client) sends its first
  token :data:`FIRST_TOKEN` seconds after each request; the overhead of N is its p50 minus N=1's.

With ``--shared-llm``, instead: the one part of the other design (one pipeline shared by every
avatar) that can be measured without building it, one process streaming N answers at once.

Linux only (reads /proc). Reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from stages.llm.offline_responder import Token
from tests.e2e import tokens_of
from tests.harness import free_base_port, processes_with
from tests.remote_world import App, RemoteRun

FIRST_TOKEN = 0.4
IDLE = 10.0  # seconds of idle CPU measured
ANSWER = "はい、お答えします。少しお待ちください。"


def reply(body: dict) -> list[Token]:
    tokens = tokens_of(ANSWER, delay=0.03)
    return [Token(tokens[0].text, FIRST_TOKEN), *tokens[1:]]


def memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in kB; (0, 0) if it is gone."""
    values = {"Rss:": 0, "Pss:": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(" ")
            if key in values:
                values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values["Rss:"], values["Pss:"]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes ``pids`` have used so far."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def measure(count: int, rounds: int, tmp: Path, idle: float = IDLE) -> dict:
    names = [f"av{i:02d}" for i in range(1, count + 1)]
    avatars = {name: {"address": f"127.0.0.{10 + i}"} for i, name in enumerate(names, 1)}
    run = RemoteRun.make(tmp, reply=reply, remote={"allow": ["127.0.0.0/8"], "avatars": avatars})
    port = free_base_port(1)
    apps: dict[str, App] = {}
    try:
        listener = run.start("--listen", f"127.0.0.1:{port}")
        for name in names:
            (tmp / name).mkdir()
            apps[name] = App.start(tmp / name, port, dial="127.0.0.1", retry_count=600,
                                   source=avatars[name]["address"])
        for name in names:
            run.wait_connected(run.avatar_cfg(name), timeout=300)
        time.sleep(3)  # idle: start-up allocations settled (a measurement, not a synchronisation)
        # not the start-up check (`doctor --notice`): it ends by itself, sooner or later on a loaded machine
        pids = [p for p in processes_with(run.mark) if b" doctor" not in _cmdline(p)]
        rss, pss = map(sum, zip(*(memory(p) for p in pids)))
        used = cpu_seconds(pids)
        time.sleep(idle)  # the idle CPU of N avatars: heartbeats, liveness checks
        idle_cpu = (cpu_seconds(pids) - used) / idle
        own_rss, own_pss = memory(listener.pid)
        waits: list[float] = []
        for i in range(rounds + 1):
            took: dict[str, float] = {}
            barrier = threading.Barrier(count)

            def ask(name: str) -> None:
                barrier.wait()
                took[name] = apps[name].ask(f"{name}の質問{i}", ANSWER, timeout=120)
            threads = [threading.Thread(target=ask, args=(name,)) for name in names]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if i:
                waits += took.values()
        return {"processes": len(pids), "rss": rss, "pss": pss, "idle_cpu": idle_cpu, "per_avatar_rss": (rss - own_rss) / count,
                "per_avatar_pss": (pss - own_pss) / count, "waits": waits}
    finally:
        for app in apps.values():
            app.quit()
        run.stop()
        run.close()


def shared_llm(count: int, rounds: int) -> list[float]:
    """The one part of the other design that can be measured without building it: one process
    streaming ``count`` answers at once (threads, the real openai client), as an llm stage shared
    by every avatar would; per request, the time to its first content chunk minus
    :data:`FIRST_TOKEN`: what that process adds."""
    import openai

    from stages.llm.offline_responder import ChatCompletionServer
    server = ChatCompletionServer(reply).start()
    client = openai.OpenAI(api_key="sk-bench", base_url=server.base_url, max_retries=0)
    added: list[float] = []
    try:
        for i in range(rounds + 1):
            barrier = threading.Barrier(count)
            took: list[float] = []

            def ask(n: int) -> None:
                barrier.wait()
                start = time.monotonic()
                stream = client.chat.completions.create(model="bench", stream=True,
                                                        messages=[{"role": "user", "content": str(n)}])
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        took.append(time.monotonic() - start - FIRST_TOKEN)
                        break
                stream.close()
            threads = [threading.Thread(target=ask, args=(n,)) for n in range(count)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if i:
                added += took
    finally:
        server.stop()
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avatars", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shared-llm", action="store_true",
                        help="only: N answers streamed at once by one process (the shared design's llm)")
    args = parser.parse_args()
    if args.shared_llm:
        print("one process streaming N answers at once (threads, the openai client): its delay to the first chunk")
        for count in args.avatars:
            added = sorted(shared_llm(count, args.rounds))
            print(f"{count:3d} avatars: p50 {statistics.median(added) * 1000:.0f} ms, "
                  f"p90 {added[int(0.9 * (len(added) - 1))] * 1000:.0f} ms")
        return
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        os.environ["XDG_STATE_HOME"] = str(Path(folder) / "state")  # keys and run folders of this bench only
        for count in args.avatars:
            tmp = Path(folder) / f"n{count}"
            tmp.mkdir()
            result = measure(count, args.rounds, tmp)
            rows.append((count, result))
            print(f"N={count}: done", flush=True)
    base = statistics.median(rows[0][1]["waits"])
    print(f"\nfirst token {FIRST_TOKEN * 1000:.0f} ms after each request; all N avatars asked at once, "
          f"{args.rounds} rounds")
    print("avatars  processes  RSS MB  PSS MB  per avatar RSS/PSS MB  idle CPU %  first SYNTH_START p50 / p90 ms  "
          f"overhead p50 ms (vs N={rows[0][0]})")
    for count, r in rows:
        waits = sorted(r["waits"])
        p50, p90 = statistics.median(waits), waits[int(0.9 * (len(waits) - 1))]
        print(f"{count:7d}  {r['processes']:9d}  {r['rss'] / 1024:6.0f}  {r['pss'] / 1024:6.0f}  "
              f"{r['per_avatar_rss'] / 1024:10.0f} / {r['per_avatar_pss'] / 1024:.0f}  {r['idle_cpu'] * 100:10.1f}  "
              f"{p50 * 1000:17.0f} / {p90 * 1000:.0f}  {(p50 - base) * 1000:+14.0f}")


if __name__ == "__main__":
    main()
