"""The bridge over Plugin_Remote: MMDAgent-EX reached over TCP instead of stdin/stdout.

The same bridge (:class:`stages.bridge.bridge.Bridge`: turn control, the allow-list of types
and senders, barge-in, cues, captions, expression, bad-input counting), with the avatar at the
other end of one TCP connection, which comes from a :class:`Dialer` (``remote --connect``: we
connect to MMDAgent-EX's Plugin_Remote server) or a :class:`Handoff` (``remote --listen``: the
listener accepted MMDAgent-EX's own connection and passed it on to this avatar's process).

- One connection for the whole session: MMDAgent-EX sometimes dies when a Plugin_Remote client
  disconnects, so the bridge never closes a working connection. It is kept alive by TCP
  keepalive (a peer that vanished, power cut or cable pulled, is found within about 25 s) and
  checked: after ``[remote] liveness`` seconds without a line from the app, the bridge sends one
  ``MMDAGENTLLM_ALIVE|<n>`` message (the app hands every message to every client, so it comes
  back; nothing in MMDAgent-EX acts on it); with still nothing for twice as long, the app is
  taken as gone.
- When the connection ends (the app quit, crashed, restarted; the network broke) the bridge
  stays up: the turn in progress is cancelled (reason ``gone``), and the next connection, a
  :class:`Dialer`'s retry (0.1 s, doubling to 1 s) or the app connecting again, is a
  conversation going on: its first answer is as fast as any other. A second connection for
  the avatar while one is held (``remote --listen``) is a restarted app whose old connection
  never closed (power cut, network cut), or another program at an allowed address: the held
  connection is asked (the liveness message); if anything comes on it within :data:`PROBE`
  seconds its app is there and the newcomer is closed, else the newcomer takes its place.
- Lines from the app are read as the stdio bridge reads them (cut at 64 KiB, invalid UTF-8
  replaced...); the app sends other clients' traffic too (every client hears everything, its
  own lines echoed), which turn control tells apart by content and turn as on stdio.
  ``REMOTE_EVENT_CONNECTED``/``REMOTE_EVENT_DISCONNECTED`` (other clients coming and going) are
  logged and published like any line; ``__AV_*`` lines are avatar control for the app, never
  messages: skipped and counted. A line cut off by the connection's end is skipped and counted.
- Lines to the app are the stdio bridge's (same allow-list, same cleaning); with no connection
  they are dropped, logged once per disconnection.
"""

from __future__ import annotations

import io
import logging
import queue
import socket
import sys
import threading
import time

from broker.runtime import request_stop
from stages.bridge import mmd_line
from stages.bridge.bridge import MAX_IN_BYTES, Bridge

log = logging.getLogger("mmdagent_llm")

ALIVE = "MMDAGENTLLM_ALIVE"  # the liveness check's message: no MMDAgent-EX plugin or scenario acts on it
WRITE_TIMEOUT = 10.0  # seconds a line may take to go out before the connection is taken as broken
CONNECT_TIMEOUT = 3.0
FIRST_RETRY, MAX_RETRY = 0.1, 1.0  # seconds between connection attempts (a refused one costs nothing)
PROBE = 3.0  # seconds the held connection has to show its app is there when a second one comes


