"""Bad input never kills a process: garbage on the bridge's stdin, and frames that are not
envelopes from a rogue process on the bus, with real processes.

Each fuzz run uses a fixed seed and a time budget of a few seconds. Afterwards the process
must still be running and ready, must still do its work, must have logged each reason at most
once, and must report the counts in its heartbeat.
"""

from __future__ import annotations

import collections
import random
import subprocess
import threading
import time
import uuid
from pathlib import Path

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from broker import wire
from stages.bridge import bridge as bridge_mod
from broker import config as config_mod
from broker import curve
from broker.runtime import connect
from stages.commands.launcher import Pipeline, wait_ready
from tests.harness import BIN, BusWatcher, pipeline_env, write_config

SEED = 20240611
BUDGET = 3.0  # seconds of random input per fuzz run
MiB = 1 << 20


# -- the bridge's stdin ----------------------------------------------------------------

def _crafted_stdin() -> list[bytes]:
    """Every kind of bad line we know of; the KEY lines after them must arrive intact."""
    return [
        b"\xff\xfe\xfd invalid \xc0\xaf overlong \xed\xa0\x80 surrogate \xe3\x81 cut\n",
        b"RECOG_EVENT_STOP|\xff\xfe\xe3\x81\x82\n",
        b"NUL\x00in|the\x00middle\x00\n",
        b"\x00\n",
        b"HUGE|" + b"x" * MiB + b"\n",                   # 1 MiB: cut at 64 KiB, the rest skipped
        b"KEY|after-huge\n",
        b"Y" * 3000 + b"KEY|merged\n",                   # over 2048 bytes, no newline: one line
        b"KEY|after-3000\n",
        b"|\n", b"||||\n", b"|" * 60000 + b"\n",           # type-less lines, very many fields
        b"\n", b"\n\n\n", b"\r\n", b"\r\r\r\n",            # empty and CR-only lines
        b"\r" * 5000 + b"\n",
        b"RECOG_EVENT_START\n", b"RECOG_EVENT_STOP\n", b"RECOG_EVENT_STOP|\n",
        b"RECOG_EVENT_AWAY\n", b"RECOG_EVENT_AWAY|ON|\x00\n", b"RECOG_EVENT_AWAY|OFF\n",
        b"SYNTH_EVENT_START\n", b"SYNTH_EVENT_STOP|\n", b"SYNTH_EVENT_STOP|0|\xff\n",
        b"KEY|after-crafted\n",
    ]


_ALPHABET = b"|\r\n\x00\xff\xfe\xc0\xc3\xe3\x81\x82\xed\xa0 abcXYZ\x1b\x7f"


def _random_stdin(rng: random.Random) -> bytes:
    """Random garbage; never a line starting with ``KEY|`` (bytes are random, see below)."""
    pick = rng.random()
    if pick < 0.35:
        return rng.randbytes(rng.randrange(0, 4096))
    if pick < 0.7:
        return bytes(rng.choice(_ALPHABET) for _ in range(rng.randrange(0, 2000)))
    if pick < 0.8:
        return b"|" * rng.randrange(1, 70000) + rng.choice([b"\n", b""])
    if pick < 0.9:
        return rng.choice([b"\n", b"\r\n", b"\r", b"\x00"]) * rng.randrange(1, 200)
    if pick < 0.99:
        return b"Z" * rng.randrange(2000, 200_000) + rng.choice([b"\n", b""])
    return b"W" * MiB + rng.choice([b"\n", b""])


def _keys(envs: list[wire.Envelope]) -> list[list[str]]:
    return [e.body["args"] for e in envs if e.kind == "mmd" and e.body.get("type") == "KEY"]


def _last_beat(envs: list[wire.Envelope], stage: str, after: float = 0.0) -> dict | None:
    beats = [e.body for e in envs if e.kind == "heartbeat" and e.body.get("stage") == stage and e.ts > after]
    return beats[-1] if beats else None


