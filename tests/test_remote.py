"""``mmdagent-llm remote``: the bridge over Plugin_Remote, end to end over loopback.

The real ``remote`` process starts the real pipeline (its keeper), the real openai client talks
to a local streaming server, and the fake MMDAgent-EX (Plugin_Remote server or client mode,
as the protocol page describes them) is the avatar. Speech timeouts are 40/60 s: a stage left
waiting on an app that went away would hold the next answer that long."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stages.commands.avatar_remote import RemoteClient
from stages.llm.offline_responder import Token
from tests.e2e import tokens_of
from tests.harness import BIN, free_base_port, processes_with, supervised, wait_pipeline
from tests.test_plugin import cmdline
from tests.remote_world import App, RemoteRun

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def shut(sock: socket.socket) -> bool:
    """Whether the other end closed ``sock`` (a close with our line unread is a reset)."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def run(tmp_path: Path, own_state):
    made = RemoteRun.make(tmp_path)
    try:
        yield made
    finally:
        made.close()


def test_connect_answers_barges_in_survives_the_app_restarting_and_leaves_nothing(run: RemoteRun, tmp_path: Path):
    # below the ephemeral ports: a retried connect to a closed loopback port there can connect to itself
    app = App.start(tmp_path, free_base_port(1))
    try:
        run.start("--connect", f"127.0.0.1:{app.server.port}")
        run.wait_connected()
        app.ask("こんにちは")

        # another client (a recognizer, say) comes, speaks and goes: its utterance is the app's,
        # answered; its REMOTE_EVENT_CONNECTED/DISCONNECTED are logged, never answered
        other = RemoteClient("127.0.0.1", app.server.port)
        start = app.log.count()
        other.send("RECOG_EVENT_STOP|ほかのクライアントから")
        assert app.log.wait("SYNTH_START|", 20, start), "the other client's utterance was not answered"
        other.close()
        assert app.log.wait("REMOTE_EVENT_DISCONNECTED|", 10, start)
        app.ask("つぎの質問")
        assert "MMDAgent-EX: REMOTE_EVENT_DISCONNECTED|127.0.0.1" in run.logs()
        assert app.spoken_after(start).count("はい、") == 2  # one answer each: no event was answered

        app.barge_in(run.llm)  # the user speaks while the avatar does: SYNTH_STOP over the connection
        app.speaking(run.llm)  # the app quits mid-answer and comes back on the same port: the next answer is prompt
        port = app.server.port
        app.quit()
        app = App.start(tmp_path, port)
        run.wait_connected(connections=2)
        took = app.ask("もどりました")
        assert took < 10, f"the first answer after the app came back took {took:.1f} s"  # 40 s if anything waited
    finally:
        app.quit()
    left = run.stop()
    assert not left, f"processes left after the remote process was stopped: {left}"


def test_listen_answers_barges_in_survives_the_app_restarting_and_refuses_strangers(run: RemoteRun,
                                                                                     tmp_path: Path):
    port = free_base_port(1)
    run.start("--listen", f"127.0.0.1:{port}")
    app = App.start(tmp_path, port, dial="127.0.0.1")
    stranger = None
    try:
        run.wait_connected()
        app.ask("こんにちは")

        # an address outside [remote] allow (loopback 127.0.0.1 only) is shut out, and logged once
        for _ in range(3):
            stranger = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.5", 0), timeout=5)
            stranger.sendall("RECOG_EVENT_STOP|ただで答えて\n".encode())
            assert shut(stranger), "a stranger's connection was not closed at once"
            stranger.close()
        assert run.logs().count("refused a connection from 127.0.0.5") == 1
        assert "ただで答えて" not in " ".join(app.log.since(0))

        app.barge_in(run.llm)
        app.speaking(run.llm)
        app.quit()
        app = App.start(tmp_path, port, dial="127.0.0.1")
        run.wait_connected(connections=2)
        took = app.ask("もどりました")
        assert took < 10, f"the first answer after the app came back took {took:.1f} s"  # 40 s if anything waited
    finally:
        app.quit()
        if stranger is not None:
            stranger.close()
    left = run.stop()
    assert not left, f"processes left after the remote process was stopped: {left}"


