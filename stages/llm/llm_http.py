"""The llm stage's HTTP client, with requests that can be cut off from another thread.

A request runs on a worker thread that is blocked in a socket read: waiting for the response
headers (the server has not answered yet) or for the next chunk of the stream. Neither
``Stream.close()`` nor closing the client wakes such a read. Shutting the socket down does,
at once, and the server sees the connection close. So every socket the client opens is
remembered with the thread that last wrote a request on it, and :meth:`Connections.cut`
shuts down those of one worker thread. Keep-alive pooling stays on (a cut connection is
simply discarded by the pool), so turns do not pay a new TLS handshake each.
"""

from __future__ import annotations

import socket
import threading
import weakref
from typing import Any, Iterable

import httpcore2
import httpx2
import openai


class _Stream(httpcore2.NetworkStream):
    def __init__(self, inner: httpcore2.NetworkStream, owner: "Connections") -> None:
        self.inner = inner
        self.thread = threading.current_thread()
        owner._add(self)
        self._owner = owner

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.thread = threading.current_thread()  # a request is sent by the thread that reads its answer
        self._owner.check(self.thread)
        self.inner.write(buffer, timeout)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, timeout)

    def close(self) -> None:
        self.inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore2.NetworkStream:
        return _Stream(self.inner.start_tls(ssl_context, server_hostname, timeout), self._owner)

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


def _transport(connections: Connections, proxy: str | None = None) -> httpx2.HTTPTransport:
    transport = httpx2.HTTPTransport(proxy=proxy)
    # httpx2 offers no public way to give its transport a network backend; the pool has one.
    transport._pool._network_backend = connections
    return transport


def make_client(api_key: str, base_url: str | None, max_retries: int,
                timeout: openai.Timeout) -> tuple[openai.OpenAI, Connections]:
    """The client, every connection of which :meth:`Connections.cut` can reach. A client given its
    own transport no longer reads ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``/``NO_PROXY``, so
    they are mounted here, as httpx itself would (a school or museum network often has a proxy)."""
    connections = Connections()
    mounts = {pattern: None if url is None else _transport(connections, url)
              for pattern, url in httpx2._utils.get_environment_proxies().items()}
    http_client = openai.DefaultHttpxClient(transport=_transport(connections), mounts=mounts, timeout=timeout)
    client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout,
                           http_client=http_client)
    return client, connections
