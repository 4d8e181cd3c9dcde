"""``mmdagent-llm plugin``: started by the fake MMDAgent-EX, it brings the pipeline up under
supervisord, joins one that is already running, and takes everything it started down with it
when MMDAgent-EX kills it (SIGKILL, as MMDAgent-EX does when it quits)."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from broker import config as config_mod
from stages.commands.avatar_sim import SimulatedMMDAgent
from stages.commands.launcher import PIPELINE, Pipeline, wait_ready
from tests.e2e import bridge_sees_pipeline
from tests.harness import pipeline_env, processes_with, write_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

PLUGIN = "mmdagent-llm plugin"


@pytest.fixture(autouse=True)
def _state(own_state):
    """The plugin's run folder is looked into: each test has its own state folder."""


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
    cfg_path = write_config(mdf, plugin={"pipeline": "supervisord"})  # the built-in keeper: test_keeper
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
            assert any(f"stages.commands.cli {stage}" in cmdline(p) for p in ours), stage
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


def test_a_plugin_joins_a_pipeline_that_has_no_bridge(tmp_path: Path):
    """A pipeline the user runs (here without a manager): the plugin is just its bridge."""
    mark = f"mark-{uuid.uuid4().hex}"
    env, cfg = plugin_env(tmp_path, mark)
    stages_env = {**env, config_mod.ENV_CONFIG: str(tmp_path / "content" / "mmdagent-llm.toml")}
    with open(tmp_path / "stages.log", "wb") as log, Pipeline(env=stages_env, stderr=log) as pipeline:
        wait_ready(cfg, PIPELINE, 30)
        avatar = start(tmp_path / "content", env, tmp_path / "plugin.log")
        try:
            bridge_sees_pipeline(cfg, 20)
            assert "joining it" in (tmp_path / "plugin.log").read_text(errors="replace")
            assert not [p for p in processes_with(mark) if "supervisor.supervisord" in cmdline(p)]
            avatar.send("RECOG_EVENT_START")
            avatar.send("RECOG_EVENT_STOP|こんにちは")
            assert avatar.wait_line("SYNTH_START|0|mei_voice_normal|", 20)
        finally:
            avatar.kill()
        assert all(proc.poll() is None for proc in pipeline.procs.values())  # not its pipeline: left running


@contextmanager
def two_avatars(tmp: Path, mark: str, env: dict[str, str], cfg: config_mod.Config,
                **second_sections: dict) -> Iterator[tuple[SimulatedMMDAgent, SimulatedMMDAgent]]:
    """A first avatar whose plugin brought its pipeline up, and a second started in another content
    folder with a copy of the first's configuration, or (``second_sections``) one of its own with
    other ports; both and all they started are ended afterwards."""
    avatars = [start(tmp / "content", env, tmp / "first.log")]
    try:
        bridge_sees_pipeline(cfg, 40)
        other = tmp / "other-content"
        other.mkdir()
        if second_sections:
            write_config(other, **second_sections)
        else:
            (other / "mmdagent-llm.toml").write_text((tmp / "content" / "mmdagent-llm.toml").read_text())
        avatars.append(start(other, env, tmp / "second.log"))
        yield avatars[0], avatars[1]
    finally:
        for avatar in avatars:
            avatar.kill()
        for pid in processes_with(mark):
            os.kill(pid, signal.SIGKILL)


def test_a_second_plugin_of_the_same_session_refuses(tmp_path: Path):
    """Two avatars on one session would split its commands: the second says so, on screen too."""
    mark = f"mark-{uuid.uuid4().hex}"
    env, cfg = plugin_env(tmp_path, mark)
    with two_avatars(tmp_path, mark, env, cfg) as (first, second):
        assert second.wait_exit(20) == 1
        text = (tmp_path / "second.log").read_text(errors="replace")
        assert "session 'default' has a bridge already" in text and "[bus] session" in text
        assert [r.line for r in second.received] == [
            "NOTIFY_SHOW|mmdagent-llm: session 'default' is in use by another avatar (see the log)"]
        ours = processes_with(mark)
        assert sum("supervisor.supervisord" in cmdline(p) for p in ours) == 1
        assert sum("stages.commands.cli broker" in cmdline(p) for p in ours) == 1
        first.send("RECOG_EVENT_START")
        first.send("RECOG_EVENT_STOP|こんにちは")
        assert first.wait_line("SYNTH_START|0|mei_voice_normal|", 20), "the first avatar stopped answering"
        first.kill()
        assert not wait_gone(mark, 5.0)


def test_a_plugin_of_another_session_runs_beside(tmp_path: Path):
    """Two avatars, two sessions: two pipelines (one under supervisord, one kept by the built-in keeper),
    each with its own bus, each answering its own."""
    mark = f"mark-{uuid.uuid4().hex}"
    env, cfg = plugin_env(tmp_path, mark)
    with two_avatars(tmp_path, mark, env, cfg, bus={"session": "gene"}) as (first, second):
        bridge_sees_pipeline(config_mod.load(tmp_path / "other-content" / "mmdagent-llm.toml"), 40)
        ours = processes_with(mark)
        # the first under supervisord, the second (its own configuration) kept by its plugin
        assert sum("supervisor.supervisord" in cmdline(p) for p in ours) == 1
        assert sum("stages.commands.cli broker" in cmdline(p) for p in ours) == 2
        for avatar, text in ((first, "メイさん"), (second, "ジェネさん")):
            avatar.send("RECOG_EVENT_START")
            avatar.send(f"RECOG_EVENT_STOP|{text}")
            assert avatar.wait_line("SYNTH_START|0|mei_voice_normal|", 20), text
        assert (tmp_path / "state" / "mmdagent-llm" / "run-gene" / "llm.log").exists()
        first.kill()
        second.kill()
        assert not wait_gone(mark, 5.0)
