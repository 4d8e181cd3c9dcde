"""An embedded OpenAI-compatible chat completion server, and the offline reply it gives by default.

- **Product.** With neither ``OPENAI_API_KEY`` nor ``OPENAI_BASE_URL`` set, the ``llm`` stage runs
  ``ChatCompletionServer(offline_reply)`` on 127.0.0.1, port 0, and points the real openai client
  at :attr:`~ChatCompletionServer.base_url`, so the same client code runs offline.
  :func:`offline_reply` is plainly not an LLM: two or three sentences in the language of the last
  user message (any kana or kanji: Japanese, else English) echoing it (at most 60 characters),
  from a few templates picked by the text; paced like a stream, first token after about 0.3 s,
  then 1-3 Japanese characters or one English word every 20-40 ms, seeded by the text so it is
  reproducible. :data:`OFFLINE_NOTICE` announces it to the user.
- **Tests.** A reply function returns scripted steps: :class:`Token`, :class:`Status`,
  :class:`ErrorEvent`, :class:`Cut`, :class:`Stall`, :class:`Comment`.

The wire format is OpenAI's: with ``stream: true``, ``text/event-stream`` in chunked framing,
``data: {json}\\n\\n`` events of ``chat.completion.chunk`` objects (the first with
``delta: {"role": "assistant", "content": ""}``), a finish chunk (``finish_reason: "stop"``), a
usage chunk (``choices == []``) if ``stream_options.include_usage``, then ``data: [DONE]``;
otherwise one ``chat.completion`` with the tokens joined and ``usage``. Errors have OpenAI's body
``{"error": {"message", "type", "code"}}``. Headers go out with the first byte of the body, as
with servers that answer once the model produces something: a :class:`Status` works while
nothing was sent, and a :class:`Stall` before any output leaves the client waiting for headers.

For tests, under one :class:`threading.Condition` (see :meth:`~ChatCompletionServer.wait_for`):
``requests``, every request body (never headers, so never the API key), ``connections``,
one :class:`ConnectionRecord` per request with ``time.monotonic()`` stamps and
``closed_by_client`` (a write failed, or EOF was seen while the server paused, before the
response was complete), and ``links``, one :class:`LinkRecord` per TCP connection accepted (when
its TLS handshake completed; each request names its link). Optionally the server speaks TLS
(``ssl_context``, then :attr:`~ChatCompletionServer.base_url` is ``https://``) and closes a
connection on which no request came for ``idle_timeout`` seconds, as uvicorn (5 s) and nginx
(75 s) close idle keep-alive connections. No global state; every wait is bounded; ``stop()``
never hangs.
"""

from __future__ import annotations

import json
import random
import re
import select
import socket
import ssl
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Union

OFFLINE_NOTICE = (
    "mmdagent-llm: no LLM configured (OPENAI_API_KEY / OPENAI_BASE_URL unset): answering with the "
    "embedded offline responder, which is not a language model. Set OPENAI_API_KEY for OpenAI, or "
    "OPENAI_BASE_URL for a local server (e.g. http://localhost:11434/v1 for Ollama).\n"
    "mmdagent-llm: LLMが設定されていません（OPENAI_API_KEY / OPENAI_BASE_URL が未設定）。内蔵の"
    "オフライン応答で答えますが、これは言語モデルではありません。OpenAIを使うには OPENAI_API_KEY を、"
    "ローカルサーバーを使うには OPENAI_BASE_URL（例: Ollama なら http://localhost:11434/v1）を設定してください。"
)


@dataclass
class Token:
    """Sleep ``delay`` seconds, then send one content chunk carrying ``text``."""
    text: str
    delay: float = 0.0


@dataclass
class Status:
    """Answer HTTP ``code`` with ``body`` and extra ``headers`` instead of a stream: a dict as JSON
    (OpenAI's error shape), a str as plain text (a server that is not an OpenAI-compatible API,
    e.g. Go's ``404 page not found``). Honoured only while nothing was sent: make it the first step."""
    code: int
    body: dict | str
    headers: dict = field(default_factory=dict)


@dataclass
class ErrorEvent:
    """Send ``data: {"error": {"message": message, "type": "server_error"}}`` in the stream; this
    ends the answer (no finish chunk, no ``[DONE]``, later steps ignored)."""
    message: str


