"""The llm stage's HTTP client, with requests that can be cut off from another thread, and
connections that outlive a turn.

A request runs on a worker thread that is blocked in a socket read: waiting for the response
headers (the server has not answered yet) or for the next chunk of the stream. Neither
``Stream.close()`` nor closing the client wakes such a read. Shutting the socket down does,
at once, and the server sees the connection close. So every socket the client opens is
remembered with the thread that last wrote a request on it, and :meth:`Connections.cut`
shuts down those of one worker thread (a cut connection is simply discarded by the pool).

A connection is kept for the next request, so a turn does not pay a TCP and TLS handshake:
- The openai client stops reading a stream at its ``data: [DONE]`` event and closes the
  response. The chunked body's last chunk (``0``, right behind it) is then unread, so the pool
  would throw the connection away: every streamed answer would cost the next turn a handshake.
  The transport reads that end before the ``[DONE]`` reaches the client (see
  :class:`_ToTheEnd`), for at most :data:`END_WAIT` seconds.
- The pool keeps idle connections for as long as the server does (httpx drops them after
  5 s by default); one the server closed is readable (EOF) and the pool discards it before use.
- :meth:`Connections.warm` tells whether an open connection waits for the next request, and
  :func:`open_ahead` opens one (the llm stage decides when: :mod:`stages.llm.warm`).
"""

from __future__ import annotations

import socket
import threading
import time
import weakref
from typing import Any, Iterable, Iterator

import httpcore2
import httpx2
import openai


END_WAIT = 0.25  # seconds to wait for the end of a body behind its [DONE]: the server sends it at once
_reading_the_end = threading.local()  # .until: the monotonic deadline of this thread's reads, while set


class _Stream(httpcore2.NetworkStream):
    def __init__(self, inner: httpcore2.NetworkStream, owner: "Connections") -> None:
        self.inner = inner
        self.thread = threading.current_thread()
        self.closed = False
        owner._add(self)
        self._owner = owner

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.thread = threading.current_thread()  # a request is sent by the thread that reads its answer
        self._owner.check(self.thread)
        self.inner.write(buffer, timeout)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        until = getattr(_reading_the_end, "until", None)
        if until is not None:
            left = max(0.001, until - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        return self.inner.read(max_bytes, timeout)

    def close(self) -> None:
        self.closed = True
        self.inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore2.NetworkStream:
        tls = _Stream(self.inner.start_tls(ssl_context, server_hostname, timeout), self._owner)
        self.closed = True  # its socket is the TLS stream's now: only that one counts as open
        return tls

    def usable(self) -> bool:
        """Open, and nothing to read: a server that closed it (EOF), a cut, or bytes nobody asked for
        make it readable, and the pool would discard it before a request."""
        if self.closed:
            return False
        try:
            return not self.inner.get_extra_info("is_readable")
        except (OSError, ValueError):  # closed under us by the thread that used it last
            return False

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)

    def shutdown(self) -> None:
        sock = self.inner.get_extra_info("socket")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the other side or by us


class Connections(httpcore2.NetworkBackend):
    """A network backend that remembers its streams (weakly) so :meth:`cut` can reach them."""

    def __init__(self) -> None:
        self._backend = httpcore2.SyncBackend()
        self._streams: "weakref.WeakSet[_Stream]" = weakref.WeakSet()
        self._cut: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()
        self._lock = threading.Lock()

    def _add(self, stream: _Stream) -> None:
        with self._lock:
            self._streams.add(stream)

    def check(self, thread: threading.Thread) -> None:
        """Refuse to send for a cut thread: the client's own retries must not reach the server."""
        if thread in self._cut:
            raise httpcore2.WriteError("request cancelled")

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore2.NetworkStream:
        self.check(threading.current_thread())
        return _Stream(self._backend.connect_tcp(host, port, timeout, local_address, socket_options), self)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore2.NetworkStream:
        self.check(threading.current_thread())
        return _Stream(self._backend.connect_unix_socket(path, timeout, socket_options), self)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)

    def cut(self, thread: threading.Thread) -> int:
        """Shut down every connection in use by ``thread`` and refuse it new ones; returns how
        many were shut down."""
        with self._lock:
            self._cut.add(thread)
            mine = [s for s in self._streams if s.thread == thread]
        for stream in mine:
            stream.shutdown()
        return len(mine)

    def warm(self) -> bool:
        """Whether an open connection waits for the next request (:meth:`_Stream.usable`). Asked
        while no request runs: then every open connection is an idle one in the pool."""
        with self._lock:
            streams = list(self._streams)
        return any(stream.usable() for stream in streams)


