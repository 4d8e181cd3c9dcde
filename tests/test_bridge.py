"""The bridge process on its own (with a real broker): what MMDAgent-EX may throw at its stdin,
what it may write to stdout, and how it ends."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from broker import wire
from broker import config as config_mod
from stages.commands.launcher import Pipeline, wait_ready
from broker import runtime
from broker.runtime import connect, stop_requested
from tests.harness import BIN, BusWatcher, pipeline_env, write_config


@pytest.fixture
def bridge(tmp_path: Path, request):
    cfg_path = write_config(tmp_path, **getattr(request, "param", {}))
    cfg = config_mod.load(cfg_path)
    env = pipeline_env(cfg_path, None)
    log = open(tmp_path / "broker.log", "wb")
    broker = Pipeline(env=env, stderr=log, names=["broker"]).start()
    proc = None
    bus = None
    try:
        wait_ready(cfg, ["broker"], 20)
        bus = BusWatcher(cfg)
        proc = subprocess.Popen([str(BIN / "mmdagent-llm"), "bridge"], cwd=tmp_path, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_ready(cfg, ["bridge"], 20)
        yield cfg, proc, bus
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if bus is not None:
            bus.close()
        broker.stop()
        log.close()


def mmd_events(bus: BusWatcher) -> list[tuple[str, list[str]]]:
    return [(e.body["type"], e.body["args"]) for e in bus.of("mmd")]


def test_bad_input_is_published_and_reading_goes_on(bridge):
    cfg, proc, bus = bridge
    proc.stdin.write(b"RECOG_EVENT_STOP|\xff\xfe\xe3\x81\x82\n")     # invalid UTF-8, then a valid あ
    proc.stdin.write(b"HUGE|" + b"x" * 200_000 + b"\n")             # over the 64 KiB cap
    proc.stdin.write(b"KEY|a\r\n")                                   # CRLF
    proc.stdin.write(b"\n|\n")                                       # empty and type-less lines
    proc.stdin.write(b"SYNTH_EVENT_STOP|0\n")
    proc.stdin.flush()
    assert bus.wait_for(lambda envs: any(e.kind == "mmd" and e.body["type"] == "SYNTH_EVENT_STOP" for e in envs), 10)
    events = mmd_events(bus)
    assert events[0] == ("RECOG_EVENT_STOP", ["\ufffd\ufffdあ"])
    assert events[1][0] == "HUGE" and 60_000 < len(events[1][1][0]) <= 64 * 1024
    assert ("KEY", ["a"]) in events and events[-1] == ("SYNTH_EVENT_STOP", ["0"])
    assert proc.poll() is None


def test_commands_become_clean_lines_and_end_of_input_exits(bridge):
    cfg, proc, bus = bridge
    push = connect(cfg, zmq.PUSH, "commands_in")
    sender = wire.Sender("sequencer")
    commands = [
        ["0", "mei_voice_normal", "一行目\nEXECUTE|rm -rf /\r\x07\x1b[31m"],
        ["0", "mei_voice_normal", "長" * 3000],
    ]
    # speech of a turn that is not the current one (no utterance opened it) is never written
    push.send_multipart(wire.encode(sender.make(
        "command", {"type": "SYNTH_START", "args": ["0", "mei_voice_normal", "stale"]}, turn=5)))
    for args in commands:  # turn 0: commands that belong to no turn
        push.send_multipart(wire.encode(sender.make("command", {"type": "SYNTH_START", "args": args}, turn=0)))
    push.send_multipart(wire.encode(sender.make("segment", {"text": "wrong queue"}, turn=0)))  # ignored, logged
    assert bus.wait_for(lambda envs: len([e for e in envs if e.kind == "written"]) == 2, 10)
    push.close()
    out, err = proc.communicate(timeout=10)  # closes stdin: end of input
    assert proc.returncode == 0
    lines = out.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    first = lines[0].decode("utf-8")
    assert first == "SYNTH_START|0|mei_voice_normal|一行目 EXECUTE｜rm -rf / [31m"
    assert len(lines[1]) <= 2000 and lines[1].decode("utf-8").startswith("SYNTH_START|0|mei_voice_normal|長長")
    log_lines = err.decode("utf-8").splitlines()
    assert log_lines and all("mmdagent-llm[bridge]" in line for line in log_lines)
    assert any("end of input" in line for line in log_lines)


def test_bridge_does_not_import_the_llm_client():
    code = "import sys, stages.commands.cli, stages.bridge.bridge; sys.exit('openai' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent).returncode == 0


REFUSED_BY_DEFAULT = ["EXECUTE", "KEY_POST", "PLUGIN_ENABLE", "PLUGIN_DISABLE", "MODEL_ADD", "MODEL_DELETE",
                      "KEYVALUE_SET", "MOTION_CHANGE", "OPEN_CONTENT", "CAMERA", "SYNTH_STARTX", "synth_start"]


def _push_commands(cfg, commands: list[tuple[str, str, list[str]]]) -> None:
    """(sender, type, args) as turn-0 commands, the way a stage holding the session's keys would."""
    push = connect(cfg, zmq.PUSH, "commands_in")
    try:
        for sender, msg_type, args in commands:
            push.send_multipart(wire.encode(wire.Sender(sender).make("command", {"type": msg_type, "args": args})))
    finally:
        push.close(linger=2000)