def keep_alive(sock: socket.socket) -> None:
    """TCP keepalive: first probe after 10 s idle, then every 5 s, 3 unanswered end it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if sys.platform == "win32":
        sock.ioctl(socket.SIO_KEEPALIVE_VALS, (1, 10_000, 5_000))  # type: ignore[attr-defined]
        return
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPALIVE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class Dialer:
    """Connections to MMDAgent-EX's Plugin_Remote server at ``host:port``, made on a thread:
    one at start, another each time :meth:`lost` is called, retried until one succeeds."""

    def __init__(self, host: str, port: int) -> None:
        self.where = (host, port)
        self._wake_r, self._wake_w = socket.socketpair()
        self._ready: queue.SimpleQueue[tuple[socket.socket, str]] = queue.SimpleQueue()
        self._want = threading.Event()
        self._want.set()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dialer", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self._wake_r.fileno()

    def take(self) -> list[tuple[socket.socket, str]]:
        self._wake_r.recv(4096)
        out = []
        while not self._ready.empty():
            out.append(self._ready.get())
        return out

    def lost(self, sock: socket.socket) -> None:
        self._want.set()

    def _run(self) -> None:
        delay, failing = FIRST_RETRY, ""
        while True:
            self._want.wait()
            if self._closed.is_set():
                return
            try:
                sock = socket.create_connection(self.where, timeout=CONNECT_TIMEOUT)
            except OSError as exc:
                if str(exc) != failing:
                    failing = str(exc)
                    log.warning("cannot connect to MMDAgent-EX at %s:%d (%s): retrying every %.1f s at most",
                                *self.where, exc, MAX_RETRY)
                if self._closed.wait(delay):
                    return
                delay = min(delay * 2, MAX_RETRY)
                continue
            delay, failing = FIRST_RETRY, ""
            self._want.clear()
            self._ready.put((sock, f"{self.where[0]}:{self.where[1]}"))
            self._wake_w.send(b"!")

    def close(self) -> None:
        self._closed.set()
        self._want.set()
        self._thread.join(CONNECT_TIMEOUT + 1)
        self._wake_r.close()
        self._wake_w.close()


class Handoff:
    """Connections accepted by ``remote --listen`` and passed to this process over ``channel``
    (a Unix socket: each file descriptor with a line ``<id> <peer address>``). This side reports
    each connection it is done with (``-<id>``): the listener, which keeps a copy of it open (so
    this process dying does not close it), closes it then. The channel's end means the listener
    is gone: the process stops."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.ids: dict[int, str] = {}  # our descriptor -> the listener's id of the connection

    def fileno(self) -> int:
        return self.channel.fileno()

    def take(self) -> list[tuple[socket.socket, str]]:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.channel, 4096, 16)
        except OSError:
            data, fds = b"", []
        if not data:
            log.info("the listener that handed us connections is gone: stopping")
            request_stop()
            return []
        out = []
        for fd, line in zip(fds, data.decode("utf-8", "replace").split("\n")):  # sends may merge
            number, _, peer = line.partition(" ")
            self.ids[fd] = number
            out.append((socket.socket(fileno=fd), peer))
        return out

    def lost(self, sock: socket.socket) -> None:
        try:
            self.channel.send(f"-{self.ids.pop(sock.fileno(), '')}\n".encode())
        except OSError:
            pass

    def close(self) -> None:
        self.channel.close()


Connections = Dialer | Handoff


