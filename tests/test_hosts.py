"""The pipeline spread over hosts (network namespaces: tests/netns.py), set up as the README's
"Running across machines" says: keys from ``mmdagent-llm keys``, ``[bus] host`` the broker's
address, ``[bus] curve_dir`` on every host.

- host ``pipe``: the broker (bound to pipe's address), the segmenter, the sequencer, and
  ``mmdagent-llm bridge`` as the simulated MMDAgent-EX's plugin; this test listens on the bus
  from there too, as an observer on that machine would;
- host ``gpu``: the llm stage, connecting to pipe's address, and the OpenAI-compatible server
  it asks, on gpu's own 127.0.0.1 (nothing elsewhere can reach it);
- host ``rogue``, on the same subnet, session and ports: a segmenter holding the keys of another
  ``mmdagent-llm keys`` folder, and a bus tap holding a key pair of that folder too, but also the
  broker's public key (not a secret: a stronger intruder), which gets it past the CURVE handshake
  to the broker's key check.

A host outside the subnet is not tried: without a route it cannot reach the broker's port at
all, which would test the harness, not the bus.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import zmq.auth

from broker import config as config_mod
from broker import curve
from broker.liveness import PIPELINE
from stages.commands.launcher import stage_command
from stages.llm.offline_responder import ChatCompletionServer
from tests.e2e import PLUGIN_COMMAND, ScriptedLLM, World, speech_pattern_ok, start_avatar, tokens_of, words
from tests.harness import (BIN, ROOT, SECRET_KEY, BusWatcher, free_base_port, pipeline_env, wait_pipeline, wait_text,
                           write_config)
from tests.netns import Host, hosts
from tests.remote_world import SLOW_TIMEOUTS, App

ANSWER = "こんにちは！遠くの計算機から答えています。今日はいい天気ですね。"
EXPECTED = ["こんにちは！", "遠くの計算機から答えています。", "今日はいい天気ですね。"]
QUESTION = "遠くの計算機さん、聞こえますか"


def make_keys(folder: Path) -> Path:
    """``mmdagent-llm keys <folder>``, as a person sets up a bus across machines."""
    done = subprocess.run([str(BIN / "mmdagent-llm"), "keys", str(folder)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return folder


def secrets_in(folder: Path) -> list[str]:
    return [curve._load(folder / name, secret=True)[1].decode() for name in (curve.SERVER_SECRET, curve.CLIENT_SECRET)]


def start(host: Host, argv: list[str], env: dict[str, str], log: Path, **kwargs) -> subprocess.Popen:
    """``argv`` in ``host``, its stderr appended to ``log``."""
    with open(log, "ab") as err:
        return host.popen(argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                          stdout=kwargs.pop("stdout", subprocess.DEVNULL), stderr=err, **kwargs)


def test_a_turn_spans_hosts_and_a_host_with_other_keys_gets_nothing(tmp_path: Path):
    with hosts(["pipe", "gpu", "rogue"]) as (pipe, gpu, rogue), ExitStack() as stack:
        keys, wrong = make_keys(tmp_path / "keys"), make_keys(tmp_path / "other-keys")
        knowing = tmp_path / "other-keys-and-server-key"
        shutil.copytree(wrong, knowing)
        shutil.copy(keys / curve.SERVER_PUBLIC, knowing / curve.SERVER_PUBLIC)
        content = tmp_path / "content"
        content.mkdir()
        cfg_path = write_config(content, bus={"host": pipe.address, "curve_dir": str(keys)})
        cfg = config_mod.load(cfg_path)
        rogue_envs = []
        for folder in (wrong, knowing):
            (tmp_path / f"rogue-{folder.name}").mkdir()
            rogue_cfg = write_config(tmp_path / f"rogue-{folder.name}", bus={
                "host": pipe.address, "curve_dir": str(folder), "base_port": cfg["bus"]["base_port"]})
            rogue_envs.append(pipeline_env(rogue_cfg, None))
        llm = ScriptedLLM()
        with gpu.entered():
            server = ChatCompletionServer(llm)   # listens on gpu's 127.0.0.1
        stack.callback(server.start().stop)

        env = pipeline_env(cfg_path, None)     # no LLM address on the pipe host: it needs none
        logs = {name: tmp_path / f"{name}.log" for name in ("pipe", "gpu", "rogue-segmenter", "rogue-tap")}
        procs = {name: start(pipe, stage_command(name), env, logs["pipe"]) for name in ("broker", "segmenter", "sequencer")}
        procs["llm"] = start(gpu, stage_command("llm"), pipeline_env(cfg_path, server.base_url), logs["gpu"])
        ctx = stack.enter_context(pipe.zmq_context())
        wait_pipeline(cfg, 30, ctx)
        bus = BusWatcher(cfg, ctx=ctx)
        stack.callback(bus.close)

        intruder = start(rogue, stage_command("segmenter"), rogue_envs[0], logs["rogue-segmenter"])
        tap = start(rogue, [sys.executable, "-m", "tests.bus_tap"], rogue_envs[1], logs["rogue-tap"],
                    stdout=subprocess.PIPE, text=True)
        # both reach the broker over the subnet: the segmenter fails the handshake (another server
        # key), the tap's key is refused by the broker
        assert wait_text(logs["rogue-segmenter"], "cannot get onto the bus", 20), logs["rogue-segmenter"].read_text()
        assert "does not hold this session's server key" in logs["rogue-segmenter"].read_text()
        tap_key = zmq.auth.load_certificate(knowing / curve.CLIENT_PUBLIC)[0].decode()
        assert wait_text(logs["pipe"], f"refused a client with the unknown public key {tap_key}", 20), \
            logs["pipe"].read_text()

        avatar = start_avatar(cfg, content, {k: v for k, v in env.items() if k != config_mod.ENV_CONFIG},
                              command=pipe.command(PLUGIN_COMMAND), ctx=ctx,
                              stderr=stack.enter_context(open(logs["pipe"], "ab")))
        stack.callback(avatar.kill)
        world = World(cfg, avatar, bus, llm, server, tmp_path, env=env)
        llm.queue(tokens_of(ANSWER, seed=5))
        turn = world.talk(QUESTION)

        # the answer, made on the gpu host, reached the avatar on the pipe host, whole and in order
        assert turn.result["reason"] == "done", turn.result
        assert turn.spoken[0] == EXPECTED[0] and turn.said == words(EXPECTED)
        assert speech_pattern_ok(avatar)
        assert server.requests[-1]["messages"][-1] == {"role": "user", "content": QUESTION}
        beats = bus.of("heartbeat")
        assert {e.body["stage"]: e.body["pid"] for e in beats if e.body["stage"] in PIPELINE} == \
            {name: proc.pid for name, proc in procs.items()}
        assert all(pipe.holds(procs[name].pid) for name in ("broker", "segmenter", "sequencer"))
        assert pipe.holds(avatar.pid) and gpu.holds(procs["llm"].pid) and not pipe.holds(procs["llm"].pid)

        # the rogue got nothing: never ready, no heartbeat on the bus, no work taken, nothing heard
        assert intruder.poll() is None and tap.poll() is None, "a rogue process ended: it did not keep trying"
        assert not [e for e in beats if e.body["pid"] in (intruder.pid, tap.pid)]
        assert not any(e.body.get("duplicates") or e.body.get("bad_frames") for e in beats)
        tap.send_signal(signal.SIGTERM)
        heard = tap.communicate(timeout=15)[0]
        assert heard.split() == ["0"], f"the tap with other keys decoded envelopes: {heard!r}"
        assert "ready: connected" not in logs["rogue-segmenter"].read_text()

    text = "".join(log.read_text(encoding="utf-8", errors="replace") for log in logs.values())
    assert "CURVE on: 1 admitted client key(s)" in text
    assert not [s for s in (*secrets_in(keys), *secrets_in(wrong), SECRET_KEY) if s in text]


def role_env(cfg_path: Path, role: str, overrides: dict[str, str], base_url: str | None = None) -> dict[str, str]:
    """The environment of a host running ``deploy/hosts/<role>.toml`` as shipped, its addresses,
    keys folder and ports replaced by this run's (``MMDAGENT_LLM_<SECTION>_<KEY>``)."""
    env = pipeline_env(cfg_path, base_url)
    env[config_mod.ENV_CONFIG] = str(ROOT / "deploy" / "hosts" / f"{role}.toml")
    env.update({f"{config_mod.ENV_PREFIX}{key}": value for key, value in overrides.items()})
    return env


