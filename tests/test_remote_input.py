"""Bad input over Plugin_Remote: the stdio bridge's hostile lines and more, through a socket.

- ``--connect`` to a hostile "MMDAgent-EX": every crafted bad line of the stdio fuzz test, random
  garbage, partial lines, a 10 MB line without a newline; the bridge stays up, reads on, counts
  each kind, keeps its memory (the 10 MB are never held), and answers the next utterance.
- ``--listen`` with two avatars: while avatar a1 talks, a second connection from a1's address
  that never speaks is closed (a1's app answers the check), a2's address sends garbage, a 10 MB
  line and a cut line, then its real app connects and talks; a1 is never touched.
"""

from __future__ import annotations

import random
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.bench_avatars import memory
from tests.harness import BusWatcher, free_base_port
from tests.remote_world import App, RemoteRun
from tests.test_fuzz import SEED, _crafted_stdin, _keys, _random_stdin
from tests.test_remote import shut

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

TEN_MB = 10 * (1 << 20)


class HostileApp:
    """A Plugin_Remote server that accepts one client and lets the test write raw bytes to it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", free_base_port(1)))
        self.port = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self.received = b""
        self.closed = False  # the bridge closed the connection
        self.cond = threading.Condition()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with self.cond:
            self.conn = conn
            self.cond.notify_all()
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            with self.cond:
                self.received += data
                self.closed = not data
                self.cond.notify_all()
            if not data:
                return

    def wait(self, what, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: what(self), timeout)

    def close(self) -> None:
        for sock in (self.conn, self.listener):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def test_a_hostile_app_cannot_stop_or_swell_the_remote_bridge(tmp_path: Path, own_state):
    run = RemoteRun.make(tmp_path)
    app = HostileApp()
    bus = None
    try:
        proc = run.start("--connect", f"127.0.0.1:{app.port}")
        assert app.wait(lambda a: a.conn is not None, 30), run.logs()
        run.wait_connected()
        bus = BusWatcher(run.cfg)
        before = memory(proc.pid)[0]

        def sent_and_seen(data: bytes, key: str) -> bool:
            """Send ``data`` then ``KEY|key``: the bridge published that line, whole, within 10 s.
            (Each phase waits for its key: a flood of published lines would outrun the test's own
            bus watcher, not the bridge.)"""
            app.conn.sendall(data + f"\nKEY|{key}\n".encode())
            return bus.wait_for(lambda envs: [key] in _keys(envs), 10)

        # the watcher's subscription reaches the broker a moment after it starts: ping until heard
        assert any(sent_and_seen(b"", f"ping-{i}") for i in range(50)), "the bus watcher hears nothing"
        assert sent_and_seen(b"".join(_crafted_stdin()), "after-all-crafted")
        keys = _keys(bus.envelopes)
        for key in ("after-huge", "after-3000", "after-crafted"):
            assert [key] in keys, (key, keys)
        rng = random.Random(SEED)
        for i in range(20):
            assert sent_and_seen(b"".join(_random_stdin(rng) for _ in range(10)), f"after-random-{i}")
        app.conn.sendall(b"TEN|" + b"m" * TEN_MB)  # no newline yet: 10 MB the bridge must not keep
        assert sent_and_seen(b"", "after-ten-mb")
        app.conn.sendall(b"RECOG_EVENT_ST")  # a line cut in two writes
        app.conn.sendall("OP|こんにちは\n".encode())
        assert app.wait(lambda a: b"SYNTH_START|0|mei_voice_normal|" in a.received, 30), \
            f"no answer after the bad input:\n{run.logs()[-3000:]}"
        assert proc.poll() is None
        grew = memory(proc.pid)[0] - before
        assert grew < 8 * 1024, f"the remote bridge grew by {grew} kB reading a 10 MB line"
        watcher = BusWatcher(run.cfg, b"heartbeat.bridge")
        try:
            assert watcher.wait_for(lambda envs: envs and envs[-1].body["info"]["bad_input"].get("line too long", 0) >= 2,
                                    10)
            bad = watcher.envelopes[-1].body["info"]["bad_input"]
        finally:
            watcher.close()
        assert {"invalid UTF-8", "NUL bytes", "line too long", "empty line", "empty type"} <= set(bad), bad
        logs = run.logs()
        for reason in ("invalid UTF-8", "line too long", "NUL bytes"):
            assert logs.count(f"stdin: {reason}:") == 1, reason  # logged once, then counted
    finally:
        if bus is not None:
            bus.close()
        app.close()
        run.stop()
        run.close()


def test_a_silent_second_connection_and_a_hostile_avatar_leave_the_other_avatar_alone(tmp_path: Path, own_state):
    avatars = {"a1": {"address": "127.0.0.2"}, "a2": {"address": "127.0.0.3"}}
    run = RemoteRun.make(tmp_path, remote={"allow": ["127.0.0.0/8"], "avatars": avatars})
    port = free_base_port(1)
    apps: list[App] = []
    socks: list[socket.socket] = []
    try:
        run.start("--listen", f"127.0.0.1:{port}")
        (tmp_path / "a1").mkdir()
        a1 = App.start(tmp_path / "a1", port, dial="127.0.0.1", retry_count=120, source="127.0.0.2")
        apps.append(a1)
        run.wait_connected(run.avatar_cfg("a1"))
        a1.ask("一つ目")

        # a second connection from a1's address that never speaks: a1's app answers the check
        silent = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0), timeout=30)
        socks.append(silent)
        assert shut(silent), "the silent second connection was not closed"
        # an allowed address that is no avatar's
        nobody = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.9", 0), timeout=30)
        socks.append(nobody)
        assert shut(nobody)

        # a2's address: garbage, a 10 MB line, a line cut off by the end of the connection
        hostile = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.3", 0), timeout=30)
        socks.append(hostile)
        rng = random.Random(SEED + 1)
        for _ in range(200):
            hostile.sendall(_random_stdin(rng)[:20000])
        hostile.sendall(b"TEN|" + b"m" * TEN_MB + b"\nRECOG_EVENT_STOP|cut off")
        a1.ask("二つ目")  # meanwhile
        hostile.close()
        (tmp_path / "a2").mkdir()
        a2 = App.start(tmp_path / "a2", port, dial="127.0.0.1", retry_count=120, source="127.0.0.3")
        apps.append(a2)
        assert a2.server.wait_connected(30)  # the app drops what it says while not connected
        a2.ask("こちらa2")
        a1.ask("三つ目")
        logs = run.logs()
        assert "closed the second connection for this avatar (from 127.0.0.2)" in logs
        assert "refused a connection from 127.0.0.9" in logs
        assert "partial line" in logs and "line too long" in logs
        assert logs.count("connected to MMDAgent-EX (127.0.0.2)") == 1  # a1's one connection, all along
    finally:
        for app in apps:
            app.quit()
        for sock in socks:
            sock.close()
        run.stop()
        run.close()


def test_a_silent_app_is_checked_and_an_app_that_answers_keeps_its_one_connection(tmp_path: Path, own_state):
    """``[remote] liveness = 0.5``: the frozen app (it reads, never writes) gets one check, and
    the connection is taken as lost 1 s later; the fake MMDAgent-EX, which hands every message
    back, is checked again and again and keeps its one connection."""
    run = RemoteRun.make(tmp_path, remote={"liveness": 0.5})
    frozen = HostileApp()
    app = None
    try:
        run.start("--connect", f"127.0.0.1:{frozen.port}")
        assert frozen.wait(lambda a: b"MMDAGENTLLM_ALIVE|1\n" in a.received, 30), run.logs()[-2000:]
        checked = time.monotonic()
        assert frozen.wait(lambda a: a.closed, 30), "the silent connection was never given up"
        assert time.monotonic() - checked >= 0.5  # not before twice the liveness after the check
        assert run.wait_log("not even the answer to a liveness check")  # logged just after the close
    finally:
        frozen.close()
        run.stop()
        run.close()

    run = RemoteRun.make(tmp_path / "second", remote={"liveness": 0.5})
    try:
        app = App.start(tmp_path, free_base_port(1))
        run.start("--connect", f"127.0.0.1:{app.server.port}")
        run.wait_connected()
        assert app.log.wait("MMDAGENTLLM_ALIVE|1", 30)
        start = app.log.count()
        assert app.log.wait("MMDAGENTLLM_ALIVE|1", 30, start)  # checked again: answered each time
        app.ask("まだいますか")
        assert "lost" not in run.logs() and app.server.clients == 1
    finally:
        if app is not None:
            app.quit()
        run.stop()
        run.close()


def test_the_allow_list_and_the_cleaning_of_lines_hold_over_tcp(tmp_path: Path, own_state):
    """What the stdio bridge refuses or cleans, the remote one does too: the same code."""
    from broker import wire
    from broker.runtime import connect
    import zmq
    run = RemoteRun.make(tmp_path)
    app = HostileApp()
    push = None
    try:
        run.start("--connect", f"127.0.0.1:{app.port}")
        assert app.wait(lambda a: a.conn is not None, 30), run.logs()
        run.wait_connected()
        push = connect(run.cfg, zmq.PUSH, "commands_in")
        sequencer, intruder = wire.Sender("sequencer"), wire.Sender("intruder")
        for sender, kind, args in ((sequencer, "EXECUTE", ["calc.exe"]), (sequencer, "KEY_POST", ["x"]),
                                   (intruder, "SYNTH_START", ["0", "mei_voice_normal", "forged"]),
                                   (sequencer, "SYNTH_START", ["0", "mei_voice_normal", "一行目\nEXECUTE|calc\x07"])):
            push.send_multipart(wire.encode(sender.make("command", {"type": kind, "args": args}, turn=0)))
        assert app.wait(lambda a: "一行目".encode() in a.received, 30), run.logs()[-2000:]
        lines = app.received.decode("utf-8").splitlines()
        assert "SYNTH_START|0|mei_voice_normal|一行目 EXECUTE｜calc" in lines
        assert not [line for line in lines if line.startswith(("EXECUTE", "KEY_POST")) or "forged" in line], lines
        logs = run.logs()
        assert "refused a 'EXECUTE'" in logs and "from 'intruder'" in logs
    finally:
        if push is not None:
            push.close(linger=0)
        app.close()
        run.stop()
        run.close()
