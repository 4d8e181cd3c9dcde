"""The bus is private: an intruder (another Unix user, or this user without the session's
secret) finds the pipeline's sockets, connects to each as PUSH, PUB and SUB, sends forged
``EXECUTE`` and ``SYNTH_START`` commands and listens during a turn. Nothing reaches the fake
MMDAgent-EX, nothing of the conversation is heard, and the avatar still answers.

The intruder is :mod:`tests.probe`, a separate process; "another user" is ``nobody``, which a
root test run can become (elsewhere those tests are skipped, saying why)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from broker import config as config_mod
from broker import curve
from stages.commands.avatar_sim import SimulatedMMDAgent
from broker.config import state_dir
from stages.commands.launcher import PIPELINE, wait_ready
from tests.e2e import World, bridge_sees_pipeline, launched, managed
from tests.harness import ROOT, SECRET_KEY, BusWatcher, pipeline_env, processes_with, write_config
from tests.probe import FORGED_TEXT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the probe reads /proc/net")
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user (nobody) needs root")


def endpoints(cfg: config_mod.Config) -> list[str]:
    return [config_mod.endpoint(cfg, name) for name in config_mod.ENDPOINTS]


def probe_during_a_turn(world: World, text: str, *args: str) -> dict:
    """Run the probe with ``args`` against the pipeline's endpoints while the avatar answers ``text``."""
    cmd = [sys.executable, "-m", "tests.probe", "--listen", "60", *args]
    for address in endpoints(world.cfg):
        cmd += ["--target", address]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", "the probe did not start"
        turn = world.talk(text)           # the conversation goes on while the probe listens
        out, _ = proc.communicate("done\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    result = json.loads(out.strip().splitlines()[-1])
    result["turn"] = turn
    return result


def assert_kept_out(world: World, result: dict) -> None:
    """The probe found every endpoint and sent its forgeries, yet nothing got through either way."""
    assert sorted(result["targets"]) == sorted(endpoints(world.cfg)), "the probe did not find the sockets"
    assert result["sent"] == len(endpoints(world.cfg)) * 2 * 3
    assert result["handshakes"]["succeeded"] == 0 and result["handshakes"]["unsettled"] == 0, result["handshakes"]
    assert result["heard"] == [], f"the probe read the bus: {result['heard'][:5]}"
    assert result["turn"].spoken and result["turn"].result["reason"] == "done"   # the avatar still answers
    lines = [r.line for r in world.avatar.received]
    assert not [line for line in lines if FORGED_TEXT in line or line.startswith("EXECUTE")]
    assert not [e for e in world.bus.envelopes if FORGED_TEXT in json.dumps(e.body, ensure_ascii=False)]
    beats = world.bus.of("heartbeat")
    assert beats and not any(e.body.get("bad_frames") for e in beats)     # nothing even reached a stage
    assert not any(e.body["info"].get("refused") for e in beats if e.sender == "bridge")


def session_secrets(cfg: config_mod.Config) -> list[str]:
    folder = curve.folder_of(cfg)
    return [curve._load(folder / name, secret=True)[1].decode() for name in (curve.SERVER_SECRET, curve.CLIENT_SECRET)]


def assert_no_secret_on_any_command_line(cfg: config_mod.Config) -> None:
    secrets = session_secrets(cfg)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode("utf-8", "replace")
            except OSError:
                continue
            assert not any(s in cmdline for s in (*secrets, SECRET_KEY)), f"a secret on pid {entry.name}'s command line"


@AS_ROOT
def test_another_user_is_kept_out_of_the_plugins_pipeline(tmp_path: Path):
    """The scenario of issue 7: the one-line plugin runs, an intruder of another user attacks."""
    with plugin_world(tmp_path) as world:
        folder = curve.folder_of(world.cfg)
        result = probe_during_a_turn(world, "こんにちは", "--user", "nobody", "--key-folder", str(folder))
        assert result["uid"] == 65534
        assert result["keys_readable"] == []
        assert_kept_out(world, result)
        assert_no_secret_on_any_command_line(world.cfg)
        run = state_dir() / "run-default"           # the plugin's supervisord: logs for the owner only
        logs = list(run.glob("*.log"))
        assert stat.S_IMODE(run.stat().st_mode) == 0o700 and len(logs) >= 5
        assert not [log for log in logs if log.stat().st_mode & 0o077]
        for log in [*logs, tmp_path / "plugin.log"]:
            text = log.read_text(encoding="utf-8", errors="replace")
            assert not any(secret in text for secret in session_secrets(world.cfg)), log


@AS_ROOT
def test_another_user_is_kept_out_under_honcho(tmp_path: Path):
    with managed(tmp_path, "honcho") as world:
        result = probe_during_a_turn(world, "こんにちは", "--user", "nobody",
                                     "--key-folder", str(curve.folder_of(world.cfg)))
        assert result["uid"] == 65534 and result["keys_readable"] == []
        assert_kept_out(world, result)


@AS_ROOT
def test_another_user_is_kept_out_of_ipc_sockets(tmp_path: Path):
    """Linux abstract ipc names have no permissions at all: the keys alone keep the intruder out."""
    with launched(tmp_path, transport="ipc") as world:
        result = probe_during_a_turn(world, "ipc でこんにちは", "--user", "nobody")
        assert all(address.startswith("ipc://@") for address in result["targets"])
        assert_kept_out(world, result)


def test_this_user_without_the_secret_is_kept_out(tmp_path: Path):
    """No CURVE at all, then CURVE with the broker's real public key but a key pair of its own."""
    with launched(tmp_path) as world:
        plain = probe_during_a_turn(world, "一回目", "--curve", "none")
        assert_kept_out(world, plain)
        server_key = curve.folder_of(world.cfg) / curve.SERVER_PUBLIC
        wrong = probe_during_a_turn(world, "二回目", "--curve", "wrong", "--server-key", str(server_key))
        assert_kept_out(world, wrong)
        assert plain["uid"] == wrong["uid"] == os.getuid()
    log = (tmp_path / "pipeline.log").read_text(encoding="utf-8", errors="replace")
    assert "refused a client with the unknown public key" in log


# -- the plugin's world -----------------------------------------------------------------------
@contextmanager
def plugin_world(tmp: Path) -> Iterator[World]:
    """MMDAgent-EX (simulated) started ``mmdagent-llm plugin``, which brought up its pipeline."""
    mark = f"mark-{uuid.uuid4().hex}"
    mdf = tmp / "content"
    mdf.mkdir()
    cfg_path = write_config(mdf, plugin={"pipeline": "supervisord"})
    env = {k: v for k, v in pipeline_env(cfg_path, None).items() if k != config_mod.ENV_CONFIG}
    env["TEST_MMDAGENT_MARK"] = mark
    cfg = config_mod.load(cfg_path)
    avatar = SimulatedMMDAgent("mmdagent-llm plugin", mdf_dir=mdf, env=env, stderr=open(tmp / "plugin.log", "wb"),
                               seconds_per_char=0.005, min_speech=0.05).start()
    bus = None
    try:
        wait_ready(cfg, (*PIPELINE, "bridge"), 40)
        bridge_sees_pipeline(cfg, 20)
        bus = BusWatcher(cfg)
        yield World(cfg, avatar, bus, None, None, tmp)
    finally:
        avatar.kill()
        if bus is not None:
            bus.close()
        for pid in processes_with(mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_owners_observer_gets_in_and_the_allow_list_still_holds(tmp_path: Path):
    """The control: the same probe holding the session's keys (as an observer of the owner's does,
    with no step of its own) hears the turn; of its forged commands the bridge writes none but the
    allowed SYNTH_START, and refuses EXECUTE. (Its forged turn_start is left out: a key holder is
    trusted, and one with a far-ahead turn id would silence the avatar, see the README.)"""
    with launched(tmp_path) as world:
        result = probe_during_a_turn(world, "見えますか", "--curve", "right", "--commands-only",
                                     "--key-folder", str(curve.folder_of(world.cfg)))
        # every pair of matching socket types: PUB-XSUB, SUB-XPUB and PUSH to the three queues
        assert result["handshakes"] == {"succeeded": 5, "failed": 19, "unsettled": 0}
        assert {"turn_start", "written", "heartbeat.bridge"} <= set(result["heard"])
        assert result["turn"].spoken
        assert world.bus.wait_for(lambda envs: any(
            e.sender == "bridge" and e.kind == "heartbeat" and e.body["info"]["refused"].get("type EXECUTE")
            for e in envs), 10), "the forged EXECUTE was not refused"
        lines = [r.line for r in world.avatar.received]
        assert not [line for line in lines if line.startswith("EXECUTE")]
        assert f"SYNTH_START|0|mei_voice_normal|{FORGED_TEXT}" in lines


def readme_observer() -> str:
    """The observer example of the README's "Watching the bus", as printed there."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Watching the bus"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_observer_gets_in_with_no_extra_steps(tmp_path: Path):
    """Run as the same user with the same configuration, it hears every line written to the avatar."""
    with launched(tmp_path) as world:
        env = pipeline_env(tmp_path / "content" / "mmdagent-llm.toml", None)
        proc = subprocess.Popen([sys.executable, "-u", "-c", readme_observer()], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # it is connected once it hears anything: keep talking until it does, within a deadline
            heard: list[str] = []
            reader = threading.Thread(target=lambda: heard.extend(iter(proc.stdout.readline, "")), daemon=True)
            reader.start()
            deadline = time.monotonic() + 30
            turns: list[int] = []
            while not any("SYNTH_START" in line for line in heard):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else heard
                turns.append(world.talk("聞こえていますか").turn)
            line = next(line for line in heard if "SYNTH_START" in line)
            assert int(line.split()[0]) in turns and " SYNTH_START ['0', 'mei_voice_normal', '" in line, line
        finally:
            proc.kill()
            proc.wait(5)