@dataclass
class Cut:
    """Drop the connection mid-stream, without ``[DONE]`` or the closing chunk: a FIN, or with
    ``reset`` a TCP RST (a crashed proxy rather than a server that went away)."""
    reset: bool = False


@dataclass
class Stall:
    """Send nothing for ``seconds`` (a stalled LLM)."""
    seconds: float


@dataclass
class Comment:
    """Send an SSE ``: keep-alive`` comment line."""


@dataclass
class ToolCall:
    """Stream a call of tool ``name``, as OpenAI does: a delta with its ``call_id`` and name, then
    its JSON ``arguments`` split over ``pieces`` more deltas (``delay`` before each); the answer
    then ends with ``finish_reason: "tool_calls"``."""
    name: str
    arguments: str = "{}"
    call_id: str = "call_1"
    index: int = 0
    pieces: int = 3
    delay: float = 0.0


Step = Union[Token, Status, ErrorEvent, Cut, Stall, Comment, ToolCall]
ReplyFn = Callable[[dict], Iterable[Step]]


@dataclass
class ConnectionRecord:
    """One request as the server saw it; times are ``time.monotonic()``."""
    opened: float                     # the request arrived
    path: str = ""
    status: int | None = None         # HTTP status sent, None while nothing was sent
    closed: float | None = None       # the response ended: complete, cut, failed or abandoned
    closed_by_client: bool = False    # the client hung up before the response was complete
    outcome: str = ""                 # done, status, error_event, cut, client_closed, stopped, error: ...
    sent: list[tuple[float, str]] = field(default_factory=list)  # (when written, text) of each token
    link: int = -1                    # the TCP connection it came on: its index in ``links``


@dataclass
class LinkRecord:
    """One TCP connection as the server saw it; times are ``time.monotonic()``."""
    accepted: float                   # its handler started, right after the accept
    handshaken: float | None = None   # its TLS handshake completed (None: plain HTTP, or it failed)
    closed: float | None = None
    idle_closed: bool = False         # closed by the server: no request within ``idle_timeout``
    requests: int = 0


class _ClientGone(Exception):
    pass


class ChatCompletionServer:
    """Serves POST /v1/chat/completions (stream and non-stream) and GET /v1/models on 127.0.0.1;
    over TLS with ``ssl_context`` (a server-side context holding the certificate); closing a
    connection idle for ``idle_timeout`` seconds, if given."""

    def __init__(self, reply: ReplyFn, *, host: str = "127.0.0.1", port: int = 0,
                 ssl_context: ssl.SSLContext | None = None, idle_timeout: float | None = None) -> None:
        self.reply = reply
        self.ssl_context = ssl_context
        self.idle_timeout = idle_timeout
        self.requests: list[dict] = []
        self.connections: list[ConnectionRecord] = []
        self.links: list[LinkRecord] = []
        self.cond = threading.Condition()  # guards requests, connections, links and _sockets
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self._httpd = _Server((host, port), type("Handler", (_Handler,), {"owner": self}))
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # stop() must not wait for handler threads
        self._httpd.ssl_context = ssl_context

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{'https' if self.ssl_context else 'http'}://{host}:{port}/v1"

    @property
    def handshakes(self) -> int:
        """TLS handshakes completed so far."""
        with self.cond:
            return sum(1 for link in self.links if link.handshaken is not None)

    def start(self) -> "ChatCompletionServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="chat-completion-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(2.0)
            self._thread = None
        with self.cond:
            sockets = list(self._sockets)
        for sock in sockets:
            try:  # shutdown, not close: only shutdown wakes a thread blocked in recv or sendall
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()

    def wait_for(self, predicate: Callable[["ChatCompletionServer"], Any], timeout: float) -> bool:
        """Wait until ``predicate(self)`` is true, at most ``timeout`` seconds; returns whether it is."""
        with self.cond:
            return bool(self.cond.wait_for(lambda: predicate(self), timeout))

    def _note(self, record: "ConnectionRecord | LinkRecord", **changes: Any) -> None:
        with self.cond:
            for name, value in changes.items():
                setattr(record, name, value)
            self.cond.notify_all()