def test_an_avatar_on_its_own_host_talks_over_plugin_remote_and_a_stranger_host_is_refused(tmp_path: Path):
    """Issue 18's three roles, each run from its files in ``deploy/hosts/`` under honcho: the
    avatar PC (the fake MMDAgent-EX only, Plugin_Remote client mode, as ``avatar.mdf`` sets it
    up), the pipeline host (``Procfile.pipeline``: broker, segmenter, sequencer and ``remote
    --listen`` on every interface), the llm host (``Procfile.llm``); CURVE on. ``[remote] allow``
    names the avatar's address alone: the rogue host's connection is closed unheard."""
    with hosts(["avatar", "pipe", "gpu", "rogue"]) as (avatar, pipe, gpu, rogue), ExitStack() as stack:
        keys = make_keys(tmp_path / "keys")
        port = free_base_port(1)
        cfg_path = write_config(tmp_path, bus={"host": pipe.address, "curve_dir": str(keys)}, speech=SLOW_TIMEOUTS)
        cfg = config_mod.load(cfg_path)
        shared = {"BUS_HOST": pipe.address, "BUS_CURVE_DIR": str(keys), "BUS_BASE_PORT": str(cfg["bus"]["base_port"]),
                  "LLM_HISTORY_FILE": str(tmp_path / "history.json"), "SPEECH_START_TIMEOUT": "40",
                  "SPEECH_STOP_TIMEOUT_BASE": "60"}
        llm = ScriptedLLM()
        with gpu.entered():
            server = ChatCompletionServer(llm)
        stack.callback(server.start().stop)
        log = tmp_path / "pipe.log"

        def honcho(host: Host, procfile: str, env: dict[str, str], out: Path) -> None:
            with open(out, "ab") as file:  # honcho prints its processes' lines on stdout
                host.popen([str(BIN / "honcho"), "-f", str(ROOT / "deploy" / "hosts" / procfile), "start"], env=env,
                           cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=file, stderr=subprocess.STDOUT,
                           start_new_session=True)
        honcho(pipe, "Procfile.pipeline", role_env(cfg_path, "pipeline", {
            **shared, "REMOTE_ALLOW": avatar.address, "REMOTE_LISTEN": f"0.0.0.0:{port}"}), log)
        honcho(gpu, "Procfile.llm", role_env(cfg_path, "llm", shared, server.base_url), tmp_path / "gpu.log")
        ctx = stack.enter_context(pipe.zmq_context())
        wait_pipeline(cfg, 40, ctx)
        with avatar.entered():  # the app's network thread, started here, dials from the avatar host
            app = App.start(tmp_path, port, dial=pipe.address, retry_count=120)
        stack.callback(app.quit)
        watcher = BusWatcher(cfg, b"heartbeat.", ctx=ctx)
        stack.callback(watcher.close)
        assert watcher.wait_for(lambda envs: any(e.body["stage"] == "bridge" and e.body["info"].get("connected")
                                                 and e.body["info"].get("pipeline") for e in envs), 40), \
            log.read_text()[-3000:]

        app.ask("遠くから聞こえますか")
        app.barge_in(llm)
        assert server.requests[0]["messages"][-1] == {"role": "user", "content": "遠くから聞こえますか"}
        pids = {e.body["stage"]: e.body["pid"] for e in watcher.envelopes}
        assert gpu.holds(pids["llm"]) and all(pipe.holds(pids[n]) for n in ("broker", "segmenter", "sequencer",
                                                                           "bridge"))

        with rogue.entered():
            stranger = socket.create_connection((pipe.address, port), timeout=10)
        stranger.sendall("RECOG_EVENT_STOP|ただで答えて\n".encode())
        try:
            assert stranger.recv(100) == b""
        except ConnectionResetError:
            pass
        stranger.close()
        assert wait_text(log, f"refused a connection from {rogue.address}", 10), log.read_text()[-3000:]
        assert "ただで答えて" not in " ".join(app.log.since(0))
    text = log.read_text() + (tmp_path / "gpu.log").read_text()
    assert SECRET_KEY not in text and not [s for s in secrets_in(keys) if s in text]
