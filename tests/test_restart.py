"""Restarts under real supervisord: history survives the llm, a corrupt history file is reported
and does not stop the conversation, an utterance that comes while the llm is down is answered
once it is back."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from stages import config as config_mod
from stages.offline_responder import ChatCompletionServer
from tests.e2e import ScriptedLLM, World, start_avatar, tokens_of
from tests.harness import BusWatcher, logs_text, pipeline_env, supervised, wait_pipeline, write_config


def pid_of(world: World, stage: str) -> int:
    return [e.body["pid"] for e in world.bus.of("heartbeat") if e.body.get("stage") == stage][-1]


def restarted(world: World, stage: str, old: int, timeout: float = 20.0) -> bool:
    return bool(world.bus.wait_for(lambda envs: any(e.kind == "heartbeat" and e.body.get("stage") == stage
                                                    and e.body.get("ready") and e.body.get("pid") != old
                                                    for e in envs), timeout))


def run_world(tmp: Path, history_text: bytes | None = None):
    server = ChatCompletionServer(ScriptedLLM()).start()
    mdf = tmp / "content"
    mdf.mkdir()
    cfg_path = write_config(mdf)
    cfg = config_mod.load(cfg_path)
    if history_text is not None:
        Path(cfg["llm"]["history_file"]).write_bytes(history_text)
    env = pipeline_env(cfg_path, server.base_url)
    return server, mdf, cfg, env


def test_history_survives_an_llm_restart_and_a_held_utterance_is_answered(tmp_path: Path):
    server, mdf, cfg, env = run_world(tmp_path)
    avatar = bus = None
    try:
        with supervised(tmp_path, env, "supervisord") as run_dir:
            wait_pipeline(cfg)
            bus = BusWatcher(cfg)
            avatar = start_avatar(cfg, mdf, {k: v for k, v in env.items() if k != "MMDAGENT_LLM_CONFIG"})
            world = World(cfg, avatar, bus, server.reply, server, run_dir)
            world.llm.queue(tokens_of("覚えました。"))
            world.talk("私の名前はハナです。")
            old = pid_of(world, "llm")
            os.kill(old, signal.SIGKILL)
            # said while the llm is down (or just restarting): held by the bridge, answered after
            world.llm.queue(tokens_of("ハナさんですね。"))
            turn = world.talk("私の名前は？", timeout=40)
            assert restarted(world, "llm", old)
            assert turn.spoken == ["ハナさんですね。"]
            messages = [(m["role"], m["content"]) for m in server.requests[-1]["messages"][1:]]
            assert messages == [("user", "私の名前はハナです。"), ("assistant", "覚えました。"), ("user", "私の名前は？")]
    finally:
        if avatar is not None:
            avatar.kill()
        if bus is not None:
            bus.close()
        server.stop()


def test_a_corrupt_history_file_is_reported_and_the_conversation_starts_fresh(tmp_path: Path):
    server, mdf, cfg, env = run_world(tmp_path, history_text=b'{"format": "mmdagent-llm-history", "pairs": [')
    avatar = bus = None
    try:
        with supervised(tmp_path, env, "supervisord") as run_dir:
            wait_pipeline(cfg)
            bus = BusWatcher(cfg)
            avatar = start_avatar(cfg, mdf, {k: v for k, v in env.items() if k != "MMDAGENT_LLM_CONFIG"})
            world = World(cfg, avatar, bus, server.reply, server, run_dir)
            world.llm.queue(tokens_of("はじめまして。"))
            assert world.talk("こんにちは").spoken == ["はじめまして。"]
            assert [m["role"] for m in server.requests[-1]["messages"]] == ["system", "user"]
            log = logs_text(run_dir)
            assert "history" in log and "corrupt" in log.lower()
            assert list(Path(cfg["llm"]["history_file"]).parent.glob("*.corrupt-*"))
    finally:
        if avatar is not None:
            avatar.kill()
        if bus is not None:
            bus.close()
        server.stop()


def supervisorctl(run_dir: Path, env: dict[str, str], *args: str) -> str:
    import subprocess
    from tests.harness import BIN
    out = subprocess.run([str(BIN / "supervisorctl"), "-c", str(run_dir / "supervisord.conf"), *args],
                         env=env, capture_output=True, text=True, timeout=30)
    return out.stdout + out.stderr


def bridge_reports(world: World, pipeline: bool, timeout: float = 20.0) -> bool:
    since = len(world.bus.envelopes)
    return bool(world.bus.wait_for(lambda envs: any(e.kind == "heartbeat" and e.body.get("stage") == "bridge"
                                                    and e.body["info"].get("pipeline") is pipeline
                                                    for e in envs[since:]), timeout))


def test_an_utterance_while_the_llm_is_down_waits_for_it_or_gets_the_notice(tmp_path: Path):
    server, mdf, cfg, env = run_world(tmp_path)
    avatar = bus = None
    try:
        with supervised(tmp_path, env, "supervisord") as run_dir:
            wait_pipeline(cfg)
            bus = BusWatcher(cfg)
            avatar = start_avatar(cfg, mdf, {k: v for k, v in env.items() if k != "MMDAGENT_LLM_CONFIG"})
            world = World(cfg, avatar, bus, server.reply, server, run_dir)
            assert "stopped" in supervisorctl(run_dir, env, "stop", "pipeline:llm")
            assert bridge_reports(world, pipeline=False)
            mark = len(avatar.received)
            avatar.send("RECOG_EVENT_START")
            avatar.send("RECOG_EVENT_STOP|待っててね")
            assert avatar.wait_line("NOTIFY_SHOW|", 10, after=mark), "the user was not told"
            world.llm.queue(tokens_of("お待たせしました。"))
            assert "started" in supervisorctl(run_dir, env, "start", "pipeline:llm")
            assert avatar.wait_line("SYNTH_START|0|mei_voice_normal|お待たせしました。", 30, after=mark)
            assert server.requests[-1]["messages"][-1]["content"] == "待っててね"
    finally:
        if avatar is not None:
            avatar.kill()
        if bus is not None:
            bus.close()
        server.stop()


def test_an_utterance_older_than_max_age_gets_the_notice(tmp_path: Path):
    server = ChatCompletionServer(ScriptedLLM()).start()
    mdf = tmp_path / "content"
    mdf.mkdir()
    cfg_path = write_config(mdf, turn={"max_age": 2.0})
    cfg = config_mod.load(cfg_path)
    env = pipeline_env(cfg_path, server.base_url)
    avatar = bus = None
    try:
        with supervised(tmp_path, env, "supervisord") as run_dir:
            wait_pipeline(cfg)
            bus = BusWatcher(cfg)
            avatar = start_avatar(cfg, mdf, {k: v for k, v in env.items() if k != "MMDAGENT_LLM_CONFIG"})
            world = World(cfg, avatar, bus, server.reply, server, run_dir)
            supervisorctl(run_dir, env, "stop", "pipeline:llm")
            assert bridge_reports(world, pipeline=False)
            mark = len(avatar.received)
            requests = len(server.requests)
            avatar.send("RECOG_EVENT_STOP|遅すぎる質問")
            notice = avatar.wait_line(f"SYNTH_START|0|mei_voice_normal|{cfg['turn']['failure_notice']}", 15, after=mark)
            assert notice is not None
            supervisorctl(run_dir, env, "start", "pipeline:llm")
            assert bridge_reports(world, pipeline=True)
            assert len(server.requests) == requests  # the stale question is not asked late
            world.llm.queue(tokens_of("はい。"))
            assert world.talk("次の質問").spoken == ["はい。"]
    finally:
        if avatar is not None:
            avatar.kill()
        if bus is not None:
            bus.close()
        server.stop()