def _bridge_refused(bus: BusWatcher, want: dict[str, int]) -> dict[str, int]:
    """The bridge's heartbeat ``refused`` counts, once they reach ``want``."""
    def got(envs):
        beats = [e for e in envs if e.kind == "heartbeat" and e.sender == "bridge"]
        refused = beats[-1].body["info"].get("refused", {}) if beats else {}
        return refused if all(refused.get(k, 0) >= n for k, n in want.items()) else None
    return bus.wait_for(got, 10) or {}


def test_only_allowed_types_from_allowed_senders_are_written(bridge):
    """Every type outside the default allow_types is refused, twice each; so is speech from a
    stage that may not speak. Each refusal is logged once per type or sender and counted."""
    cfg, proc, bus = bridge
    commands = [("sequencer", t, ["x"]) for t in REFUSED_BY_DEFAULT for _ in range(2)]
    commands += [("llm", "SYNTH_START", ["0", "mei_voice_normal", "from the llm"])] * 2
    commands += [("observer", "NOTIFY_SHOW", ["from an observer"])]
    commands += [("sequencer", "NOTIFY_SHOW", ["allowed"])]  # last: once written, everything before was read
    _push_commands(cfg, commands)
    assert bus.wait_for(lambda envs: any(e.kind == "written" for e in envs), 10)
    want = {f"type {t}": 2 for t in REFUSED_BY_DEFAULT} | {"sender llm": 2, "sender observer": 1}
    assert _bridge_refused(bus, want) == want
    out, err = proc.communicate(timeout=10)
    assert out == b"NOTIFY_SHOW|allowed\n"
    log = err.decode("utf-8")
    for msg_type in REFUSED_BY_DEFAULT:
        assert log.count(f"refused a {msg_type!r}") == 1, msg_type
    assert log.count("not in [bridge] allow_senders") == 2


@pytest.mark.parametrize("bridge", [{"bridge": {"allow_types": ["SYNTH_START", "MOTION_ADD"],
                                                "allow_senders": ["sequencer", "gestures"]}}], indirect=True)
def test_the_configuration_can_allow_one_more_type_and_sender(bridge):
    cfg, proc, bus = bridge
    _push_commands(cfg, [("gestures", "MOTION_ADD", ["0", "nod", "motions/nod.vmd", "PART", "ONCE"]),
                         ("gestures", "EXECUTE", ["calc.exe"]),
                         ("sequencer", "NOTIFY_SHOW", ["no longer allowed"]),
                         ("sequencer", "SYNTH_START", ["0", "mei_voice_normal", "はい。"])])
    assert bus.wait_for(lambda envs: len([e for e in envs if e.kind == "written"]) == 2, 10)
    assert _bridge_refused(bus, {"type EXECUTE": 1, "type NOTIFY_SHOW": 1}) == {"type EXECUTE": 1,
                                                                               "type NOTIFY_SHOW": 1}
    out, _ = proc.communicate(timeout=10)
    assert out.decode("utf-8").splitlines() == ["MOTION_ADD|0|nod|motions/nod.vmd|PART|ONCE",
                                                "SYNTH_START|0|mei_voice_normal|はい。"]


def test_the_reader_thread_where_pipes_cannot_be_polled_takes_the_same_lines(tmp_path: Path):
    """Windows reads stdin on a thread (its pipes cannot be polled): a bridge given its own
    stdin takes that path here; its lines, a cut one and the end of input come through it."""
    import io

    from stages.bridge.bridge import MAX_IN_BYTES, Bridge
    cfg = config_mod.load(write_config(tmp_path))
    stdin = io.BytesIO(b"RECOG_EVENT_AWAY|ON\n" + b"X" * (MAX_IN_BYTES + 5) + b"\nRECOG_EVENT_AWAY|OFF\n")
    bridge = Bridge(cfg, stdin=stdin, stdout=io.BytesIO())
    try:
        assert bridge._inbox is not None and not any(isinstance(k, int) for k in bridge.extra)
        deadline = time.monotonic() + 10
        while not stop_requested() and time.monotonic() < deadline:
            if bridge._inbox.poll(100):
                bridge._on_stdin()
        assert stop_requested(), "the end of input never came through the thread"
        assert bridge.lines_in == 3 and bridge.bad_input == {"line too long": 1}
    finally:
        runtime._stop = False  # this test ran a bridge inside the test process
        bridge.close()
        bridge.sub.disable_monitor()
        for sock in (bridge._handshake, bridge.pub, bridge.sub, bridge.pull):
            sock.close(linger=0)
