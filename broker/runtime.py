"""What every stage process shares: logging, signals, and :class:`Stage`, the socket loop.

A stage connects to the broker (it never binds), so it can be restarted alone:
- a SUB on ``events_out`` with the stage's topics, plus its own ``heartbeat.<name>``, which
  tells it is ready, and, if it :attr:`Stage.watches_peers`, every other ``heartbeat.``, which
  feeds :class:`broker.liveness.Liveness` (``on_peer``);
- a PUB on ``events_in`` for bus events;
- optionally a PULL on its input queue ``<q>_out`` and a PUSH on its output queue ``<q>_in``.

Readiness: a stage is *ready* once its own heartbeat has come back through the broker: that
proves the broker is up and has its subscriptions (ZeroMQ sends all of a socket's
subscriptions on connect, before anything else), so from then on it misses no bus event.
Heartbeats go out each second with ``ready`` set accordingly; tests and the console wait for
every stage to report ready instead of sleeping.

Every socket on the bus comes from :func:`connect`: a CURVE client holding the session's keys
(:mod:`broker.curve`), so only the owner's processes get in. A stage that cannot get in (the
broker at its address refuses its keys: another session's, or made anew) says so once. A
message of another session (possible only where sessions share a ``curve_dir``) is dropped
and counted as ``wrong session``. Another process under the stage's own name is reported once.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import struct
import sys
import threading
import time
from typing import Any, Callable

import zmq

from broker import wire
from broker import config as config_mod
from broker import curve
from broker.liveness import PIPELINE, Liveness

log = logging.getLogger("mmdagent_llm")
_stop = False


class _OneLineFormatter(logging.Formatter):
    """One event, one line: newlines inside a message or traceback are escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")


