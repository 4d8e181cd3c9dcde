"""Plugin_Remote for the simulated MMDAgent-EX: the avatar reached over TCP.

It follows ``/work/shared/mmdagent-ex-protocol.md`` ("Plugin_Remote: MMDAgent-EX over TCP"),
cross-read with MMDAgent-EX's Plugin_Remote/Plugin_Remote.cpp. Either mode, on each connection:

- the peer's newline-terminated UTF-8 lines (a trailing CR dropped, invalid bytes replaced) are
  messages put on the app's queue, as a plugin's output is: ``TYPE|args``, or
  ``__AV_MESSAGE,TYPE|args``; other ``__AV_*`` lines are avatar control, not messages (ignored
  here); empty lines are dropped;
- every message the app dispatches is sent to every connected peer as ``TYPE|ARGS\\n``, so a line
  a peer sends comes back to every peer, the sender included, like everything the app and its
  other plugins say; a message dispatched while no peer is connected is lost (the real app
  queues nothing for a later peer).

Server mode (:class:`RemoteServer`, ``Plugin_Remote_EnableServer=true``), as the real app was seen
to behave: it listens on ``host:port`` (up to :data:`MAX_CLIENTS` clients; one more is closed at
once); a client's arrival and departure are messages too: ``REMOTE_EVENT_CONNECTED|<addr>`` and
``REMOTE_EVENT_DISCONNECTED|<addr>`` (``<addr>`` the client's IP address).

Client mode (:class:`RemoteDialer`, ``Plugin_Remote_EnableClient=true`` with
``Plugin_Remote_Hostname``, ``Plugin_Remote_Port``, ``Plugin_Remote_RetryCount``), from the source
(``connectClient()`` and ``process()``): the app connects out over IPv4 to ``host:port``; a failed
connect is retried ``retry_count`` times :data:`RETRY_INTERVAL` apart, and when every try failed
the app gives up for good (its network thread ends). A lost connection is logged and dialled
again at once under the same rule. No ``REMOTE_EVENT_*`` in this mode: the peer's name those
events carry is only set by ``accept()``.

Not modelled: the real app dying when a client disconnects in server mode (seen about 4 times in
7 on Linux), both modes at once, and the WebSocket mode.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

from stages.commands.avatar_sim import Received, SimulatedMMDAgent

log = logging.getLogger("mmdagent_llm")

MAX_CLIENTS = 20
AV_MESSAGE = "__AV_MESSAGE,"
RETRY_INTERVAL = 0.5  # PLUGIN_REMOTE_CONNECTION_ERROR_RETRY_INTERVAL_SEC
CONNECT_TIMEOUT = 5.0  # the real connect() waits as long as the OS lets it; a bound keeps close() prompt


def read_lines(sock: socket.socket, take: Callable[[list[bytes]], None]) -> None:
    """Read ``sock`` until it ends, handing each batch of whole lines (without ``\\n``) to ``take``."""
    buf = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        if lines:
            take(lines)


def message_of_remote(raw: bytes) -> str | None:
    """The message a peer's line carries, or None for avatar control and empty lines."""
    text = raw.decode("utf-8", errors="replace").removesuffix("\r")
    if text.startswith(AV_MESSAGE):
        text = text[len(AV_MESSAGE):]
    elif text.startswith("__AV_"):
        return None
    return text or None


class _Connection:
    """One of the app's Plugin_Remote connections, either mode: :meth:`send` puts an app message on
    it, :meth:`serve` turns the peer's lines into messages until it ends."""

    def __init__(self, sock: socket.socket, address: str = "") -> None:
        self.sock, self.address = sock, address
        self.lock = threading.Lock()  # sends come from the app's main loop, ends from other threads
        self.open = True

    def send(self, message: str) -> None:
        """Send ``message`` as a line; nothing once the connection is closed or broken."""
        with self.lock:
            if not self.open:
                return
            try:
                self.sock.sendall(message.encode("utf-8") + b"\n")
            except OSError:
                self.open = False  # serve() sees the end and closes it

    def serve(self, app: SimulatedMMDAgent) -> None:
        """Put the peer's messages on ``app``'s queue until the connection ends, then close it."""
        def take(lines: list[bytes]) -> None:
            for raw in lines:
                message = message_of_remote(raw)
                if message is not None:
                    app.send(message)
        read_lines(self.sock, take)
        with self.lock:
            self.open = False
        self.sock.close()

    def hang_up(self) -> None:
        """End the connection from this side (the app quits); :meth:`serve` then returns."""
        with self.lock:
            self.open = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class RemoteServer:
    """Plugin_Remote's server mode on ``app``; :attr:`port` is the port it listens on."""

    def __init__(self, app: SimulatedMMDAgent, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self._listener = socket.create_server((host, port))
        self.port = self._listener.getsockname()[1]
        self._clients: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self.refused = 0  # clients over MAX_CLIENTS
        app.add_listener(self._relay)
        self._thread = threading.Thread(target=self._accept, name="avatar-sim-remote", daemon=True)
        self._thread.start()

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._clients)

    def _relay(self, message: str) -> None:
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.send(message)

    def _accept(self) -> None:
        while True:
            try:
                sock, (address, *_) = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed or len(self._clients) >= MAX_CLIENTS:
                    self.refused += 1
                    sock.close()
                    continue
                client = _Connection(sock, address)
                self._clients.append(client)
            self.app.send(f"REMOTE_EVENT_CONNECTED|{address}")
            threading.Thread(target=self._read, args=(client,), name="avatar-sim-remote-client", daemon=True).start()

    def _read(self, client: _Connection) -> None:
        client.serve(self.app)
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
        if not self._closed:
            self.app.send(f"REMOTE_EVENT_DISCONNECTED|{client.address}")

    def close(self) -> None:
        """Stop listening and drop every client (the app quits)."""
        self._closed = True
        try:  # close() alone leaves a thread blocked in accept() holding the port (and accepting)
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            clients, self._clients = list(self._clients), []
        for client in clients:
            client.hang_up()


