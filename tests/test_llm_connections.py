"""The llm stage's HTTP client keeps its connections for the next turn (:mod:`stages.llm.llm_http`):
streamed answers leave theirs reusable, whether one waits open is told without a request, and
one is opened ahead with any answer of the server. In one process: the real openai client
against the local streaming server (or a raw socket where a server must misbehave)."""

from __future__ import annotations

import socket
import threading
import time

import openai
import pytest

from stages.llm.llm_http import END_WAIT, _ToTheEnd, make_client, open_ahead
from stages.llm.offline_responder import ChatCompletionServer, Stall, Token
from tests.e2e import tokens_of

WAIT = 10.0


@pytest.fixture
def server():
    srv = ChatCompletionServer(lambda body: tokens_of("はい、どうぞ。")).start()
    yield srv
    srv.stop()


def ask(client: openai.OpenAI, stream: bool = True) -> str:
    messages = [{"role": "user", "content": "やあ"}]
    if not stream:
        return client.chat.completions.create(model="m", messages=messages).choices[0].message.content
    with client.chat.completions.create(model="m", messages=messages, stream=True) as chunks:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_streamed_answers_leave_their_connection_to_the_next_request(server: ChatCompletionServer):
    client, connections = make_client("k", server.base_url, 0, openai.Timeout(10))
    assert not connections.warm()
    open_ahead(client, 5.0)
    assert connections.warm() and len(server.links) == 1
    assert [ask(client), ask(client), ask(client, stream=False), ask(client)] == ["はい、どうぞ。"] * 4
    assert [c.link for c in server.connections] == [0] * 5 and len(server.links) == 1
    assert connections.warm()


def test_warm_is_false_once_the_server_closed_it_or_a_request_was_cut():
    srv = ChatCompletionServer(lambda body: [Token("はい"), Stall(30)], idle_timeout=0.2).start()
    try:
        client, connections = make_client("k", srv.base_url, 0, openai.Timeout(10))
        open_ahead(client, 5.0)
        assert connections.warm()
        assert srv.wait_for(lambda s: s.links[0].idle_closed and s.links[0].closed, WAIT)
        assert not connections.warm()  # EOF waits on the socket
        open_ahead(client, 5.0)
        assert connections.warm() and len(srv.links) == 2
        outcome: list[str] = []

        def turn() -> None:
            try:
                outcome.append(ask(client))
            except openai.APIConnectionError:
                outcome.append("cut")

        worker = threading.Thread(target=turn)
        worker.start()
        assert srv.wait_for(lambda s: any(c.sent for c in s.connections), WAIT)
        connections.cut(worker)
        worker.join(WAIT)
        assert outcome == ["cut"] and not connections.warm()
    finally:
        srv.stop()


def test_any_answer_opens_it_and_no_answer_raises(server: ChatCompletionServer):
    client, connections = make_client("k", server.base_url.replace("/v1", "/v2"), 0, openai.Timeout(10))
    open_ahead(client, 5.0)  # 404: not an API there, and still a connection
    assert server.connections[-1].status == 404 and connections.warm()
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    client, connections = make_client("k", f"http://127.0.0.1:{port}/v1", 0, openai.Timeout(10))
    with pytest.raises(openai.APIConnectionError):
        open_ahead(client, 5.0)
    assert not connections.warm()


class _Parts:
    """A response body arriving in ``parts``; records how far it was read."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts, self.read = parts, 0

    def __iter__(self):
        for part in self.parts:
            self.read += 1
            yield part

    def close(self) -> None:
        pass


@pytest.mark.parametrize("parts", [
    [b'data: {"a": 1}\n\n', b"data: [DONE]\n\n", b""],
    [b'data: {"a": 1}\n\nda', b"ta: [DO", b"NE]\n\n", b"", b""],        # the line split across reads
    [b'data: {"a": 1}\n\ndata:[DONE]\n\n', b""],
    [b'data: {"a": 1}\r\n\r\ndata: [DONE]', b"\r\n\r\n", b""],           # CRLF; the line ends in the next read
])
def test_the_body_behind_done_is_read_before_done_is_handed_on(parts: list[bytes]):
    body = _Parts(parts)
    handed: list[tuple[bytes, int]] = []
    for part in _ToTheEnd(body):  # type: ignore[arg-type]
        handed.append((part, body.read))
    assert b"".join(p for p, _ in handed) == b"".join(parts)
    assert handed[-1][1] == len(parts)  # when the part with [DONE] came out, everything had been read
    assert all(read == i + 1 for i, (_, read) in enumerate(handed[:-1]))  # no part before it waited


@pytest.mark.parametrize("parts", [
    [b'data: {"content": "[DONE] is text here"}\n\n', b"tail"],
    [b'data: {"content": "x', b'data: [DONE]"}\n\n', b"tail"],  # an answer saying it, at the start of a read
    [b'data: {"content": "x\\ndata: [DONE]\\n"}\n\n', b"tail"],  # with line breaks, JSON-escaped
])
def test_done_said_inside_an_answer_is_not_the_end(parts: list[bytes]):
    body = _Parts(parts)
    assert [(p, body.read) for p in _ToTheEnd(body)] == [(p, i + 1) for i, p in enumerate(parts)]  # type: ignore[arg-type]


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_an_end_that_does_not_come_costs_at_most_end_wait():
    """A server that sends [DONE] and then nothing (not the chunked body's end): the answer is
    complete all the same, at most END_WAIT later, and the connection is dropped."""
    event = b'data: {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": ' \
            b'[{"index": 0, "delta": {"content": "\xe3\x81\xaf\xe3\x81\x84"}, "finish_reason": null}]}\n\n'
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
              + _chunk(event) + _chunk(b"data: [DONE]\n\n"))
    listener = socket.create_server(("127.0.0.1", 0))
    hung_up = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(WAIT)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(answer)
            hung_up.wait(WAIT)  # and then nothing, until the test is over

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client, connections = make_client("k", f"http://127.0.0.1:{listener.getsockname()[1]}/v1", 0,
                                          openai.Timeout(10))
        started = time.monotonic()
        assert ask(client) == "はい"
        assert time.monotonic() - started < END_WAIT + 0.5
        assert not connections.warm()
    finally:
        hung_up.set()
        thread.join(WAIT)
        listener.close()
