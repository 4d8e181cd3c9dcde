"""Restarts under real supervisord: history survives the llm, a corrupt history file is reported
and does not stop the conversation, an utterance that comes while the llm is down is answered
once it is back (or gets the notice when it is too old)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.e2e import World, managed, tokens_of
from tests.harness import BIN, logs_text

CORRUPT = b'{"format": "mmdagent-llm-history", "pairs": ['


def pid_of(world: World, stage: str) -> int:
    return [e.body["pid"] for e in world.bus.of("heartbeat") if e.body.get("stage") == stage][-1]


def restarted(world: World, stage: str, old: int, timeout: float = 20.0) -> bool:
    return bool(world.bus.wait_for(lambda envs: any(e.kind == "heartbeat" and e.body.get("stage") == stage
                                                    and e.body.get("ready") and e.body.get("pid") != old
                                                    for e in envs), timeout))


def supervisorctl(world: World, *args: str) -> str:
    out = subprocess.run([str(BIN / "supervisorctl"), "-c", str(world.run_dir / "supervisord.conf"), *args],
                         env=world.env, capture_output=True, text=True, timeout=30)
    return out.stdout + out.stderr


def bridge_reports(world: World, pipeline: bool, timeout: float = 20.0) -> bool:
    since = len(world.bus.envelopes)
    return bool(world.bus.wait_for(lambda envs: any(e.kind == "heartbeat" and e.body.get("stage") == "bridge"
                                                    and e.body["info"].get("pipeline") is pipeline
                                                    for e in envs[since:]), timeout))


def test_history_survives_an_llm_restart_and_a_held_utterance_is_answered(tmp_path: Path):
    with managed(tmp_path) as world:
        world.llm.queue(tokens_of("覚えました。"))
        world.talk("私の名前はハナです。")
        old = pid_of(world, "llm")
        os.kill(old, signal.SIGKILL)
        # said while the llm is down or just restarting: held or asked again by the bridge
        world.llm.queue(tokens_of("ハナさんですね。"))
        turn = world.talk("私の名前は？", timeout=40)
        assert restarted(world, "llm", old)
        assert turn.spoken == ["ハナさんですね。"]
        messages = [(m["role"], m["content"]) for m in world.server.requests[-1]["messages"][1:]]
        assert messages == [("user", "私の名前はハナです。"), ("assistant", "覚えました。"), ("user", "私の名前は？")]


def test_a_corrupt_history_file_is_reported_and_the_conversation_starts_fresh(tmp_path: Path):
    history = tmp_path / "history.json"
    history.write_bytes(CORRUPT)  # there before the llm starts
    with managed(tmp_path, llm={"history_file": str(history)}) as world:
        world.llm.queue(tokens_of("はじめまして。"))
        assert world.talk("こんにちは").spoken == ["はじめまして。"]
        assert [m["role"] for m in world.server.requests[-1]["messages"]] == ["system", "user"]
        log = logs_text(world.run_dir)
        assert "history" in log and "corrupt" in log.lower()
        assert list(tmp_path.glob("history.json.corrupt-*"))


def test_an_utterance_while_the_llm_is_down_waits_for_it(tmp_path: Path):
    with managed(tmp_path) as world:
        assert "stopped" in supervisorctl(world, "stop", "pipeline:llm")
        assert bridge_reports(world, pipeline=False)
        mark = len(world.avatar.received)
        world.avatar.send("RECOG_EVENT_START")
        world.avatar.send("RECOG_EVENT_STOP|待っててね")
        assert world.avatar.wait_line("NOTIFY_SHOW|", 10, after=mark), "the user was not told"
        world.llm.queue(tokens_of("お待たせしました。"))
        assert "started" in supervisorctl(world, "start", "pipeline:llm")
        assert world.avatar.wait_line("SYNTH_START|0|mei_voice_normal|お待たせしました。", 30, after=mark)
        assert world.server.requests[-1]["messages"][-1]["content"] == "待っててね"


def test_an_utterance_older_than_max_age_gets_the_notice(tmp_path: Path):
    with managed(tmp_path, turn={"max_age": 2.0}) as world:
        supervisorctl(world, "stop", "pipeline:llm")
        assert bridge_reports(world, pipeline=False)
        mark, requests = len(world.avatar.received), len(world.server.requests)
        world.avatar.send("RECOG_EVENT_STOP|遅すぎる質問")
        notice = f"SYNTH_START|0|mei_voice_normal|{world.cfg['turn']['failure_notice']}"
        assert world.avatar.wait_line(notice, 15, after=mark) is not None
        supervisorctl(world, "start", "pipeline:llm")
        assert bridge_reports(world, pipeline=True)
        assert len(world.server.requests) == requests  # the stale question is not asked late
        world.llm.queue(tokens_of("はい。"))
        assert world.talk("次の質問").spoken == ["はい。"]
