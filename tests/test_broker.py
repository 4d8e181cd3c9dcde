"""The broker's guarantees, with its forwarding in libzmq's proxies: a work item waits while no
consumer is connected and is delivered, once, when one comes; every forwarded item is also on
the bus, with its topic; bus events reach subscribers; the broker stops promptly on SIGTERM."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import zmq

from broker import config as config_mod
from broker import wire
from broker.runtime import connect
from tests.harness import ROOT, pipeline_env, write_config


def test_work_waits_for_its_consumer_and_is_mirrored_on_the_bus(tmp_path: Path):
    cfg_path = write_config(tmp_path)
    cfg = config_mod.load(cfg_path)
    env = pipeline_env(cfg_path, None)
    broker = subprocess.Popen([sys.executable, "-m", "stages.commands.cli", "broker"], cwd=ROOT, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ctx = zmq.Context.instance()
    socks = []
    try:
        _wait_broker(cfg)
        bus = connect(cfg, zmq.SUB, "events_out", ("token", "notice"), ctx=ctx)
        pub = connect(cfg, zmq.PUB, "events_in", ctx=ctx)
        socks += [bus, pub]
        sender = wire.Sender("llm", cfg["bus"]["session"])
        note = sender.make("notice", {"level": "info", "text": "hello"})
        seen = False
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:  # until the bus carries our events both ways
            pub.send_multipart(wire.encode(note))
            seen = bus.poll(200) and wire.decode(bus.recv_multipart()).body.get("text") == "hello"
        assert seen, "a bus event did not come back through the broker"
        while bus.poll(300):
            bus.recv_multipart()  # the other copies of the notice
        push = connect(cfg, zmq.PUSH, "tokens_in", ctx=ctx)
        socks.append(push)
        items = [sender.make("token", {"text": f"t{i}", "index": i}, turn=7) for i in range(5)]
        for env_ in items:
            push.send_multipart(wire.encode(env_))
        # no consumer yet: nothing is mirrored, because nothing was forwarded
        assert not bus.poll(500)
        pull = connect(cfg, zmq.PULL, "tokens_out", ctx=ctx)
        socks.append(pull)
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 5 and time.monotonic() < deadline:
            if pull.poll(200):
                got.append(wire.decode(pull.recv_multipart()))
        assert [e.body["text"] for e in got] == [f"t{i}" for i in range(5)]
        assert not pull.poll(300)                                              # each once
        mirrored = []
        while bus.poll(1000) and len(mirrored) < 5:
            frames = bus.recv_multipart()
            assert frames[0] == b"token"
            mirrored.append(wire.decode(frames).body["text"])
        assert mirrored == [f"t{i}" for i in range(5)]
    finally:
        for sock in socks:
            sock.close(linger=0)
        broker.terminate()
        try:
            code = broker.wait(5)
        except subprocess.TimeoutExpired:
            broker.kill()
            code = broker.wait(5)
    assert code == 0, broker.stderr.read().decode(errors="replace")


def _wait_broker(cfg: config_mod.Config) -> None:
    sub = connect(cfg, zmq.SUB, "events_out", ("heartbeat.broker",))
    try:
        assert sub.poll(15000), "the broker did not beat"
    finally:
        sub.close(linger=0)
