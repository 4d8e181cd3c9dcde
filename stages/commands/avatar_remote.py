"""Plugin_Remote for the simulated MMDAgent-EX: the avatar reached over TCP (server mode).

It follows ``/work/shared/mmdagent-ex-protocol.md`` ("Plugin_Remote: MMDAgent-EX over TCP"), as
the real app was seen to behave with ``Plugin_Remote_EnableServer=true``:

- it listens on ``host:port`` (up to :data:`MAX_CLIENTS` clients; one more is closed at once);
- each client's newline-terminated UTF-8 lines (a trailing CR dropped, invalid bytes replaced)
  are messages put on the app's queue, as a plugin's output is: ``TYPE|args``, or
  ``__AV_MESSAGE,TYPE|args``; other ``__AV_*`` lines are avatar control, not messages (ignored
  here); empty lines are dropped;
- every message the app dispatches is sent to every client as ``TYPE|ARGS\\n``, so a line a
  client sends comes back to every client, the sender included, like everything the app and its
  other plugins say;
- a client's arrival and departure are messages too: ``REMOTE_EVENT_CONNECTED|<addr>`` and
  ``REMOTE_EVENT_DISCONNECTED|<addr>`` (``<addr>`` the client's IP address).

Not modelled: the real app dying when a client disconnects (seen about 4 times in 7 on Linux), the
client mode (``Plugin_Remote_EnableClient``) and the WebSocket mode.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable

from stages.commands.avatar_sim import Received, SimulatedMMDAgent

MAX_CLIENTS = 20
AV_MESSAGE = "__AV_MESSAGE,"


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
    """The message a client's line carries, or None for avatar control and empty lines."""
    text = raw.decode("utf-8", errors="replace").removesuffix("\r")
    if text.startswith(AV_MESSAGE):
        text = text[len(AV_MESSAGE):]
    elif text.startswith("__AV_"):
        return None
    return text or None


class _Client:
    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock, self.address = sock, address
        self.lock = threading.Lock()  # sends come from the app's main loop and from close()
        self.open = True

    def send(self, message: str) -> None:
        with self.lock:
            if not self.open:
                return
            try:
                self.sock.sendall(message.encode("utf-8") + b"\n")
            except OSError:
                self.open = False  # its reader sees the end and says so


class RemoteServer:
    """Plugin_Remote's server mode on ``app``; :attr:`port` is the port it listens on."""

    def __init__(self, app: SimulatedMMDAgent, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self._listener = socket.create_server((host, port))
        self.port = self._listener.getsockname()[1]
        self._clients: list[_Client] = []
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
                client = _Client(sock, address)
                self._clients.append(client)
            self.app.send(f"REMOTE_EVENT_CONNECTED|{address}")
            threading.Thread(target=self._read, args=(client,), name="avatar-sim-remote-client", daemon=True).start()

    def _read(self, client: _Client) -> None:
        def take(lines: list[bytes]) -> None:
            for raw in lines:
                message = message_of_remote(raw)
                if message is not None:
                    self.app.send(message)
        read_lines(client.sock, take)
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
        with client.lock:
            client.open = False
        client.sock.close()
        if not self._closed:
            self.app.send(f"REMOTE_EVENT_DISCONNECTED|{client.address}")

    def close(self) -> None:
        """Stop listening and drop every client (the app quits)."""
        self._closed = True
        self._listener.close()
        with self._lock:
            clients, self._clients = list(self._clients), []
        for client in clients:
            with client.lock:
                client.open = False
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RemoteClient:
    """A test's or tool's side of a Plugin_Remote connection: lines sent, lines received (timed)."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
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
