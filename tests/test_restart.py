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
