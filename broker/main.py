"""The broker: binds every endpoint, so stages only connect and can restart freely.

- Event bus: stages PUB to ``events_in`` (XSUB); stages and observers SUB to ``events_out``
  (XPUB). Subscriptions flow back from XPUB to XSUB, so filtering happens at the publisher.
- Work queues ``tokens``, ``segments``, ``commands``: the producer PUSHes to ``<q>_in``
  (PULL here), the consumer PULLs from ``<q>_out`` (PUSH here). An item is read from
  ``<q>_in`` only when ``<q>_out`` can take it (libzmq's proxy polls the backend for room
  first), so while a consumer is down items wait queued instead of being dropped, and the
  producer feels the back-pressure. Each forwarded item is also published on the bus (the
  proxy's capture socket, a PUB into ``events_in``: observers see the whole pipeline from one
  socket; a copy is dropped, never waited for, if nobody can take it).
- Once a second the broker publishes its own ``heartbeat.broker``; ten times a second for its
  first ``EAGER_BEATS`` seconds, so that stages starting with it (a cold start) learn it is up
  at once, not up to a second after they subscribed.
- Every endpoint is a CURVE server, and a ZAP authenticator admits only the client keys of
  the session's key folder (``[bus] curve_dir``, or the session's own: :mod:`broker.curve`).
- Once every endpoint is bound it records itself in the session's ``broker.json``; if an
  endpoint is taken, it exits saying what holds it (:mod:`broker.sessions`).
- The broker never decodes what it forwards, but a peer that sends a frame over
  :data:`broker.wire.MAX_FRAME_BYTES` is disconnected by ZeroMQ (``ZMQ_MAXMSGSIZE``), so a
  rogue's huge frame reaches no stage.

Forwarding is libzmq's own: one ``zmq.proxy_steerable`` per flow (the bus, each queue), each
on its own thread, in C with the GIL released; no Python runs per message. The main thread
only beats the heartbeat and waits for the stop request, then sends each proxy ``TERMINATE``.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time

import zmq

from broker import wire
from broker import config as config_mod
from broker import curve, sessions
from broker.runtime import (connect, install_signal_handlers, owner_pid, setup_logging, stop_requested,
                            watch_owner)

QUEUES = ("tokens", "segments", "commands")
EAGER_BEATS = 3.0
log = logging.getLogger("mmdagent_llm")


def run(cfg: config_mod.Config) -> int:
    setup_logging("broker")
    ctx = zmq.Context.instance()
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
        return sock

    xsub = bind(zmq.XSUB, "events_in")
    xpub = bind(zmq.XPUB, "events_out")
    pulls = {q: bind(zmq.PULL, f"{q}_in") for q in QUEUES}
    pushes = {q: bind(zmq.PUSH, f"{q}_out") for q in QUEUES}
    for q in QUEUES:
        pushes[q].sndhwm = 10000
    flows = [("bus", xsub, xpub, None)] + [(q, pulls[q], pushes[q], connect(cfg, zmq.PUB, "events_in", ctx=ctx))
                                           for q in QUEUES]
    controls = []
    threads = []
    for name, front, back, capture in flows:
        control = ctx.socket(zmq.PAIR)
        control.bind(f"inproc://broker-{name}-{id(control)}")
        peer = ctx.socket(zmq.PAIR)
        peer.connect(control.last_endpoint.decode())
        controls.append(control)
        thread = threading.Thread(target=_proxy, args=(name, front, back, capture, peer), name=f"proxy-{name}",
                                  daemon=True)
        threads.append(thread)
    beat = connect(cfg, zmq.PUB, "events_in", ctx=ctx)
    sender = wire.Sender("broker", cfg["bus"]["session"])
    install_signal_handlers()
    # a signal writes a byte here before its handler runs: the main thread sleeps until the
    # next heartbeat or a stop, not in short naps (idle CPU)
    wake, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    watch_owner()
    owner = owner_pid()
    for thread in threads:
        thread.start()
    sessions.record_broker(cfg)
    log.info("session %r listening: %s", cfg["bus"]["session"],
             ", ".join(config_mod.endpoint(cfg, n) for n in config_mod.ENDPOINTS))
    try:
        next_beat, eager_until = 0.0, time.monotonic() + EAGER_BEATS
        while not stop_requested():
            now = time.monotonic()
            if now >= next_beat:
                env = sender.make("heartbeat", {"stage": "broker", "pid": os.getpid(), "ready": True, "info": {},
                                                 "owner": owner})
                beat.send_multipart(wire.encode(env), zmq.NOBLOCK)
                next_beat = now + (0.1 if now < eager_until else 1.0)
            if select.select([wake], [], [], max(0.0, next_beat - now))[0]:
                wake.recv(64)  # the signal's byte; its handler decides whether to stop
    finally:
        signal.set_wakeup_fd(-1)
        wake.close()
        wake_w.close()
        for control in controls:
            control.send(b"TERMINATE")
        for thread in threads:
            thread.join(2)
        for sock in [*controls, beat]:
            sock.close(linger=0)
        auth.stop()
    log.info("stopped")
    return 0


def _proxy(name: str, front: zmq.Socket, back: zmq.Socket, capture: zmq.Socket | None, control: zmq.Socket) -> None:
    """One flow, forwarded by libzmq until ``TERMINATE``; its sockets are closed on this thread."""
    try:
        zmq.proxy_steerable(front, back, capture, control)
    except zmq.ZMQError as exc:
        if exc.errno != zmq.ETERM:
            log.error("the %s proxy stopped: %s", name, exc)
    finally:
        for sock in (front, back, capture, control):
            if sock is not None:
                sock.close(linger=0)
