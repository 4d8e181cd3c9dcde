"""The plugin's supervisord-free pipeline (the default; what Windows always uses), selected here
explicitly with ``[plugin] pipeline = "builtin"``: it answers, brings a killed stage back, and nothing of it
remains within 5 s of the plugin being SIGKILLed (as MMDAgent-EX ends it)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from broker import config as config_mod
from stages.commands.avatar_sim import SimulatedMMDAgent
from stages.commands.launcher import wait_ready
from stages.llm.offline_responder import ChatCompletionServer
from tests.e2e import ScriptedLLM, bridge_sees_pipeline
from tests.harness import BusWatcher, pipeline_env, processes_with, write_config


def test_the_builtin_pipeline_answers_restarts_and_dies_with_the_plugin(tmp_path: Path, own_state):
    server = ChatCompletionServer(ScriptedLLM(default="はい、聞こえます。")).start()
    mdf = tmp_path / "content"
    mdf.mkdir()
    cfg_path = write_config(mdf, plugin={"pipeline": "builtin"})
    cfg = config_mod.load(cfg_path)
    env = {k: v for k, v in pipeline_env(cfg_path, server.base_url).items() if k != "MMDAGENT_LLM_CONFIG"}
    log = open(tmp_path / "plugin.log", "wb")
    avatar = SimulatedMMDAgent("mmdagent-llm plugin", mdf_dir=mdf, env=env, stderr=log).start()
    bus = None
    try:
        wait_ready(cfg, ["bridge"], 30)
        bridge_sees_pipeline(cfg, 40)
        assert "supervisord" not in " ".join(open(f"/proc/{p}/cmdline").read() for p in processes_with(server.base_url))
        bus = BusWatcher(cfg, b"heartbeat.")
        avatar.send("RECOG_EVENT_START")
        avatar.send("RECOG_EVENT_STOP|聞こえますか")
        said = avatar.wait_line("SYNTH_START|", 30)
        assert said is not None and said.line.endswith("|はい、")  # the first clause, at once
        # a stage that dies comes back
        assert bus.wait_for(lambda envs: any(e.body.get("stage") == "segmenter" for e in envs), 5)
        seg = [e.body["pid"] for e in bus.envelopes if e.body.get("stage") == "segmenter"][-1]
        os.kill(seg, signal.SIGKILL)
        assert bus.wait_for(lambda envs: any(e.body.get("stage") == "segmenter" and e.body.get("ready")
                                             and e.body["pid"] != seg for e in envs), 20), "not restarted"
        stages = processes_with(server.base_url)
        assert len(stages) >= 5  # the plugin and the four stages
        # MMDAgent-EX quits: SIGKILL, no clean-up code runs in the plugin
        avatar.kill()
        killed_at = time.monotonic()
        while processes_with(server.base_url) and time.monotonic() - killed_at < 5:
            time.sleep(0.05)
        left = processes_with(server.base_url)
        gone_after = time.monotonic() - killed_at
    finally:
        if bus is not None:
            bus.close()
        avatar.kill()
        for pid in processes_with(server.base_url):
            os.kill(pid, signal.SIGKILL)
        server.stop()
        log.close()
    assert not left, f"left behind: {left}"
    print(f"all {len(stages)} processes gone {gone_after:.2f} s after the plugin's SIGKILL")
    logs = list((own_state / "mmdagent-llm" / "run-default").glob("*.log"))
    assert len(logs) == 4 and not [f for f in logs if f.stat().st_mode & 0o077]   # the owner's only
    text = (tmp_path / "plugin.log").read_text(errors="replace")
    assert "segmenter exited with status -9" in text and "starting it again" in text


def test_a_full_stage_log_is_rotated_not_deleted(tmp_path: Path):
    """A stage restarted after a crash: its log, over the limit, keeps the crash lines in <name>.log.1."""
    from stages.commands.keeper import open_log

    path = tmp_path / "llm.log"
    with open_log(path, limit=100) as log:
        log.write(b"x" * 90 + b"\nTraceback: the crash\n")
    with open_log(path, limit=100) as log:  # the restart
        log.write(b"started again\n")
    assert (tmp_path / "llm.log.1").read_bytes().endswith(b"Traceback: the crash\n")
    assert path.read_bytes() == b"started again\n"
    if os.name == "posix":
        assert (path.stat().st_mode & 0o777) == 0o600 and ((tmp_path / "llm.log.1").stat().st_mode & 0o777) == 0o600
    with open_log(path, limit=100) as log:  # under the limit: appended to
        log.write(b"more\n")
    assert path.read_bytes() == b"started again\nmore\n"
    path.write_bytes(b"y" * 200)
    with open_log(path, limit=100):  # one previous file is kept: the newer full log replaces it
        pass
    assert (tmp_path / "llm.log.1").read_bytes() == b"y" * 200 and path.read_bytes() == b""