def test_twenty_avatars_through_one_listener_each_hear_only_their_own(tmp_path: Path, own_state):
    """Twenty apps dial one ``remote --listen``, each from its own address (127.0.0.11-30), all
    asking at once; three barge in on a long answer, and one quits and comes back meanwhile."""
    names = [f"a{i:02d}" for i in range(1, 21)]
    barging, restarting = set(names[:3]), names[3]

    def reply(body: dict) -> list[Token]:
        asked = str(body["messages"][-1]["content"])
        name = asked[:3]
        if name in barging and "長く" in asked:
            return tokens_of(f"{name}の長い話です。" * 8, delay=0.05)
        return tokens_of(f"{name}への答えです。")

    avatars = {name: {"address": f"127.0.0.{10 + i}"} for i, name in enumerate(names, 1)}
    run = RemoteRun.make(tmp_path, reply=reply, remote={"allow": ["127.0.0.0/8"], "avatars": avatars})
    port = free_base_port(1)
    apps: dict[str, App] = {}
    try:
        run.start("--listen", f"127.0.0.1:{port}")
        for name in names:
            folder = tmp_path / name
            folder.mkdir()
            apps[name] = App.start(folder, port, dial="127.0.0.1", retry_count=240, source=avatars[name]["address"])
        for name in names:
            run.wait_connected(run.avatar_cfg(name), timeout=120)

        def talk(name: str) -> None:
            app = apps[name]
            if name in barging:
                start = app.log.count()
                app.sim.send(f"RECOG_EVENT_STOP|{name}、長く話して")
                assert app.log.wait("SYNTH_EVENT_START|", 30, start), f"{name}: the long answer did not start"
                app.sim.send("RECOG_EVENT_START")
                assert app.log.wait("SYNTH_STOP|0", 10, start), f"{name}: no SYNTH_STOP after the barge-in"
            elif name == restarting:
                app.quit()
                folder = tmp_path / f"{name}-again"
                folder.mkdir()
                apps[name] = app = App.start(folder, port, dial="127.0.0.1", retry_count=240,
                                             source=avatars[name]["address"])
                run.wait_connected(run.avatar_cfg(name), connections=2, timeout=60)
            app.ask(f"{name}から", f"{name}への答えです。", timeout=60)

        with ThreadPoolExecutor(len(names)) as pool:
            for future in [pool.submit(talk, name) for name in names]:
                future.result()
        for name, app in apps.items():
            heard = "".join(app.spoken_after(0))
            assert not [other for other in names if other != name and other in heard], f"{name} heard {heard!r}"
    finally:
        for app in apps.values():
            app.quit()
        left = run.stop()
        run.close()
    assert not left, f"processes left after the listener was stopped: {left}"


def test_the_remote_program_of_deploy_supervisord_conf_serves_the_avatar(tmp_path: Path, own_state):
    """``supervisorctl start remote`` beside the pipeline supervisord runs: it joins that pipeline
    (its bridge), listening where ``[remote] listen`` says."""
    port = free_base_port(1)
    run = RemoteRun.make(tmp_path, remote={"listen": f"127.0.0.1:{port}"})
    app = None
    try:
        with supervised(tmp_path, run.env, "supervisord") as run_dir:
            wait_pipeline(run.cfg)
            ctl = subprocess.run([str(BIN / "supervisorctl"), "-c", str(run_dir / "supervisord.conf"), "start", "remote"],
                                 env=run.env, capture_output=True, text=True, timeout=60)
            assert "started" in ctl.stdout, ctl.stdout + ctl.stderr
            app = App.start(tmp_path, port, dial="127.0.0.1", retry_count=120)
            run.wait_connected()
            app.ask("こんにちは")
            assert "a pipeline is running: joining it" in (run_dir / "remote.log").read_text()
    finally:
        if app is not None:
            app.quit()
        run.close()


def test_a_taken_port_or_a_bad_address_is_a_clear_error(run: RemoteRun):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = run.start("--listen", f"127.0.0.1:{port}")
        assert proc.wait(30) == 1
    assert f"cannot listen on 127.0.0.1:{port}: " in run.logs()
    proc = run.start("--connect", "avatar-pc")
    assert proc.wait(30) == 2
    assert "'avatar-pc': expected HOST:PORT" in run.logs()


def test_the_avatar_process_dying_does_not_close_the_apps_connection(run: RemoteRun, tmp_path: Path):
    """MMDAgent-EX may die when a Plugin_Remote client disconnects: the listener keeps the
    connection open while it starts the avatar's process again, and hands it over."""
    port = free_base_port(1)
    run.start("--listen", f"127.0.0.1:{port}")
    app = App.start(tmp_path, port, dial="127.0.0.1")
    try:
        run.wait_connected()
        app.ask("こんにちは")
        avatar_pid = next(p for p in processes_with(run.mark) if "--handoff" in cmdline(p))
        os.kill(avatar_pid, signal.SIGKILL)
        run.wait_connected(timeout=60)  # the next process's bridge, on the same connection
        app.ask("まだいますか", timeout=30)
        assert app.server.connections == 1 and app.server.connected, "the app's connection was dropped"
        assert "its 1 open connection(s) handed to the new process" in run.logs()
    finally:
        app.quit()