def test_bridge_survives_garbage_on_stdin_and_logs_each_reason_once(tmp_path: Path):
    cfg_path = write_config(tmp_path)
    cfg = config_mod.load(cfg_path)
    env = pipeline_env(cfg_path, None)
    broker_log = open(tmp_path / "broker.log", "wb")
    bridge_err = tmp_path / "bridge.log"
    broker = Pipeline(env=env, stderr=broker_log, names=["broker"]).start()
    proc = None
    watchers: list[BusWatcher] = []
    try:
        wait_ready(cfg, ["broker"], 20)
        keys = BusWatcher(cfg, b"mmd.KEY")          # only these: the flood itself is not subscribed
        beats = BusWatcher(cfg, b"heartbeat.bridge")
        watchers += [keys, beats]
        with open(bridge_err, "wb") as err:
            proc = subprocess.Popen([str(BIN / "mmdagent-llm"), "bridge"], cwd=tmp_path, env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        # whatever the bridge writes to MMDAgent-EX (a SYNTH_STOP, say) is read, never blocks it
        drain = threading.Thread(target=proc.stdout.read, daemon=True)
        drain.start()
        wait_ready(cfg, ["bridge"], 20)

        # our subscription has reached the bridge once a marker comes through
        deadline = time.monotonic() + 20
        while not keys.wait_for(lambda envs: ["sync"] in _keys(envs), 0.5):
            assert time.monotonic() < deadline, "no KEY|sync on the bus"
            proc.stdin.write(b"KEY|sync\n")
            proc.stdin.flush()

        failure: list[BaseException] = []
        written = [0]

        def feed() -> None:
            rng = random.Random(SEED)
            try:
                for chunk in _crafted_stdin():
                    proc.stdin.write(chunk)
                    written[0] += len(chunk)
                end = time.monotonic() + BUDGET
                while time.monotonic() < end:
                    chunk = _random_stdin(rng)
                    proc.stdin.write(chunk)
                    written[0] += len(chunk)
                proc.stdin.write(b"\nKEY|end\n")  # the newline ends whatever garbage came last
                proc.stdin.flush()
            except BaseException as exc:  # a broken pipe: the bridge died
                failure.append(exc)

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        writer.join(BUDGET + 60)
        assert not writer.is_alive(), "the bridge stopped reading its stdin"
        assert not failure, f"writing to the bridge failed: {failure[0]!r}"

        assert keys.wait_for(lambda envs: ["end"] in _keys(envs), 30), "KEY|end never arrived"
        got = [args for args in _keys(keys.envelopes) if args != ["sync"]]
        assert got == [["after-huge"], ["after-3000"], ["after-crafted"], ["end"]]
        assert proc.poll() is None, "the bridge died"

        def counted(envs: list[wire.Envelope]) -> dict | None:
            beat = _last_beat(envs, "bridge")
            if beat is None or not beat.get("ready"):
                return None
            bad = beat["info"].get("bad_input", {})
            return bad if all(bad.get(r, 0) > 0 for r in bridge_mod.BAD_INPUT) else None

        bad = beats.wait_for(counted, 10)
        assert bad, f"heartbeat without every bad_input count: {_last_beat(beats.envelopes, 'bridge')}"
        assert bad["line too long"] >= 2 and bad["empty line"] > 10 and bad["invalid UTF-8"] > 10

        # end of input still ends it cleanly
        proc.stdin.close()
        assert proc.wait(15) == 0
        log_lines = bridge_err.read_text(encoding="utf-8", errors="replace").splitlines()
        for reason in bridge_mod.BAD_INPUT:
            assert sum(f"stdin: {reason}:" in line for line in log_lines) == 1, reason
        assert sum("stdin:" in line for line in log_lines) == len(bridge_mod.BAD_INPUT)
        assert len(log_lines) < 100, f"{len(log_lines)} log lines for {written[0]} bytes of garbage"
        assert all("mmdagent-llm[bridge]" in line for line in log_lines)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for w in watchers:
            w.close()
        broker.stop()
        broker_log.close()


# -- frames on the bus -----------------------------------------------------------------

def _good(kind: str = "notice", body: dict | None = None) -> list[bytes]:
    return wire.encode(wire.Sender("rogue").make(kind, body if body is not None else {"text": "x"}))


def _with(**changes) -> bytes:
    raw = msgpack.unpackb(_good()[1])
    raw.update(changes)
    return msgpack.packb(raw)


def _crafted_frames(topic: bytes) -> list[list[bytes]]:
    """Frames that are not envelopes; ``topic`` passes the stage's subscription filter."""
    good = _good()[1]
    return [
        [topic],                                            # one frame
        [topic + b"\x00" * 10],
        [topic, good, b"extra"],                            # three frames
        [topic, good, b"", b"", b""],
        [topic, good[:-4]],                                 # truncated msgpack
        [topic, good[:1]],
        [topic, good + b"\xc1"],                            # trailing bytes
        [topic, b""],
        [topic, b"\xc1\xc1\xc1"],
        [topic, b"\x91" * 3000 + b"\x90"],                  # nested too deep
        [topic, msgpack.packb([1, 2, 3])],                  # not a map
        [topic, msgpack.packb("cancel")],
        [topic, msgpack.packb({1: 2})],
        [topic, _with(v=2)], [topic, _with(v=0)], [topic, _with(v="1")], [topic, _with(v=True)],
        [topic, _with(turn="seven")], [topic, _with(turn=None)], [topic, _with(turn=1.5)],
        [topic, _with(kind=5)], [topic, _with(body=[1])], [topic, _with(ts="now")],
        [topic, _with(sender=None)], [topic, _with(session=b"bytes")],
        [topic, _with(kind="launch_missiles")], [topic, _with(kind="x" * 50_000)],
        [topic, good],                                      # a notice under someone else's topic
        [topic, b"\x00" * (3 * MiB // 2)],                  # over MAX_PAYLOAD_BYTES: refused by decode
    ]


def _random_frames(rng: random.Random, topic: bytes) -> list[bytes]:
    pick = rng.random()
    if pick < 0.4:  # random frames, the first one with a topic that gets through
        frames = [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(1, 5))]
        frames[0] = topic + frames[0]
        return frames
    if pick < 0.8:  # a valid envelope, mutated
        payload = bytearray(_good(rng.choice(["token", "cancel", "notice", "turn_end"]),
                                  {"text": "x" * rng.randrange(0, 50)})[1])
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(0, len(payload))
            op = rng.random()
            if op < 0.5:
                payload[at] ^= rng.randrange(1, 256)
            elif op < 0.75:
                del payload[at:]
                if not payload:
                    break
            else:
                payload[at:at] = rng.randbytes(rng.randrange(1, 8))
        return [topic, bytes(payload)]
    return rng.choice(_crafted_frames(topic))


def _refused(frames: list[bytes]) -> str | None:
    """The reason decode refuses ``frames``, None if they are a valid envelope (never sent)."""
    try:
        wire.decode(frames)
    except wire.WireError as exc:
        return exc.reason
    return None


def test_stage_socket_options_refuse_huge_frames(tmp_path: Path):
    from broker.runtime import Stage

    class Probe(Stage):
        name = "probe"
        input_queue = "tokens"
        output_queue = "segments"

    stage = Probe(config_mod.load(write_config(tmp_path)))
    try:
        assert stage.sub.maxmsgsize == wire.MAX_FRAME_BYTES
        assert stage.pull.maxmsgsize == wire.MAX_FRAME_BYTES
        assert wire.MAX_PAYLOAD_BYTES < wire.MAX_FRAME_BYTES < 5 * MiB
    finally:
        for sock in (stage.pub, stage.sub, stage.pull, stage.push_sock):
            sock.close(linger=0)


def test_stage_survives_a_rogue_process_on_the_bus(tmp_path: Path):
    cfg_path = write_config(tmp_path)
    cfg = config_mod.load(cfg_path)
    env = pipeline_env(cfg_path, None)
    broker_log = open(tmp_path / "broker.log", "wb")
    seg_path = tmp_path / "segmenter.log"
    seg_log = open(seg_path, "wb")
    broker = Pipeline(env=env, stderr=broker_log, names=["broker"]).start()
    segmenter = Pipeline(env=env, stderr=seg_log, names=["segmenter"])
    ctx = zmq.Context.instance()
    sockets: list[zmq.Socket] = []
    bus = None

    keys = curve.client_options(cfg)  # a rogue that holds the session's keys: the worst case

    def socket(kind: int, endpoint: str) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.linger = 0
        sockets.append(sock)
        keys(sock)
        sock.connect(config_mod.endpoint(cfg, endpoint))
        return sock

    try:
        wait_ready(cfg, ["broker"], 20)
        segmenter.start()
        wait_ready(cfg, ["segmenter"], 20)
        bus = BusWatcher(cfg)
        consumer = socket(zmq.PULL, "segments_out")  # the sequencer's place: segments get mirrored
        # An XPUB publishes like a PUB, and shows when the broker's subscriptions have come.
        rogue_pub = ctx.socket(zmq.XPUB)
        rogue_pub.linger = 0
        sockets.append(rogue_pub)
        keys(rogue_pub)
        rogue_pub.connect(config_mod.endpoint(cfg, "events_in"))
        rogue_push = ctx.socket(zmq.PUSH)
        rogue_push.linger = 0
        rogue_push.immediate = True  # nothing queued for a connection the broker dropped
        rogue_push.sndtimeo = 5000
        sockets.append(rogue_push)
        monitor = rogue_push.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        keys(rogue_push)
        rogue_push.connect(config_mod.endpoint(cfg, "tokens_in"))
        subscriptions: set[bytes] = set()
        deadline = time.monotonic() + 20
        while b"\x01cancel" not in subscriptions:
            assert time.monotonic() < deadline, f"subscriptions never reached the rogue: {subscriptions}"
            if rogue_pub.poll(500):
                subscriptions.add(rogue_pub.recv())

        rng = random.Random(SEED)
        sent: collections.Counter[str] = collections.Counter()
        stuck = [False]  # a blocking send timed out once: the stage is not reading, fail fast

        def send(sock: zmq.Socket, frames: list[bytes], block: bool) -> None:
            reason = _refused(frames)
            if reason is None:
                return  # a mutation that happens to be valid: not a rogue frame, never sent
            try:
                sock.send_multipart(frames, 0 if block and not stuck[0] else zmq.NOBLOCK)
                sent[reason] += 1
            except zmq.Again:  # the broker is backed up or has just dropped us
                stuck[0] = stuck[0] or block

        def craft(block: bool) -> None:
            for frames in _crafted_frames(b"cancel"):
                send(rogue_pub, frames, block)
            for frames in _crafted_frames(b"heartbeat.segmenter"):
                send(rogue_pub, frames, block)
            for frames in _crafted_frames(b"token"):
                send(rogue_push, frames, block)

        craft(block=True)
        # valid envelopes, but heartbeats no stage makes: every stage reads every heartbeat
        for body in ({"stage": "rogue", "pid": "abc", "ready": True}, {"stage": "rogue", "pid": [1], "ready": "yes",
                     "info": 5}, {"stage": ["x"], "pid": None}, {"stage": "rogue", "pid": 2**64 - 1}, {}):
            rogue_pub.send_multipart(_good("heartbeat", body))
        huge = [b"token", b"\x00" * (5 * MiB)]  # over MAXMSGSIZE: the broker drops the connection
        send(rogue_push, huge, block=True)
        send(rogue_pub, [b"cancel", b"\x00" * (5 * MiB)], block=True)
        end = time.monotonic() + BUDGET
        while time.monotonic() < end:
            send(rogue_pub, _random_frames(rng, rng.choice([b"cancel", b"heartbeat.segmenter"])), False)
            send(rogue_push, _random_frames(rng, b"token"), False)
        assert monitor.poll(10_000), "the broker did not disconnect the peer that sent 5 MiB"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        craft(block=True)  # once more, after the reconnection: every reason reaches the stage
        assert segmenter.procs["segmenter"].poll() is None, "the segmenter died"
        # The flood filled our watcher's queue at the broker, which drops at its high-water mark
        # (by design, for observers): let it drain, up to a marker, before what it must see.
        marker = {"level": "info", "text": f"drained {uuid.uuid4().hex}"}
        deadline = time.monotonic() + 30
        while not bus.wait_for(lambda envs: any(e.kind == "notice" and e.body == marker for e in envs), 0.5):
            assert time.monotonic() < deadline, "the bus watcher never caught up with the flood"
            rogue_pub.send_multipart(_good("notice", marker))

        # a valid work item still goes through, behind the backlog of garbage
        producer = socket(zmq.PUSH, "tokens_in")
        producer.sndtimeo = 10_000
        llm = wire.Sender("llm")
        turn = int(time.time() * 1000)
        producer.send_multipart(wire.encode(llm.make("token", {"text": "テストです。", "index": 0}, turn=turn)))
        producer.send_multipart(wire.encode(llm.make("turn_end", {"reason": "done", "segments": 0, "tokens": 1},
                                                     turn=turn)))
        items = []
        deadline = time.monotonic() + 60
        while len(items) < 2:
            assert time.monotonic() < deadline, f"the segmenter did not answer; got {items}"
            assert segmenter.procs["segmenter"].poll() is None, "the segmenter died"
            if consumer.poll(500):
                items.append(wire.decode(consumer.recv_multipart()))
        assert [(e.kind, e.turn) for e in items] == [("segment", turn), ("turn_end", turn)]
        assert items[0].body == {"text": "テストです。", "index": 0, "tags": []}
        assert items[1].body["segments"] == 1
        done = time.time()  # every garbage frame sent before is behind us: the next beat counts all
        assert bus.wait_for(lambda envs: [e.kind for e in envs if e.turn == turn] == ["token", "turn_end",
                                                                                      "segment", "turn_end"], 10), \
            [(e.kind, e.sender) for e in bus.envelopes if e.turn == turn]

        core = {"wrong frame count", "not msgpack", "not a map", "wrong version", "bad field turn",
                "bad field body", "unknown kind", "topic mismatch", "payload too large"}
        assert core <= set(sent)

        def counted(envs: list[wire.Envelope]) -> dict | None:
            beat = _last_beat(envs, "segmenter", after=done)
            if beat is None or not beat.get("ready"):
                return None
            bad = beat.get("bad_frames", {})
            return bad if core <= set(bad) else None

        bad = bus.wait_for(counted, 10)
        assert bad, f"heartbeat without the bad frames: {_last_beat(bus.envelopes, 'segmenter')}"
        assert set(bad) <= set(sent), "counted a reason that was never sent"
        assert sum(bad.values()) > len(core) * 2
        assert segmenter.procs["segmenter"].poll() is None, "the segmenter died"
        assert broker.procs["broker"].poll() is None, "the broker died"

        seg_log.flush()
        logged: collections.Counter[str] = collections.Counter()
        for line in seg_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if "dropped an invalid frame: " in line:
                message = line.split("dropped an invalid frame: ", 1)[1]
                reasons = [r for r in sent if message.startswith(r + ":")]
                assert len(reasons) == 1, line
                logged[reasons[0]] += 1
        assert set(logged) == set(bad) and set(logged.values()) == {1}, logged
    finally:
        if bus is not None:
            bus.close()
        for sock in sockets:
            sock.close(linger=0)
        segmenter.stop()
        broker.stop()
        seg_log.close()
        broker_log.close()


def test_valid_envelopes_with_unusable_bodies_do_not_stop_the_llm(tmp_path: Path):
    """A rogue (or buggy) peer sends well-formed envelopes whose bodies have the wrong shape."""
    cfg_path = write_config(tmp_path)
    cfg = config_mod.load(cfg_path)
    env = pipeline_env(cfg_path, None)  # the embedded offline responder answers
    log_path = tmp_path / "stages.log"
    ctx = zmq.Context.instance()
    rogue = None
    bus = None
    with open(log_path, "wb") as log, Pipeline(env=env, stderr=log, names=["broker", "llm"]):
        try:
            wait_ready(cfg, ["broker", "llm"], 20)
            bus = BusWatcher(cfg)
            rogue = connect(cfg, zmq.PUB, "events_in")  # a rogue that holds the session's keys
            sender = wire.Sender("rogue")
            bad = [("cancel", {"spoken": 5, "reason": []}, 1), ("turn_start", {"text": {"a": 1}}, 2),
                   ("cancel", {"spoken": 7}, 2), ("cancel", {"spoken": None}, 2)]
            good = sender.make("turn_start", {"text": "こんにちは"}, turn=10)

            def answered(envs: list[wire.Envelope]) -> bool:
                return any(e.kind == "turn_result" and e.turn == good.turn for e in envs)

            # PUB drops what it sends before the broker's subscription reaches it: send until the
            # good turn is answered (the llm ignores a turn_start it already has)
            deadline = time.monotonic() + 20
            while not answered(bus.envelopes):
                assert time.monotonic() < deadline, "the llm never answered after the bad bodies"
                for kind, body, turn in bad:
                    rogue.send_multipart(wire.encode(sender.make(kind, body, turn=turn)))
                rogue.send_multipart(wire.encode(good))
                bus.wait_for(answered, 0.5)
            beat = bus.wait_for(lambda envs: next((e for e in reversed(envs) if e.kind == "heartbeat"
                                                   and e.body.get("stage") == "llm" and e.body.get("bad_frames")),
                                                  None), 5)
            assert beat and any(r.startswith("unusable cancel body") for r in beat.body["bad_frames"])
        finally:
            if rogue is not None:
                rogue.close(linger=0)
            if bus is not None:
                bus.close()
    text = log_path.read_text(errors="replace")
    assert text.count("could not handle a cancel") == 1