class _Server(ThreadingHTTPServer):
    ssl_context: ssl.SSLContext | None = None
    # socketserver's default backlog is 5: twenty llm stages asking at once (twenty avatars)
    # had connections reset, each then a retried or failed turn
    request_queue_size = 64

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.ssl_context is not None:  # the handshake is the handler thread's: a slow client blocks no other
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address


_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Transfer-Encoding": "chunked",
                "Cache-Control": "no-cache"}


class _Handler(BaseHTTPRequestHandler):
    owner: ChatCompletionServer
    protocol_version = "HTTP/1.1"     # keep-alive and chunked framing, as OpenAI serves
    timeout = 60                      # bounds every blocking socket call of a forgotten client
    record: ConnectionRecord
    link: LinkRecord
    link_index: int

    def handle(self) -> None:
        with self.owner.cond:
            self.owner._sockets.add(self.connection)
            self.link = LinkRecord(accepted=time.monotonic())
            self.link_index = len(self.owner.links)
            self.owner.links.append(self.link)
            self.owner.cond.notify_all()
        try:
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.do_handshake()  # a failed one raises ssl.SSLError, an OSError
                self.owner._note(self.link, handshaken=time.monotonic())
            super().handle()
        except (OSError, ValueError):
            pass  # a client resetting an idle keep-alive connection is normal, not an error
        finally:
            with self.owner.cond:
                self.owner._sockets.discard(self.connection)
            try:  # the FIN goes out now, not when the server gets round to closing: ``closed`` is true
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.owner._note(self.link, closed=time.monotonic())

    def handle_one_request(self) -> None:
        idle = self.owner.idle_timeout
        if idle is not None and not self._request_within(idle):
            self.close_connection = True
            self.owner._note(self.link, idle_closed=True)
            return
        super().handle_one_request()

    def _request_within(self, seconds: float) -> bool:
        """Whether the next request starts within ``seconds`` (or the client hangs up, or the server
        stops: the read that follows sees it). Clients do not pipeline, so nothing waits in rfile."""
        if isinstance(self.connection, ssl.SSLSocket) and self.connection.pending():
            return True
        try:
            return bool(select.select([self.connection], [], [], seconds)[0])
        except (OSError, ValueError):
            return True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the stage logs outcomes; a line per request would be noise

    def do_GET(self) -> None:
        self._serve(lambda: self._json(200, {"object": "list", "data": [
            {"id": "offline-responder", "object": "model", "created": 0, "owned_by": "mmdagent-llm"}]})
            if self.path.rstrip("/") == "/v1/models" else self._not_found())

    def do_POST(self) -> None:
        self._serve(self._post)

    def _serve(self, method: Callable[[], None]) -> None:
        self.record = ConnectionRecord(opened=time.monotonic(), path=self.path, link=self.link_index)
        with self.owner.cond:
            self.owner.connections.append(self.record)
            self.link.requests += 1
            self.owner.cond.notify_all()
        try:
            method()
        except _ClientGone:
            self.close_connection = True
            gone = not self.owner._stopping.is_set()
            self.owner._note(self.record, closed=time.monotonic(), closed_by_client=gone,
                             outcome="client_closed" if gone else "stopped")
        except Exception as exc:  # a broken reply script: answer 500 if still possible, never hang
            self.close_connection = True
            if self.record.status is None:
                try:
                    self._json(500, _error(f"reply failed: {exc!r}", "server_error"))
                except _ClientGone:
                    pass
            self.owner._note(self.record, closed=time.monotonic(), outcome=f"error: {exc!r}")

    def _not_found(self) -> None:
        self._json(404, _error(f"Unknown path {self.path}", "invalid_request_error", "unknown_url"))

    def _post(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._not_found()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return self._json(400, _error("The body is not a JSON object.", "invalid_request_error"))
        with self.owner.cond:
            self.owner.requests.append(body)
            self.owner.cond.notify_all()
        (self._stream if body.get("stream") else self._whole)(body, iter(self.owner.reply(body)))

    def _stream(self, body: dict, steps: Iterable[Step]) -> None:
        chunk = _chunk_maker(body)
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        count, finish = 0, "stop"
        for step in steps:
            if isinstance(step, Status) and self.record.status is None:
                return self._status(step)
            if isinstance(step, (Stall, Token)):
                self._pause(step.seconds if isinstance(step, Stall) else step.delay)
            if isinstance(step, Stall):
                continue
            if self.record.status is None:  # the headers and the role chunk go with the first output
                self._head(200, _SSE_HEADERS)
                self._event(chunk({"role": "assistant", "content": ""}, None, usage))
            if isinstance(step, Cut):
                return self._cut(step.reset)
            if isinstance(step, Comment):
                self._send(_framed(b": keep-alive\n\n"))
            elif isinstance(step, ToolCall):
                finish = "tool_calls"
                self._event(chunk({"tool_calls": [{"index": step.index, "id": step.call_id, "type": "function",
                                                   "function": {"name": step.name, "arguments": ""}}]}, None, usage))
                size = -(-len(step.arguments) // max(1, step.pieces)) or 1
                for at in range(0, len(step.arguments), size):
                    self._pause(step.delay)
                    self._event(chunk({"tool_calls": [{"index": step.index, "function": {
                        "arguments": step.arguments[at:at + size]}}]}, None, usage))
            elif isinstance(step, Token):
                self._event(chunk({"content": step.text}, None, usage))
                self.record.sent.append((time.monotonic(), step.text))
                count += 1
            else:  # an ErrorEvent, or a Status too late for the headers: the error ends the answer
                message = step.message if isinstance(step, ErrorEvent) else "script error: Status after output"
                self.owner._note(self.record, closed=time.monotonic(), outcome="error_event")
                error = {"message": message, "type": "server_error", "param": None, "code": None}
                return self._send(_framed(b"data: " + json.dumps({"error": error}).encode() + b"\n\n") + b"0\r\n\r\n")
        if self.record.status is None:
            self._head(200, _SSE_HEADERS)
            self._event(chunk({"role": "assistant", "content": ""}, None, usage))
        self._event(chunk({}, finish, usage))
        if usage:
            self._event({**chunk({}, None, False), "choices": [], "usage": _usage(body, count)})
        # Noted before the last write, so a client that has read [DONE] finds the record complete
        # (a failed write overwrites it); [DONE] and the closing chunk in one write, so a client
        # that stops reading at [DONE] does not turn a complete answer into a failed write.
        self.owner._note(self.record, closed=time.monotonic(), outcome="done")
        self._send(_framed(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    def _whole(self, body: dict, steps: Iterable[Step]) -> None:
        texts: list[str] = []
        for step in steps:
            if isinstance(step, (Stall, Token)):
                self._pause(step.seconds if isinstance(step, Stall) else step.delay)
            if isinstance(step, Token):
                texts.append(step.text)
            elif isinstance(step, Status):
                return self._status(step)
            elif isinstance(step, ErrorEvent):
                return self._json(500, _error(step.message, "server_error"))
            elif isinstance(step, Cut):
                return self._cut(step.reset)
        completion = {**_chunk_maker(body)({}, "stop", False), "object": "chat.completion",
                      "usage": _usage(body, len(texts))}
        completion["choices"] = [{"index": 0, "logprobs": None, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "".join(texts), "refusal": None}}]
        self._json(200, completion)

    def _head(self, code: int, headers: dict) -> None:
        self.owner._note(self.record, status=code)
        self.send_response_only(code)
        self.send_header("Date", self.date_time_string())
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex[:24]}")
        for name, value in headers.items():
            self.send_header(name, str(value))
        self._headers_buffer.append(b"\r\n")  # not end_headers(): that writes now; _send sends them with the body

    def _json(self, code: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self._head(code, {"Content-Type": "application/json", "Content-Length": len(data), **(headers or {})})
        self.owner._note(self.record, closed=time.monotonic(), outcome="done" if code < 400 else "status")
        self._send(data)

    def _status(self, step: Status) -> None:
        if isinstance(step.body, dict):
            return self._json(step.code, step.body, step.headers)
        data = step.body.encode("utf-8")
        self._head(step.code, {"Content-Type": "text/plain; charset=utf-8", "Content-Length": len(data),
                               **step.headers})
        self.owner._note(self.record, closed=time.monotonic(), outcome="status")
        self._send(data)

    def _event(self, payload: dict) -> None:
        self._send(_framed(b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"))

    def _send(self, data: bytes) -> None:
        if self.owner._stopping.is_set():
            raise _ClientGone()
        head, self._headers_buffer = b"".join(getattr(self, "_headers_buffer", [])), []
        try:
            self.wfile.write(head + data)
        except OSError as exc:  # BrokenPipe, ConnectionReset: the client hung up
            raise _ClientGone() from exc

    def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, noticing at once a client that hangs up or a server that stops:
        a silent server cannot learn of a hang-up from a failed write."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.owner._stopping.is_set():
                raise _ClientGone()
            try:
                readable = select.select([self.connection], [], [], min(left, 0.05))[0]
                if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                    raise _ClientGone()
            except (OSError, ValueError) as exc:
                raise _ClientGone() from exc
            if readable:  # unexpected bytes, not EOF: sleep rather than spin on select
                self.owner._stopping.wait(min(left, 0.05))

    def _cut(self, reset: bool) -> None:
        self._send(b"")  # headers out first (if any are pending), so the cut is mid-stream
        self.close_connection = True
        self.owner._note(self.record, closed=time.monotonic(), outcome="cut")
        if reset:
            # linger 0 makes close() send RST; rfile (a makefile) would keep the fd open otherwise
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.connection.close()
        else:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _framed(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _error(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _chunk_maker(body: dict) -> Callable[[dict, str | None, bool], dict]:
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    model = body.get("model") or "offline-responder"

    def chunk(delta: dict, finish: str | None, usage: bool) -> dict:
        out = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
               "system_fingerprint": None,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if usage:  # OpenAI sends "usage": null on every chunk once usage was asked for
            out["usage"] = None
        return out
    return chunk


def _usage(body: dict, completion_tokens: int) -> dict:
    # A rough estimate: no tokenizer offline, and callers only need consistent numbers.
    prompt = sum(len(str(m.get("content") or "")) for m in body.get("messages") or []) // 2 + 1
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


# -- the offline reply ---------------------------------------------------------------------
_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f]")
_JA_TEMPLATES = (
    "「{}」ですね。わたしは今、オフラインの練習用の応答をしています。本物のLLMにつなぐと、ちゃんとお話しできますよ。",
    "「{}」と聞こえました。これはオフラインの練習用の応答で、言語モデルではありません。LLMを設定すると、きちんとお返事します。",
    "「{}」、受け取りました。今はLLMにつながっていないので、決まった言葉しか返せません。",
)
_EN_TEMPLATES = (
    'You said: "{}". I am the offline practice responder, not a real language model. Connect an LLM to really talk.',
    'I heard: "{}". This is a canned offline reply, not a language model. Configure an LLM and I will really answer.',
    '"{}", got it. I am not connected to a language model right now, so this is all I can say.',
)


def last_user_text(body: dict) -> str:
    """The text of the last user message (string content or text parts), on one line."""
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return " ".join(str(content or "").split())
    return ""


def offline_text(user_text: str) -> str:
    """The whole offline answer to ``user_text``: same language, echo cut to 60 characters."""
    echo = user_text if len(user_text) <= 60 else user_text[:59] + "…"
    templates = _JA_TEMPLATES if _JAPANESE.search(user_text) else _EN_TEMPLATES
    return templates[zlib.crc32(user_text.encode("utf-8")) % len(templates)].format(echo)


def offline_reply(request_body: dict) -> Iterable[Step]:
    """The product's reply without an LLM: :func:`offline_text`, paced like a real stream."""
    user_text = last_user_text(request_body)
    text = offline_text(user_text)
    # crc32, not hash(): str hashes are salted per process and the pacing must be reproducible
    rng = random.Random(zlib.crc32(user_text.encode("utf-8")))
    if _JAPANESE.search(text):
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 3)
            pieces.append(text[i:i + n])
            i += n
    else:
        pieces = re.findall(r"\s*\S+", text)
    for index, piece in enumerate(pieces):
        yield Token(piece, rng.uniform(0.25, 0.35) if index == 0 else rng.uniform(0.02, 0.04))
