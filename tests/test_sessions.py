"""Instances never cross: two sessions keep two buses, a second console or a clashing pipeline
refuses at once saying what runs and how to run beside it, a stage never joins another
session's bus, and two stages of one name are reported once instead of as endless restarts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from stages.commands import cli
from broker import config as config_mod
from broker import curve, sessions
from broker.config import log_dir
from stages.commands.launcher import stage_command
from tests.e2e import launched
from tests.harness import BIN, pipeline_env, wait_text, write_config


def heartbeat_pids(world, stage: str) -> set[int]:
    return {e.body["pid"] for e in world.bus.of("heartbeat") if e.body.get("stage") == stage}


# -- units ------------------------------------------------------------------------------------
def test_ports_derive_from_the_session_and_stay_in_their_range():
    bases = {sessions_name: config_mod.derived_base_port(sessions_name) for sessions_name in
             ("default", "mei", "gene", "kiosk-1", "kiosk-2", "日本語")}
    assert len(set(bases.values())) == len(bases)
    assert all(config_mod.FIRST_PORT <= b < config_mod.FIRST_PORT + 8 * config_mod.PORT_BLOCKS and b % 8 == 6
               for b in bases.values())
    cfg = config_mod.load(None)
    assert config_mod.endpoint(cfg, "events_in") == f"tcp://127.0.0.1:{bases['default']}"
    cfg["bus"]["base_port"] = 47300
    assert config_mod.endpoint(cfg, "commands_out") == "tcp://127.0.0.1:47307"


def test_the_session_flag_reaches_the_configuration(monkeypatch, capsys):
    monkeypatch.setenv("MMDAGENT_LLM_BUS_SESSION", "replaced-by-the-flag")  # restored after the test
    assert cli.main(["--session", "kiosk-2", "bus"]) == 0
    out = capsys.readouterr().out
    assert "session 'kiosk-2': not running" in out
    assert f":{config_mod.derived_base_port('kiosk-2') + 1}" in out
    assert "keys" in out and "secret-key" in out
    folder = curve.folder_of(config_mod.load(None))
    assert folder.parent.name == "bus-kiosk-2"
    for secret_file in (curve.CLIENT_SECRET, curve.SERVER_SECRET):
        secret = curve._load(folder / secret_file, secret=True)[1].decode()
        assert secret not in out


def test_lists_in_the_configuration_take_words_only(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text('[bridge]\nallow_types = ["SYNTH_START", 3]\n', encoding="utf-8")
    with pytest.raises(config_mod.ConfigError, match="allow_types"):
        config_mod.load(path)
    monkeypatch.setenv("MMDAGENT_LLM_BRIDGE_ALLOW_TYPES", "SYNTH_START, MOTION_ADD ,")
    assert config_mod.load(None)["bridge"]["allow_types"] == ["SYNTH_START", "MOTION_ADD"]


# -- real processes ---------------------------------------------------------------------------
def test_two_sessions_side_by_side_each_answer_their_own_avatar(tmp_path: Path):
    with ExitStack() as stack:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        a = stack.enter_context(launched(tmp_path / "a", bus={"session": "mei"}))
        b = stack.enter_context(launched(tmp_path / "b", bus={"session": "gene"}))
        assert curve.folder_of(a.cfg) != curve.folder_of(b.cfg)
        turn_a = a.talk("こんにちは、メイです")
        turn_b = b.talk("Hello, this is Gene.")
        assert turn_a.spoken and turn_b.spoken
        assert {e.body["text"] for e in a.bus.of("turn_start")} == {"こんにちは、メイです"}
        assert {e.body["text"] for e in b.bus.of("turn_start")} == {"Hello, this is Gene."}
        assert {e.session for e in a.bus.envelopes} == {"mei"} and {e.session for e in b.bus.envelopes} == {"gene"}

        # a stage of a third session configured onto mei's ports cannot get in, and says why
        stray_cfg = write_config(tmp_path / "b", bus={"session": "stray", "base_port": a.cfg["bus"]["base_port"]})
        log_path = tmp_path / "stray.log"
        with open(log_path, "wb") as log:
            stray = subprocess.Popen(stage_command("segmenter"), env=pipeline_env(stray_cfg, None),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        try:
            assert wait_text(log_path, "cannot get onto the bus", 15), log_path.read_text()
            assert "session 'stray'" in log_path.read_text()
            a.talk("まだ聞こえますか")
            assert stray.pid not in heartbeat_pids(a, "segmenter")
        finally:
            stray.kill()
            stray.wait(5)


def test_a_second_console_refuses_at_once_and_says_how_to_run_beside(tmp_path: Path):
    with launched(tmp_path, bus={"session": "kiosk"}) as world:
        env = pipeline_env(tmp_path / "content" / "mmdagent-llm.toml", None)
        folder = tmp_path / "console"
        folder.mkdir()
        began = time.monotonic()
        done = subprocess.run([str(BIN / "mmdagent-llm"), "console"], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=30)
        took = time.monotonic() - began
        assert done.returncode == 1, done.stderr
        assert "session 'kiosk' is running already" in done.stderr
        assert f"broker pid {world.pipeline.procs['broker'].pid}" in done.stderr
        assert "mmdagent-llm --session console console" in done.stderr
        assert not (log_dir() / "console-kiosk.log").exists()   # it started nothing
        print(f"the second console refused after {took:.1f} s")

        # another session whose ports meet kiosk's: refused too, naming kiosk's broker
        clash_cfg = write_config(folder, bus={"session": "other", "base_port": world.cfg["bus"]["base_port"]})
        done = subprocess.run([str(BIN / "mmdagent-llm"), "console"], cwd=folder,
                              env=pipeline_env(clash_cfg, None), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 1, done.stderr
        assert f"held by the broker of session 'kiosk' (pid {world.pipeline.procs['broker'].pid}" in done.stderr
        assert "mmdagent-llm --session kiosk" in done.stderr and "base_port" in done.stderr
        assert heartbeat_pids(world, "broker") == {world.pipeline.procs["broker"].pid}
        assert world.talk("まだいますか").spoken


def test_a_broker_on_taken_ports_says_who_holds_them(tmp_path: Path):
    with launched(tmp_path, bus={"session": "kiosk"}) as world:
        env = pipeline_env(tmp_path / "content" / "mmdagent-llm.toml", None)
        done = subprocess.run(stage_command("broker"), env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode != 0
        assert "held by the broker of session 'kiosk'" in done.stderr
        assert "This session is running already: join it" in done.stderr
        assert world.talk("大丈夫？").spoken


def test_duplicate_stages_are_reported_once_not_as_restarts(tmp_path: Path):
    bridge_log = tmp_path / "bridge.log"
    with open(bridge_log, "wb") as bridge_err, launched(tmp_path, avatar_kwargs={"stderr": bridge_err}) as world:
        first = world.pipeline.procs["segmenter"].pid
        extra_log = tmp_path / "extra.log"
        with open(extra_log, "wb") as log:
            extra = subprocess.Popen(stage_command("segmenter"), env=world.pipeline.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=log)
        try:
            both = sorted([first, extra.pid])

            def reported(envs):
                return any(e.sender == "bridge" and e.body.get("duplicates") == {"segmenter": both} for e in envs)
            assert world.bus.wait_for(reported, 15), "the bridge did not report the duplicate"
            mark = len(world.bus.envelopes)

            def beats_of_both(n):
                def enough(envs):
                    pids = [e.body["pid"] for e in envs[mark:] if e.kind == "heartbeat" and e.sender == "segmenter"]
                    return all(pids.count(pid) >= n for pid in both)
                return enough
            assert world.bus.wait_for(beats_of_both(5), 20)   # five seconds of both beating side by side
        finally:
            extra.terminate()
            extra.wait(10)
        assert world.bus.wait_for(lambda envs: any(e.sender == "bridge" and e.body.get("duplicates") == {}
                                                   for e in envs[mark:]), 15)
    text = bridge_log.read_text(encoding="utf-8", errors="replace")
    assert text.count("two segmenter processes are on this bus") == 1
    assert f"pids {both[0]} and {both[1]}" in text or f"pids {both[1]} and {both[0]}" in text
    assert text.count("segmenter was restarted") <= 1   # the newcomer looks like a restart until the old one beats
    assert "one segmenter process is left" in text
    assert extra_log.read_text().count(f"another segmenter process (pid {first})") == 1
    stages_log = (tmp_path / "pipeline.log").read_text(encoding="utf-8", errors="replace")
    assert stages_log.count(f"another segmenter process (pid {extra.pid})") == 1


def test_a_pipeline_whose_plugin_has_ended_is_not_joined():
    """Its stages stop by themselves (they watch the plugin): joining it would leave the new bridge
    with nothing that keeps its pipeline."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert sessions.leaving({"broker": {"owner": ended.pid}}) == ended.pid
    assert sessions.leaving({"broker": {"owner": os.getppid()}}) == 0     # its plugin still runs
    assert sessions.leaving({"broker": {"owner": 0}}) == 0                # started by a person or supervisord
    assert sessions.leaving({"broker": {}}) == 0 and sessions.leaving({}) == 0
    assert sessions.leaving({"broker": {"owner": "12"}}) == 0             # a rogue's heartbeat: never trusted
