"""``mmdagent-llm plugin``: started by the fake MMDAgent-EX, it brings the pipeline up under
supervisord, joins one that is already running, and takes everything it started down with it
when MMDAgent-EX kills it (SIGKILL, as MMDAgent-EX does when it quits)."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from stages import config as config_mod
from stages.avatar_sim import SimulatedMMDAgent
from tests.e2e import bridge_sees_pipeline
from tests.harness import pipeline_env, processes_with, write_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

PLUGIN = "mmdagent-llm plugin"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_gone(mark: str, timeout: float) -> list[int]:
    """Our processes still alive after ``timeout`` (empty as soon as none is left)."""
    deadline = time.monotonic() + timeout
    while (left := processes_with(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling /proc: there is no event to wait on for another process's exit
    return left


def plugin_env(tmp: Path, mark: str) -> tuple[dict[str, str], config_mod.Config]:
    mdf = tmp / "content"
    mdf.mkdir(exist_ok=True)
    cfg_path = write_config(mdf)
    env = {k: v for k, v in pipeline_env(cfg_path, None).items() if k != config_mod.ENV_CONFIG}
    env["XDG_STATE_HOME"] = str(tmp / "state")   # where the plugin writes its supervisord run folder
    env["TEST_MMDAGENT_MARK"] = mark          # inherited by everything the plugin starts
    return env, config_mod.load(cfg_path)


def start(mdf: Path, env: dict[str, str], log: Path) -> SimulatedMMDAgent:
    return SimulatedMMDAgent(PLUGIN, mdf_dir=mdf, env=env, stderr=open(log, "wb"),
                             seconds_per_char=0.005, min_speech=0.05).start()


def test_plugin_starts_the_pipeline_answers_and_dies_with_its_bridge(tmp_path: Path):
    mark = f"mark-{uuid.uuid4().hex}"
    env, cfg = plugin_env(tmp_path, mark)
    avatar = start(tmp_path / "content", env, tmp_path / "plugin.log")
    try:
        bridge_sees_pipeline(cfg, 40)
        ours = processes_with(mark)
        assert sum("supervisor.supervisord" in cmdline(p) for p in ours) == 1
        for stage in ("broker", "llm", "segmenter", "sequencer", "watchdog"):
            assert any(f"stages.cli {stage}" in cmdline(p) for p in ours), stage
        avatar.send("RECOG_EVENT_START")
        avatar.send("RECOG_EVENT_STOP|こんにちは")
        assert avatar.wait_line("SYNTH_START|0|mei_voice_normal|", 20), "the plugin's pipeline did not answer"
        assert (tmp_path / "state" / "mmdagent-llm" / "run-default" / "llm.log").exists()
        avatar.kill()  # SIGKILL: no cleanup code of the bridge runs
        left = wait_gone(mark, 5.0)
        assert not left, f"still running 5 s after the bridge was killed: {[cmdline(p) for p in left]}"
    finally:
        avatar.kill()
        for pid in processes_with(mark):
            os.kill(pid, signal.SIGKILL)


def test_a_second_plugin_joins_the_running_pipeline(tmp_path: Path):
    mark = f"mark-{uuid.uuid4().hex}"
    env, cfg = plugin_env(tmp_path, mark)
    first = start(tmp_path / "content", env, tmp_path / "first.log")
    second = None
    try:
        bridge_sees_pipeline(cfg, 40)
        other = tmp_path / "other-content"
        other.mkdir()
        (other / "mmdagent-llm.toml").write_text((tmp_path / "content" / "mmdagent-llm.toml").read_text())
        second = start(other, env, tmp_path / "second.log")
        deadline = time.monotonic() + 20
        while "joining it" not in (tmp_path / "second.log").read_text(errors="replace"):
            assert time.monotonic() < deadline, "the second plugin did not join"
            assert second.returncode is None, "the second plugin exited"
            time.sleep(0.1)  # polling its log file: no event to wait on
        ours = processes_with(mark)
        assert sum("supervisor.supervisord" in cmdline(p) for p in ours) == 1
        assert sum("stages.cli broker" in cmdline(p) for p in ours) == 1
        second.kill()
        first.kill()
        assert not wait_gone(mark, 5.0)
    finally:
        for avatar in (first, second):
            if avatar is not None:
                avatar.kill()
        for pid in processes_with(mark):
            os.kill(pid, signal.SIGKILL)
