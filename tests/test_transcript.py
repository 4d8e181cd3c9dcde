"""The transcript observer and ``mmdagent-llm transcript``: under real supervisord (the observer
started from deploy/supervisord.conf's ``observers`` group), a conversation with an
interruption, an LLM error and a stage restart; a killed observer loses nothing it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker import config as config_mod
from stages.commands.transcript import describe
from stages.llm.offline_responder import Status
from stages.observers.transcript import RotatingLines, path_of
from tests.e2e import World, managed, tokens_of
from tests.harness import ROOT
from tests.test_restart import pid_of, restarted, supervisorctl

SLOW_AVATAR = {"seconds_per_char": 0.08, "min_speech": 0.3, "stop_delay": 0.3, "cut_delay": 0.3}
WAIT = 20.0


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def wait_record(path: Path, pred, timeout: float = WAIT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = next((r for r in records(path) if pred(r)), None)
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no such record in {path}: {records(path)[-10:]}")


def utter(world: World, text: str) -> int:
    before = len(world.bus.envelopes)
    world.avatar.send("RECOG_EVENT_START")
    world.avatar.send(f"RECOG_EVENT_STOP|{text}")
    turn = world.bus.wait_for(lambda envs: next((e.turn for e in envs[before:] if e.kind == "turn_start"
                                                  and e.body["text"] == text), 0), WAIT)
    assert turn
    return turn


def test_a_conversation_is_written_line_by_line(tmp_path: Path):
    with managed(tmp_path, avatar_kwargs=SLOW_AVATAR) as world:
        path = path_of(world.cfg)
        assert "observers:transcript" in supervisorctl(world, "start", "observers:transcript")
        wait_record(path, lambda r: r["event"] == "observer")
        assert world.bus.wait_for(lambda envs: any(e.kind == "heartbeat" and e.body.get("stage") == "transcript"
                                                   and e.body.get("ready") for e in envs), WAIT)
        # 1. a plain turn
        world.llm.queue(tokens_of("こんにちは。元気です。"))
        first = world.talk("こんにちは")
        # 2. an interruption while the second of three sentences is spoken
        world.llm.queue(tokens_of("一文目です。二文目です。三文目です。"))
        second = utter(world, "長く話して")
        assert world.bus.wait_for(lambda envs: any(e.kind == "speech" and e.turn == second and e.body["index"] == 1
                                                   and e.body["state"] == "started" for e in envs), WAIT)
        world.avatar.send("RECOG_EVENT_START")
        # 3. an LLM error: the key refused
        world.llm.queue([Status(401, "Incorrect API key provided")])
        third = world.talk("もう一度")
        # 4. a stage restart
        old = pid_of(world, "segmenter")
        os.kill(old, signal.SIGKILL)
        assert restarted(world, "segmenter", old)
        wait_record(path, lambda r: r["event"] == "stage" and r["stage"] == "segmenter" and r["change"] == "restarted")
        world.llm.queue(tokens_of("戻りました。"))
        fourth = world.talk("大丈夫？", timeout=40)
        wait_record(path, lambda r: r["event"] == "turn" and r["turn"] == fourth.turn)
        # 5. the observer is killed: what it wrote stays, whole; supervisord brings it back
        before = path.read_bytes()
        observer = pid_of(world, "transcript")
        os.kill(observer, signal.SIGKILL)
        assert restarted(world, "transcript", observer)
        wait_record(path, lambda r: r["event"] == "observer" and r["pid"] != observer)
        after = path.read_bytes()
        shown = subprocess.run([sys.executable, "-m", "stages.commands.cli", "transcript"], env=world.env,
                               capture_output=True, text=True, encoding="utf-8", timeout=30)
    recs = records(path)
    assert after.startswith(before) and before.endswith(b"\n")            # nothing lost, nothing cut
    assert all({"time", "ts", "session", "turn", "event"} <= r.keys() for r in recs)

    def of(turn: int, event: str) -> list[dict]:
        return [r for r in recs if r["turn"] == turn and r["event"] == event]

    assert [r["text"] for r in of(first.turn, "user")] == ["こんにちは"]
    assert [(r["text"], r["heard"]) for r in of(first.turn, "sentence")] == [("こんにちは。", "full"), ("元気です。", "full")]
    (done,) = of(first.turn, "turn")
    assert done["reason"] == "done" and done["answer"] == "こんにちは。元気です。"
    assert all(isinstance(done["latency_ms"][k], int) for k in ("first_token", "first_synth", "first_speech"))
    assert done["latency_ms"]["first_token"] <= done["latency_ms"]["first_synth"] <= done["latency_ms"]["first_speech"]

    heard = {r["index"]: r["heard"] for r in of(second, "sentence")}
    assert heard[0] == "full" and heard[1] == "cut" and heard.get(2, "never") == "never"
    (cut,) = of(second, "interrupted")
    assert cut["reason"] == "interrupted" and cut["heard"] == ["一文目です。", "二文目です。"]
    assert of(second, "turn")[0]["reason"] == "interrupted"

    (error,) = of(third.turn, "error")
    assert error["cause"] == "authentication" and "sk-" not in json.dumps(error)
    assert of(third.turn, "turn")[0]["reason"] == "error"
    assert [r["heard"] for r in of(fourth.turn, "sentence")] == ["full"]

    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "user    こんにちは" in text and "avatar  元気です。" in text and "[cut off]" in text
    assert "!!! authentication: the API key was refused" in text and "segmenter restarted" in text
    assert "first token" in text and "transcript observer started" in text
    print(text)


def test_rotation_keeps_every_line(tmp_path: Path):
    lines = RotatingLines(tmp_path / "t" / "s.jsonl", max_bytes=200, keep=2)
    for i in range(30):
        lines.write(json.dumps({"event": "user", "text": f"line {i:02d}"}))
    lines.close()
    files = sorted((tmp_path / "t").iterdir())
    assert [f.name for f in files] == ["s.1.jsonl", "s.2.jsonl", "s.jsonl"]
    assert all(f.stat().st_size <= 200 for f in files)
    kept = [json.loads(x)["text"] for f in (files[1], files[0], files[2]) for x in f.read_text().splitlines()]
    assert kept == [f"line {i:02d}" for i in range(30 - len(kept), 30)]          # the newest, in order
    if os.name == "posix":
        assert {f.stat().st_mode & 0o777 for f in files} == {0o600}
        assert (tmp_path / "t").stat().st_mode & 0o777 == 0o700


def test_follow_prints_new_lines_across_a_rotation(tmp_path: Path):
    cfg_path = tmp_path / "mmdagent-llm.toml"
    cfg_path.write_text(f"[transcript]\nfolder = '{tmp_path / 't'}'\nmax_bytes = 300\n", encoding="utf-8")
    cfg = config_mod.load(cfg_path)
    lines = RotatingLines(path_of(cfg), 300, 3)
    env = dict(os.environ, MMDAGENT_LLM_CONFIG=str(cfg_path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "stages.commands.cli", "transcript", "--follow"], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out: list[str] = []
        for i in range(12):  # 12 lines of ~60 bytes: the file rotates twice
            lines.write(json.dumps({"time": "2026-11-26T12:00:00.000+00:00", "event": "user", "turn": i,
                                    "text": f"発話 {i}"}, ensure_ascii=False))
            out.append(proc.stdout.readline().decode("utf-8"))
        lines.write("not json")
        out.append(proc.stdout.readline().decode("utf-8"))
    finally:
        proc.terminate()
        proc.wait(10)
        lines.close()
    assert [line.split("user", 1)[1].strip() for line in out[:12]] == [f"発話 {i}" for i in range(12)]
    assert out[12].startswith("(not a transcript record")


def test_every_event_reads_as_a_line():
    for rec in ({"event": "user", "text": "x"}, {"event": "sentence", "text": "y", "heard": "never"},
                {"event": "interrupted", "reason": "away", "heard": []}, {"event": "error", "cause": "timeout"},
                {"event": "turn", "turn": 3, "reason": "done", "latency_ms": {"first_token": 5}},
                {"event": "stage", "stage": "llm", "change": "gone"}, {"event": "broken", "stage": "x"},
                {"event": "notice", "level": "error", "text": "t"}, {"event": "observer", "pid": 1},
                {"event": "greeting", "text": "こんにちは"},
                {"event": "tool", "name": "current_time", "ok": False, "result": "error:\nno result"},
                {"event": "summary", "ok": True, "exchanges": 6, "text": "名前はハナ。\n猫が好き。"},
                {"event": "summary", "ok": False, "exchanges": 6, "error": "timeout"}):
        assert "\n" not in describe(rec) and describe(rec).strip()


def test_greetings_tool_calls_and_summaries_are_recorded():
    from broker import wire
    from stages.latency import TurnClock
    from stages.observers.transcript import Transcript

    class Lines(list):
        write = list.append
    t = Transcript.__new__(Transcript)  # the bookkeeping only: no sockets
    t.lines, t.clock, t.turns, t.stall = Lines(), TurnClock(), {}, 60.0
    t.sender = wire.Sender("transcript")
    t.on_event(wire.Sender("bridge").make("turn_start", {"text": "", "say": "こんにちは"}, turn=7, origin=1.0))
    t.on_event(wire.Sender("llm").make("tool", {"name": "current_time", "ok": True, "seconds": 0.01,
                                                "result": "x" * 1000}, turn=7))
    t.on_event(wire.Sender("llm").make("summary", {"ok": True, "exchanges": 6, "text": "名前はハナ。" * 500,
                                                   "error": ""}))
    greeting, tool, folded = (json.loads(line) for line in t.lines)
    assert (greeting["event"], greeting["text"], greeting["turn"]) == ("greeting", "こんにちは", 7)
    assert (folded["event"], folded["ok"], folded["exchanges"], len(folded["text"])) == ("summary", True, 6, 2000)
    assert (tool["event"], tool["name"], tool["ok"], len(tool["result"])) == ("tool", "current_time", True, 300)