def setup_logging(stage: str, level: int = logging.INFO) -> None:
    """Log to stderr only (stdout belongs to MMDAgent-EX), with the stage's name on each line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(
        f"%(asctime)s.%(msecs)03d mmdagent-llm[{stage}] %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def install_signal_handlers() -> None:
    """SIGTERM/SIGINT ask the loop to stop; Python's default SIGTERM would skip cleanup."""
    def handler(signum: int, frame: Any) -> None:
        global _stop
        _stop = True
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# not MMDAGENT_LLM_*: that prefix is for configuration overrides
OWNER_ENV = "MMDAGENTLLM_OWNER_PID"


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on Windows: assumed, as there is no harmless probe)."""
    if sys.platform == "win32":
        return True  # os.kill(pid, 0) would terminate it there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_pid() -> int:
    """The pid whose end stops this process (``MMDAGENTLLM_OWNER_PID``: a plugin or the console), 0 if none."""
    try:
        return max(0, int(os.environ.get(OWNER_ENV, "0") or 0))
    except ValueError:
        return 0


def watch_owner(on_gone: Callable[[], None] | None = None) -> None:
    """If started for a plugin or the console (``MMDAGENTLLM_OWNER_PID``), stop when that
    process is gone: nothing they start may outlive them. ``on_gone`` (default:
    :func:`request_stop`, for a loop that checks it) runs on a thread of its own."""
    owner = owner_pid()
    if owner <= 0 or sys.platform == "win32":  # Windows: os.kill(pid, 0) would terminate it
        return

    def watch() -> None:
        try:  # Linux: a pidfd turns readable when the process ends, so idle costs no wake-ups
            select.select([os.pidfd_open(owner)], [], [])
        except (AttributeError, OSError):  # elsewhere (or an old kernel): ask twice a second
            while not _stop and alive(owner):
                time.sleep(0.5)
        if not _stop:
            logging.getLogger("mmdagent_llm").info("pid %d that started us is gone: stopping", owner)
            (on_gone or request_stop)()

    threading.Thread(target=watch, name="owner", daemon=True).start()


def request_stop() -> None:
    """Make the loop end after the current step (end of input, a lost stdout)."""
    global _stop
    _stop = True


def stop_requested() -> bool:
    return _stop


def connect(cfg: config_mod.Config, kind: int, name: str, subscribe: tuple[str, ...] = (),
            ctx: zmq.Context | None = None) -> zmq.Socket:
    """A socket of type ``kind`` connected to the broker's endpoint ``name`` of the session's bus.

    It is a CURVE client with the session's keys; a receiving socket drops a peer that sends a
    frame over :data:`broker.wire.MAX_FRAME_BYTES`; a SUB gets the ``subscribe`` prefixes.
    Observers use it as stages do: ``connect(config.load(), zmq.SUB, "events_out", ("",))``.
    """
    sock = (ctx or zmq.Context.instance()).socket(kind)
    sock.linger = 500
    if kind in (zmq.SUB, zmq.PULL):  # a peer sending a larger frame is disconnected, not read
        sock.maxmsgsize = wire.MAX_FRAME_BYTES
    for topic in subscribe:
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
    curve.client_options(cfg)(sock)
    sock.connect(config_mod.endpoint(cfg, name))
    return sock


_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the broker there refused this session's client key",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "it does not hold this session's server key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "it does not speak CURVE with this session's keys",
}


class Stage:
    """Base of every stage process. Subclasses set the class attributes and override the hooks."""

    name = "stage"
    topics: tuple[str, ...] = ()       # bus topics (prefixes) to receive in on_event
    input_queue: str | None = None     # work queue to receive in on_work
    output_queue: str | None = None    # work queue that push() sends to
    # whether on_peer/on_heartbeat matter here: a stage that ignores its peers subscribes to its
    # own heartbeat alone, and is not woken five times a second by the others' (idle CPU)
    watches_peers = True

    def __init__(self, cfg: config_mod.Config) -> None:
        self.cfg = cfg
        self.ready = False
        self.sender = wire.Sender(self.name, cfg["bus"]["session"])
        self.bad_frames: dict[str, int] = {}
        self.ctx = zmq.Context.instance()
        self.pub = connect(cfg, zmq.PUB, "events_in", ctx=self.ctx)
        beats = "heartbeat." if self.watches_peers else f"heartbeat.{self.name}"
        self.sub = connect(cfg, zmq.SUB, "events_out", (*self.topics, beats), self.ctx)
        peers = tuple(n for n in (*PIPELINE, "bridge") if n != self.name)
        self.liveness = Liveness(peers, cfg["bus"]["peer_timeout"])
        self.pull = connect(cfg, zmq.PULL, f"{self.input_queue}_out", ctx=self.ctx) if self.input_queue else None
        self.push_sock = connect(cfg, zmq.PUSH, f"{self.output_queue}_in", ctx=self.ctx) if self.output_queue else None
        if self.push_sock is not None:
            self.push_sock.sndtimeo = 2000
        # sockets or raw fds to poll too; may change between two turns of the loop
        self.extra: dict[zmq.Socket | int, Callable[[], None]] = {}
        self._twins: set[int] = set()  # other pids beating under our name (reported)
        self._handshake = self.sub.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(_HANDSHAKE_FAILURES))
        self._handshake_failed: set[int] = set()  # read with each heartbeat, not in the hot poll
        self._owner = owner_pid()

    def _on_handshake(self) -> None:
        """Say once, plainly, why we cannot get onto the bus (not every 100 ms retry)."""
        while self._handshake.poll(0):
            # a monitor message's first frame: uint16 event, int32 value (zmq_socket_monitor);
            # parsed here because zmq.utils.monitor imports asyncio, ~8 MB in every stage
            event = struct.unpack("=hi", self._handshake.recv_multipart()[0][:6])[0]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_failed.clear()
            elif event not in self._handshake_failed:
                self._handshake_failed.add(event)
                log.error("cannot get onto the bus at %s: %s. It is another session's broker, or the keys in "
                          "%s were made anew after it started (then restart every process of session %r)",
                          config_mod.endpoint(self.cfg, "events_out"), _HANDSHAKE_FAILURES[event],
                          curve.folder_of(self.cfg), self.cfg["bus"]["session"])

    # -- hooks ---------------------------------------------------------------------------
    def on_event(self, env: wire.Envelope) -> None:
        """A bus event matching :attr:`topics`."""

    def on_work(self, env: wire.Envelope) -> None:
        """A work item from :attr:`input_queue`."""

    def on_tick(self, now: float) -> None:
        """Called at least every :meth:`next_deadline` (monotonic time) and each loop."""

    def next_deadline(self) -> float | None:
        """Monotonic time by which on_tick must run, or None."""
        return None

    def on_heartbeat(self, env: wire.Envelope) -> None:
        """Another process's heartbeat (after :meth:`on_peer`, if it changed something)."""

    def on_peer(self, name: str, change: str) -> None:
        """Another process is ``up``, ``back``, ``restarted`` or ``gone`` (already logged)."""

    def info(self) -> dict[str, Any]:
        """Stage-specific fields of the heartbeat."""
        return {}

    def on_ready(self) -> None:
        """Called once, when the stage's own heartbeat has come back: from now on it misses no
        bus event, and what it publishes reaches every subscriber the broker has."""

    def close(self) -> None:
        """Release what the subclass holds; called once when the loop ends."""

    # -- sending -------------------------------------------------------------------------
    def publish(self, kind: str, body: dict[str, Any], *, turn: int = 0, origin: float | None = None) -> None:
        self.pub.send_multipart(wire.encode(self.sender.make(kind, body, turn=turn, origin=origin)))

    def push(self, kind: str, body: dict[str, Any], *, turn: int = 0, origin: float | None = None) -> None:
        assert self.push_sock is not None, f"{self.name} has no output queue"
        try:
            self.push_sock.send_multipart(wire.encode(self.sender.make(kind, body, turn=turn, origin=origin)))
        except zmq.Again:
            log.error("output queue %s is full or the broker is gone: dropped a %s of turn %d",
                      self.output_queue, kind, turn)

    # -- loop ----------------------------------------------------------------------------
    def _receive(self, sock: zmq.Socket) -> wire.Envelope | None:
        frames = sock.recv_multipart()
        try:
            env = wire.decode(frames)
            if env.session != self.sender.session:
                raise wire.WireError("wrong session", f"session {env.session[:40]!r}, not {self.sender.session!r}")
            return env
        except wire.WireError as exc:
            reason = exc.reason  # one of a few fixed phrases: the counts stay small
            self.bad_frames[reason] = self.bad_frames.get(reason, 0) + 1
            if self.bad_frames[reason] == 1:
                log.warning("dropped an invalid frame: %s (further ones with this reason are only counted)", exc)
            return None

    def _heartbeat(self) -> None:
        self.publish("heartbeat", {"stage": self.name, "pid": os.getpid(), "ready": self.ready, "info": self.info(),
                                   "bad_frames": dict(self.bad_frames), "duplicates": self.liveness.duplicates(),
                                   "owner": self._owner})

    def run(self) -> int:
        install_signal_handlers()
        watch_owner()
        log.info("started, pid %d, broker at %s", os.getpid(), config_mod.endpoint(self.cfg, "events_in"))
        next_beat = time.monotonic()
        poller = zmq.Poller()  # one for the whole loop: no allocation per message
        for sock in (self.sub, self.pull):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        polled: set = set()  # of self.extra, which a stage may change as it runs (a connection made or lost)
        try:
            while not stop_requested():
                if polled != self.extra.keys():
                    for sock in polled - self.extra.keys():
                        poller.unregister(sock)
                    for sock in self.extra.keys() - polled:
                        poller.register(sock, zmq.POLLIN)
                    polled = set(self.extra)
                now = time.monotonic()
                if now >= next_beat:
                    self._on_handshake()
                    self._heartbeat()
                    next_beat = now + (1.0 if self.ready else 0.1)
                deadline = min(d for d in (next_beat, self.next_deadline(), self.liveness.next_deadline())
                               if d is not None)
                events = dict(poller.poll(timeout=max(0, int((deadline - now) * 1000)) + 1))
                for sock, callback in list(self.extra.items()):
                    if sock in events:
                        callback()
                # Bus first: cancellation-like events must not wait behind queued work.
                if self.sub in events:
                    self._drain(self.sub, self._dispatch_event)
                if self.pull is not None and self.pull in events:
                    self._drain(self.pull, self.on_work, limit=1)
                now = time.monotonic()
                for name in self.liveness.check(now):
                    self.on_peer(name, "gone")
                self.on_tick(now)
        finally:
            self.close()
            self.sub.disable_monitor()
            self._handshake.close(linger=0)
            for sock in (self.pub, self.sub, self.pull, self.push_sock):
                if sock is not None:
                    sock.close(linger=500)
            log.info("stopped")
        return 0

    def _drain(self, sock: zmq.Socket, handler: Callable[[wire.Envelope], None], limit: int = 1000) -> None:
        for _ in range(limit):
            try:
                env = self._receive_nowait(sock)
            except zmq.Again:
                return
            if env is not None:
                self._handle(handler, env)

    def _handle(self, handler: Callable[[wire.Envelope], None], env: wire.Envelope) -> None:
        """Run a handler; a message it cannot take (a body of the wrong shape from a rogue or
        buggy peer) is logged once per kind and error, counted, and the stage goes on."""
        try:
            handler(env)
        except Exception as exc:
            reason = f"unusable {env.kind} body ({type(exc).__name__})"
            self.bad_frames[reason] = self.bad_frames.get(reason, 0) + 1
            if self.bad_frames[reason] == 1:
                log.exception("could not handle a %s from %s (further ones are only counted)", env.kind, env.sender)

    def _receive_nowait(self, sock: zmq.Socket) -> wire.Envelope | None:
        if not sock.poll(0, zmq.POLLIN):
            raise zmq.Again()
        return self._receive(sock)

    def _dispatch_event(self, env: wire.Envelope) -> None:
        if env.kind == "heartbeat" and env.body.get("stage") != self.name:
            pid = env.body.get("pid")  # a rogue's heartbeat may carry anything: never raise on it
            change = self.liveness.beat(str(env.body.get("stage")), pid if type(pid) is int else 0,
                                        bool(env.body.get("ready")), time.monotonic())
            if change:
                self.on_peer(str(env.body.get("stage")), change)
            self.on_heartbeat(env)
            return
        if env.kind == "heartbeat" and env.body.get("stage") == self.name:
            pid = env.body.get("pid")
            if pid != os.getpid() and type(pid) is int and pid not in self._twins:
                self._twins.add(pid)
                log.error("another %s process (pid %s) is on this bus besides this one (pid %d): they split or "
                          "double its work. Stop one of them", self.name, pid, os.getpid())
            if pid == os.getpid() and not self.ready:
                self.ready = True
                log.info("ready: connected to the broker, subscriptions in place")
                self._heartbeat()
                self.on_ready()
            return
        self.on_event(env)
