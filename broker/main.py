"""The broker: binds every endpoint, so stages only connect and can restart freely.

- Event bus: stages PUB to ``events_in`` (XSUB); stages and observers SUB to ``events_out``
  (XPUB). Subscriptions flow back from XPUB to XSUB, so filtering happens at the publisher.
- Work queues ``tokens``, ``segments``, ``commands``: the producer PUSHes to ``<q>_in``
  (PULL here), the consumer PULLs from ``<q>_out`` (PUSH here). An item is read from
  ``<q>_in`` only when ``<q>_out`` can take it, so while a consumer is down items wait
  queued instead of being dropped, and the producer feels the back-pressure. Each forwarded
  item is also published on the bus (observers see the whole pipeline from one socket).
- Once a second the broker publishes its own ``heartbeat.broker``.
- Every endpoint is a CURVE server, and a ZAP authenticator admits only the client keys of
  the session's key folder (``[bus] curve_dir``, or the session's own: :mod:`broker.curve`).
- Once every endpoint is bound it records itself in the session's ``broker.json``; if an
  endpoint is taken, it exits saying what holds it (:mod:`broker.sessions`).
- The broker never decodes what it forwards, but a peer that sends a frame over
  :data:`broker.wire.MAX_FRAME_BYTES` is disconnected by ZeroMQ (``ZMQ_MAXMSGSIZE``), so a
  rogue's huge frame reaches no stage.

One thread, one poll loop: at our rates (tens of messages a second) this costs tens of
microseconds a hop and keeps ordering obvious.
"""

from __future__ import annotations

import logging
import os
import time

import zmq

from broker import wire
from broker import config as config_mod
from broker import curve, sessions
from broker.runtime import install_signal_handlers, setup_logging, stop_requested, watch_owner

QUEUES = ("tokens", "segments", "commands")
log = logging.getLogger("mmdagent_llm")


def run(cfg: config_mod.Config) -> int:
    setup_logging("broker")
    ctx = zmq.Context.instance()
    sockets: list[zmq.Socket] = []
    try:  # every socket a CURVE server, only the session's client keys admitted
        secure = curve.server_options(cfg)
        auth = curve.start_authenticator(ctx, cfg)  # before any bind: no window without checks
    except config_mod.ConfigError as exc:
        raise SystemExit(f"broker: configuration error: {exc}")

    def bind(kind: int, name: str) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.linger = 0
        sock.maxmsgsize = wire.MAX_FRAME_BYTES  # a peer sending a larger frame is disconnected
        secure(sock)
        addr = config_mod.endpoint(cfg, name)
        try:
            sock.bind(addr)
        except zmq.ZMQError as exc:
            why = sessions.conflict(cfg, "the broker", held=[addr]) or f"cannot bind {name} at {addr}: {exc}"
            raise SystemExit(f"mmdagent-llm broker: {why}")
        sockets.append(sock)
        return sock

    xsub = bind(zmq.XSUB, "events_in")
    xpub = bind(zmq.XPUB, "events_out")
    pulls = {q: bind(zmq.PULL, f"{q}_in") for q in QUEUES}
    pushes = {q: bind(zmq.PUSH, f"{q}_out") for q in QUEUES}
    for q in QUEUES:
        pushes[q].sndhwm = 10000
    pending: dict[str, list[bytes] | None] = {q: None for q in QUEUES}
    sender = wire.Sender("broker", cfg["bus"]["session"])
    install_signal_handlers()
    watch_owner()
    sessions.record_broker(cfg)
    log.info("session %r listening: %s", cfg["bus"]["session"],
             ", ".join(config_mod.endpoint(cfg, n) for n in config_mod.ENDPOINTS))

    next_beat = 0.0
    try:
        while not stop_requested():
            poller = zmq.Poller()
            poller.register(xsub, zmq.POLLIN)
            poller.register(xpub, zmq.POLLIN)
            for q in QUEUES:
                if pending[q] is None:
                    poller.register(pulls[q], zmq.POLLIN)
                else:
                    poller.register(pushes[q], zmq.POLLOUT)
            now = time.monotonic()
            if now >= next_beat:
                beat = sender.make("heartbeat", {"stage": "broker", "pid": os.getpid(), "ready": True, "info": {}})
                xpub.send_multipart(wire.encode(beat), zmq.NOBLOCK)
                next_beat = now + 1.0
            events = dict(poller.poll(timeout=max(1, int((next_beat - now) * 1000))))
            if xsub in events:
                xpub.send_multipart(xsub.recv_multipart(), zmq.NOBLOCK)
            if xpub in events:
                xsub.send_multipart(xpub.recv_multipart())  # a (un)subscription
            for q in QUEUES:
                if pulls[q] in events:
                    pending[q] = pulls[q].recv_multipart()
                if pending[q] is not None:
                    _forward(q, pending, pushes[q], xpub)
    finally:
        for sock in sockets:
            sock.close(linger=0)
        auth.stop()
    log.info("stopped")
    return 0


def _forward(q: str, pending: dict[str, list[bytes] | None], push: zmq.Socket, xpub: zmq.Socket) -> None:
    frames = pending[q]
    assert frames is not None
    try:
        push.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        return  # no consumer connected, or it is full: keep the item, stop reading this queue
    pending[q] = None
    try:
        xpub.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        pass  # the bus copy is for observers; XPUB drops at its high-water mark by design