class RemoteDialer:
    """Plugin_Remote's client mode on ``app``: it connects out to the pipeline at ``host:port``
    (one network thread, ``avatar-sim-remote-dialer``, that dials, reads and dials again)."""

    def __init__(self, app: SimulatedMMDAgent, host: str, port: int, retry_count: int = 0, source: str = "") -> None:
        self.app, self.host, self.port, self.retry_count = app, host, port, retry_count
        self.source = source  # the address this app's PC connects from ("": the system's choice)
        self.connections = 0  # connections made
        self.failed_tries = 0  # connect attempts that failed, over the whole run
        self.gave_up = False  # every try of a round failed: nothing more is ever tried
        self._connection: _Connection | None = None
        self._cond = threading.Condition()  # guards the state above; notified on every change
        self._closing = threading.Event()
        app.add_listener(self._relay)
        self._thread = threading.Thread(target=self._run, name="avatar-sim-remote-dialer", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._connection is not None

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds (it may read this object's state); False on timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_connected(self, timeout: float) -> bool:
        """Whether a connection is up within ``timeout`` seconds."""
        return self.wait_for(lambda: self._connection is not None, timeout)

    def join(self, timeout: float) -> bool:
        """Whether the network thread has ended (given up, or closed) within ``timeout`` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _relay(self, message: str) -> None:
        with self._cond:
            connection = self._connection
        if connection is not None:  # the real app queues nothing while it has no peer
            connection.send(message)

    def _run(self) -> None:
        while True:
            connection = self._dial()
            if connection is None:
                return
            connection.serve(self.app)
            with self._cond:
                self._connection = None
                self._cond.notify_all()
            if self._closing.is_set():
                return
            log.warning("avatar-sim remote: lost connection, retrying %s:%d", self.host, self.port)

    def _dial(self) -> _Connection | None:
        """One round of connectClient(): the connection made, or None (given up, or closing)."""
        for attempt in range(self.retry_count + 1):
            if attempt and self._closing.wait(RETRY_INTERVAL):
                return None
            sock = self._try_connect()
            with self._cond:
                if self._closing.is_set():
                    if sock is not None:
                        sock.close()
                    return None
                if sock is not None:
                    self._connection = _Connection(sock)
                    self.connections += 1
                    self._cond.notify_all()
                    return self._connection
                self.failed_tries += 1
                self._cond.notify_all()
            log.warning("avatar-sim remote: failed to connect to %s:%d (%d/%d retries)",
                        self.host, self.port, attempt, self.retry_count)
        with self._cond:
            self.gave_up = True
            self._cond.notify_all()
        log.error("avatar-sim remote: gave up connecting to %s:%d", self.host, self.port)
        return None

    def _try_connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # gethostbyname: IPv4 only
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            if self.source:  # many "PCs" on one machine: 127.0.0.2, 127.0.0.3...
                sock.bind((self.source, 0))
            sock.connect((socket.gethostbyname(self.host), self.port))
            sock.settimeout(None)
            return sock
        except OSError:
            sock.close()
            return None

    def close(self) -> None:
        """The app quits: drop the connection, stop dialling, join the network thread."""
        with self._cond:
            self._closing.set()
            connection = self._connection
        if connection is not None:
            connection.hang_up()
        self._thread.join()
class RemoteClient:
    """A test's or tool's side of a Plugin_Remote connection: lines sent, lines received (timed).
    It connects to a listening app, or (:meth:`accepted`) is the pipeline a dialling app reached."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self._start(socket.create_connection((host, port), timeout=timeout))

    @classmethod
    def accepted(cls, listener: socket.socket, timeout: float) -> "RemoteClient":
        """The next connection to ``listener``; :class:`TimeoutError` if none within ``timeout``."""
        listener.settimeout(timeout)
        sock, _ = listener.accept()
        peer = cls.__new__(cls)
        peer._start(sock)
        return peer

    def _start(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(None)
        self.received: list[Received] = []
        self.ended = False  # the app closed the connection (or it broke)
        self._cond = threading.Condition()
        threading.Thread(target=self._read, name="remote-client", daemon=True).start()

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode("utf-8") + b"\n")

    def _read(self) -> None:
        def take(lines: list[bytes]) -> None:
            with self._cond:
                now = time.monotonic()
                self.received += [Received(now, raw.decode("utf-8", errors="replace")) for raw in lines]
                self._cond.notify_all()
        read_lines(self.sock, take)
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def wait_closed(self, timeout: float) -> bool:
        """Whether the connection ended within ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self.ended, timeout)

    def wait_line(self, prefix: str, timeout: float, after: int = 0) -> Received | None:
        """The first line at index >= ``after`` that starts with ``prefix``, or None after ``timeout``."""
        found: list[Received] = []

        def match() -> bool:
            found[:] = [r for r in self.received[after:] if r.line.startswith(prefix)][:1]
            return bool(found)
        with self._cond:
            self._cond.wait_for(match, timeout)
        return found[0] if found else None

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