class RemoteBridge(Bridge):
    def __init__(self, cfg, connections: Connections) -> None:
        self.connections = connections
        self.sock: socket.socket | None = None
        self.peer = ""
        self.connected_times = 0
        self.check_after = cfg["remote"]["liveness"]
        self.heard_at = 0.0
        self.checked = 0  # liveness checks sent on this connection
        self.dropped_since_lost = 0
        self.candidate: tuple[socket.socket, str, float] | None = None  # a second connection, and its deadline
        super().__init__(cfg, stdin=io.BytesIO(), stdout=io.BytesIO())

    def _open_input(self, given: bool) -> None:
        self.extra[self.connections.fileno()] = self._on_connection

    def _on_connection(self) -> None:
        for sock, peer in self.connections.take():
            if self.sock is None:
                self._attach(sock, peer)
                continue
            if self.candidate is not None:
                self._refuse_candidate("a newer one came")
            self.candidate = (sock, peer, time.monotonic() + PROBE)
            log.info("a second connection for this avatar (%s): is the app on the one held (%s) still there?",
                     peer, self.peer)
            self._write(ALIVE, [str(self.connected_times)], 0, time.time())

    def _refuse_candidate(self, why: str) -> None:
        sock, peer, _ = self.candidate
        self.candidate = None
        log.warning("closed the second connection for this avatar (from %s): %s", peer, why)
        self.connections.lost(sock)
        sock.close()

    def _attach(self, sock: socket.socket, peer: str) -> None:
        try:
            keep_alive(sock)
            sock.settimeout(WRITE_TIMEOUT)
        except OSError as exc:
            log.warning("could not set up the connection from %s: %s", peer, exc)
        self.sock, self.peer = sock, peer
        self.connected_times += 1
        self.heard_at, self.checked, self.dropped_since_lost = time.monotonic(), 0, 0
        self._splitter = mmd_line.LineSplitter(MAX_IN_BYTES)  # nothing of an old connection's line
        self.extra[sock.fileno()] = self._on_readable
        log.info("connected to MMDAgent-EX (%s)%s", peer, "" if self.connected_times == 1 else
                 f": connection {self.connected_times} of this session")
        self._greet()  # the app (re)started: the avatar has just started

    def on_ready(self) -> None:
        self._carry_out(self.turns.on_ready(), time.time())  # the greeting waits for a connection

    def _on_readable(self) -> None:
        if self.sock is None:
            return
        try:
            data = self.sock.recv(MAX_IN_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"read failed: {exc}")
            return
        if not data:
            self._lost("closed by MMDAgent-EX")
            return
        self.heard_at, self.checked = time.monotonic(), 0
        if self.candidate is not None:
            self._refuse_candidate(f"the app on the connection held ({self.peer}) is there: another program "
                                   f"at an allowed address?")
        self._feed(data)

    def _lost(self, why: str) -> None:
        """The connection ended: forget it, end the turn it carried, wait for the next one."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        self.extra.pop(sock.fileno(), None)
        if self._splitter.buf or self._splitter.skipping is not None:
            self._bad("partial line", "a line cut off by the connection's end: skipped")
        self.connections.lost(sock)
        try:
            sock.close()
        except OSError:
            pass
        log.warning("connection to MMDAgent-EX (%s) lost: %s; waiting for it to come back", self.peer, why)
        self._carry_out(self.turns.on_avatar_gone(time.time()), time.time())
        if self.candidate is not None:
            sock, peer, _ = self.candidate
            self.candidate = None
            self._attach(sock, peer)

    def _take(self, raw: bytes) -> bool:
        if raw.startswith(b"__AV"):
            self._bad("avatar control", "an __AV_* line is for the app, not a message: skipped")
            return True
        if raw.startswith(b"REMOTE_EVENT_"):
            log.info("MMDAgent-EX: %s", raw.decode("utf-8", "replace").strip()[:100])
        return super()._take(raw)

    def _input_ended(self) -> None:
        self._lost("end of input")

    def _send(self, line: bytes) -> bool:
        if self.sock is None:
            self.dropped_since_lost += 1
            if self.dropped_since_lost == 1:
                log.warning("not connected to MMDAgent-EX: %s dropped (and any more until it is back)",
                            line.split(b"|", 1)[0].decode("utf-8", "replace")[:40])
            return False
        try:
            self.sock.sendall(line)
            return True
        except OSError as exc:
            self._lost(f"write failed: {exc}")
            return False

    def next_deadline(self) -> float | None:
        own = self.heard_at + self.check_after * (1 + 2 * self.checked) if self.sock is not None else None
        due = [d for d in (own, super().next_deadline(), self.candidate and self.candidate[2]) if d]
        return min(due) if due else None

    def on_tick(self, now: float) -> None:
        super().on_tick(now)
        if self.candidate is not None and now >= self.candidate[2]:
            self._lost(f"nothing from it within {PROBE:.0f} s while a newer connection of the avatar waited")
        if self.sock is None or now < self.heard_at + self.check_after * (1 + 2 * self.checked):
            return
        if self.checked:
            self._lost(f"nothing from it for {now - self.heard_at:.0f} s, not even the answer to a liveness check")
            return
        self.checked += 1
        self._write(ALIVE, [str(self.connected_times)], 0, time.time())

    def info(self) -> dict:
        return {**super().info(), "connected": self.sock is not None, "peer": self.peer,
                "connections": self.connected_times}

    def close(self) -> None:
        for sock in (self.sock, self.candidate and self.candidate[0]):
            if sock:
                sock.close()
        self.connections.close()
        super().close()