_DONE_LINES = (b"data: [DONE]", b"data:[DONE]")


class _ToTheEnd(httpx2.SyncByteStream):
    """A server-sent event stream that, once its ``data: [DONE]`` line has come (the last event of
    a streamed answer), is read to its end before that part is handed on: a client that stops at
    ``[DONE]`` then leaves the connection reusable. No token waits: ``[DONE]`` comes after the
    last one. Only a whole line counts: an answer that says "data: [DONE]" has it inside a JSON
    line (JSON escapes line breaks, so every line break of the stream is a real one). Should the
    end not come within :data:`END_WAIT`, the part goes on all the same and the pool discards the
    connection, as it would have without this."""

    def __init__(self, inner: httpx2.SyncByteStream) -> None:
        self.inner = inner

    def __iter__(self) -> Iterator[bytes]:
        parts = iter(self.inner)
        line = b""  # the line being received, while it is short enough to be the [DONE] line
        for part in parts:
            lines = (line + part).split(b"\n")
            line = lines[-1] if len(lines[-1]) <= 16 else b"-" * 17
            if any(whole.rstrip(b"\r") in _DONE_LINES for whole in lines[:-1]):
                _reading_the_end.until = time.monotonic() + END_WAIT
                try:
                    part += b"".join(parts)
                except httpx2.TransportError:
                    pass  # too late or broken: the connection is dropped, the answer is complete anyway
                finally:
                    _reading_the_end.until = None
                yield part
                return
            yield part

    def close(self) -> None:
        self.inner.close()


class _Transport(httpx2.HTTPTransport):
    """httpx's transport, with :class:`Connections` as the pool's network backend, idle
    connections kept as long as the server keeps them, and bodies read :class:`_ToTheEnd`."""

    def __init__(self, connections: Connections, proxy: str | None = None) -> None:
        # httpx's default limits, but no expiry: the pool would drop an idle connection after 5 s
        super().__init__(proxy=proxy, limits=httpx2.Limits(max_connections=100, max_keepalive_connections=20,
                                                           keepalive_expiry=None))
        # httpx2 offers no public way to give its transport a network backend; the pool has one.
        self._pool._network_backend = connections

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = super().handle_request(request)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            assert isinstance(response.stream, httpx2.SyncByteStream)
            response.stream = _ToTheEnd(response.stream)
        return response


def make_client(api_key: str, base_url: str | None, max_retries: int,
                timeout: openai.Timeout) -> tuple[openai.OpenAI, Connections]:
    """The client, every connection of which :meth:`Connections.cut` can reach. A client given its
    own transport no longer reads ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``/``NO_PROXY``, so
    they are mounted here, as httpx itself would (a school or museum network often has a proxy)."""
    connections = Connections()
    mounts = {pattern: None if url is None else _Transport(connections, url)
              for pattern, url in httpx2._utils.get_environment_proxies().items()}
    http_client = openai.DefaultHttpxClient(transport=_Transport(connections), mounts=mounts, timeout=timeout)
    client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout,
                           http_client=http_client)
    return client, connections


def open_ahead(client: openai.OpenAI, timeout: float) -> None:
    """Have ``client`` open a connection to its server now, through its own pool (so through
    the same proxy, TLS settings and checks as a turn): ``GET {base_url}/models``, the cheapest
    request every OpenAI-compatible server serves. Any HTTP answer will do (401, 404: the
    connection is open and kept); raises :class:`openai.APIConnectionError` (or its
    :class:`openai.APITimeoutError`) when the server cannot be reached."""
    try:
        client.get("/models", cast_to=httpx2.Response,
                   options={"max_retries": 0, "timeout": timeout, "follow_redirects": False})
    except openai.APIStatusError:
        pass  # answered: that is all this asks for
