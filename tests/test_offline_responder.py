"""The embedded chat completion server against the real openai client (3.x, over httpx2).

Every failure step is checked for the exception openai 3.x really raises, and hang-ups are
checked on the server side: the HTTP connection must really close, within a deadline.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable

import httpx2
import openai
import pytest
from hypothesis import given, settings, strategies as st
from openai import OpenAI

from stages.llm.offline_responder import (OFFLINE_NOTICE, ChatCompletionServer, Comment, Cut, ErrorEvent, Stall, Status,
                                      Token, last_user_text, offline_reply, offline_text)

API_KEY = "sk-test-NEVER-RECORD-" + uuid.uuid4().hex
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "こんにちは"}]
DEADLINE = 2.0  # generous bound for things that take milliseconds


class Script:
    """Reply function: plays queued step lists in order, else two quick tokens."""

    def __init__(self) -> None:
        self.queue: collections.deque[list] = collections.deque()

    def __call__(self, body: dict) -> Iterable:
        return self.queue.popleft() if self.queue else [Token("はい"), Token("。")]


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def server(script: Script):
    srv = ChatCompletionServer(script).start()
    try:
        yield srv
    finally:
        srv.stop()


def client(server: ChatCompletionServer, **kwargs) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=API_KEY, **{"max_retries": 0, **kwargs})


def stream(server: ChatCompletionServer, *, usage: bool = True, **kwargs):
    extra = {"stream_options": {"include_usage": True}} if usage else {}
    return client(server, **kwargs).chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True, **extra)


def last_closed(server: ChatCompletionServer):
    return server.connections[-1] if server.connections and server.connections[-1].closed else None


# -- normal answers ------------------------------------------------------------------------------
def test_stream_yields_tokens_in_order_then_finish_then_usage(server: ChatCompletionServer, script: Script):
    tokens = ["こん", "にちは", "！", " Nice", " day."]
    script.queue.append([Comment()] + [Token(t, 0.005) for t in tokens])
    chunks = list(stream(server))
    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert [c.choices[0].delta.content for c in middle] == tokens
    assert "".join(c.choices[0].delta.content for c in middle) == "こんにちは！ Nice day."
    assert finish.choices[0].finish_reason == "stop" and not finish.choices[0].delta.content
    assert usage.choices == []
    assert usage.usage.completion_tokens == len(tokens)
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + usage.usage.completion_tokens
    assert all(c.model == "gpt-test" and c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and first.id.startswith("chatcmpl-")
    assert server.requests[-1]["messages"] == MESSAGES and server.requests[-1]["stream"] is True
    record = server.connections[-1]
    assert record.outcome == "done" and record.status == 200 and not record.closed_by_client


def test_without_include_usage_there_is_no_usage_chunk(server: ChatCompletionServer):
    chunks = list(stream(server, usage=False))
    assert all(c.choices and c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "はい。"


def test_non_stream_answer_joins_the_tokens(server: ChatCompletionServer, script: Script):
    script.queue.append([Token("Hello"), Token(", "), Token("world", 0.01)])
    completion = client(server).chat.completions.create(model="m", messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Hello, world"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 3
    assert "stream" not in server.requests[-1]


def test_models_and_unknown_paths(server: ChatCompletionServer):
    assert [m.id for m in client(server).models.list()] == ["offline-responder"]
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="m", prompt="hi")


# -- failures: the exact openai 3.x exception -----------------------------------------------------
@pytest.mark.parametrize("code, headers, error", [
    (401, {}, openai.AuthenticationError),
    (429, {"retry-after": "0"}, openai.RateLimitError),
    (500, {}, openai.InternalServerError),
])
def test_status_raises_the_matching_error(server: ChatCompletionServer, script: Script, code, headers, error):
    body = {"error": {"message": f"failure {code}", "type": "test_error", "code": f"code_{code}"}}
    script.queue.append([Status(code, body, headers)])
    with pytest.raises(error) as info:
        stream(server)
    assert type(info.value) is error and info.value.status_code == code
    assert info.value.code == f"code_{code}" and "failure" in info.value.message
    assert server.connections[-1].outcome == "status"


def test_429_is_retried_honouring_retry_after_ms(server: ChatCompletionServer, script: Script):
    limited = [Status(429, {"error": {"message": "slow down", "type": "requests", "code": None}},
                      {"retry-after-ms": "20"})]
    script.queue.extend([limited, limited, limited])
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        stream(server, max_retries=2)
    assert len(server.requests) == 3
    assert time.monotonic() - started < 1.0  # 20 ms waits, not the 0.5 s + 1 s default backoff


def test_error_event_raises_api_error_while_iterating(server: ChatCompletionServer, script: Script):
    script.queue.append([Token("前半"), ErrorEvent("model overloaded"), Token("never")])
    got = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream(server):
            got.append(chunk.choices[0].delta.content)
    assert type(info.value) is openai.APIError  # the base class itself, not an APIStatusError
    assert info.value.message == "model overloaded" and info.value.body["type"] == "server_error"
    assert got == ["", "前半"]
    assert server.wait_for(lambda s: s.connections[-1].outcome == "error_event", DEADLINE)


@pytest.mark.parametrize("reset, cause", [(False, httpx2.RemoteProtocolError), (True, httpx2.ReadError)])
def test_cut_raises_api_connection_error_while_iterating(server: ChatCompletionServer, script: Script, reset, cause):
    script.queue.append([Token("前半", 0.01), Cut(reset=reset), Token("never")])
    got = []
    with pytest.raises(openai.APIConnectionError) as info:
        for chunk in stream(server):
            got.append(chunk.choices[0].delta.content)
    assert type(info.value) is openai.APIConnectionError and isinstance(info.value.__cause__, cause)
    assert got == ["", "前半"]
    assert server.connections[-1].outcome == "cut"


def test_cut_before_headers_is_a_connection_error(server: ChatCompletionServer, script: Script):
    script.queue.append([Cut()])
    with pytest.raises(openai.APIConnectionError) as info:
        client(server).chat.completions.create(model="m", messages=MESSAGES)
    assert isinstance(info.value.__cause__, httpx2.RemoteProtocolError)


def test_stall_midway_times_out_and_the_client_hangs_up(server: ChatCompletionServer, script: Script):
    script.queue.append([Token("前半"), Stall(10), Token("never")])
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError) as info:
        for _ in stream(server, timeout=0.5):
            pass
    assert 0.45 <= time.monotonic() - started <= 1.5
    assert isinstance(info.value.__cause__, httpx2.ReadTimeout)
    assert server.wait_for(lambda s: last_closed(s) and s.connections[-1].closed_by_client, DEADLINE)


def test_stall_before_any_output_times_out_in_create(server: ChatCompletionServer, script: Script):
    script.queue.append([Stall(10), Token("never")])
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        stream(server, timeout=0.5)  # no headers yet, so create() itself is waiting
    assert 0.45 <= time.monotonic() - started <= 1.5
    assert server.wait_for(lambda s: last_closed(s) and s.connections[-1].closed_by_client, DEADLINE)
    assert server.connections[-1].status is None


# -- the client hanging up -------------------------------------------------------------------------
def test_break_out_of_with_closes_the_connection(server: ChatCompletionServer, script: Script):
    script.queue.append([Token(f"t{i}", 0.05) for i in range(100)])
    with stream(server) as s:
        for chunk in s:
            if chunk.choices and chunk.choices[0].delta.content == "t2":
                break
    left = time.monotonic()
    assert server.wait_for(lambda s: last_closed(s) is not None, DEADLINE)
    record = server.connections[-1]
    assert record.closed_by_client and record.outcome == "client_closed"
    assert record.closed - left < 0.5  # seen at the server's next pause or write


class Reader(threading.Thread):
    """Iterates a stream on its own thread, as the llm stage's worker does."""

    def __init__(self, s) -> None:
        super().__init__(daemon=True)
        self.s, self.chunks, self.error, self.ended = s, [], None, None
        self.cond = threading.Condition()
        self.start()

    def run(self) -> None:
        try:
            for chunk in self.s:
                with self.cond:
                    self.chunks.append(chunk)
                    self.cond.notify_all()
        except Exception as exc:
            self.error = exc
        self.ended = time.monotonic()

    def wait_chunks(self, count: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.chunks) >= count, DEADLINE)

    def wait_blocked_in_recv(self) -> bool:
        """Wait until the kernel has the thread waiting on the socket (Linux only)."""
        wchan = Path(f"/proc/self/task/{self.native_id}/wchan")
        if not wchan.exists():
            pytest.skip("needs /proc/<tid>/wchan")
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if any(word in wchan.read_text() for word in ("poll", "wait_woken", "sk_wait_data")):
                return True
            time.sleep(0.002)
        return False


def test_close_from_another_thread_leaves_the_reader_blocked(server: ChatCompletionServer, script: Script):
    """openai 3.x: ``stream.close()`` from another thread returns at once, but a reader blocked in
    recv stays blocked, and the connection stays open (the blocked poll holds the socket), until
    the next bytes arrive; then it gets APIConnectionError (EBADF)."""
    script.queue.append([Token("a"), Stall(1.0), Token("b"), Token("c")])
    s = stream(server)
    reader = Reader(s)
    assert reader.wait_chunks(2) and reader.wait_blocked_in_recv()
    closed_at = time.monotonic()
    s.close()
    reader.join(0.5)
    assert reader.is_alive(), "the reader woke up on close(): openai/httpx2 behaviour changed"
    assert last_closed(server) is None  # the server still sees the connection open
    reader.join(3.0)
    assert not reader.is_alive() and reader.ended - closed_at >= 0.4  # woken by the token after the stall
    assert type(reader.error) is openai.APIConnectionError
    assert isinstance(reader.error.__cause__, httpx2.ReadError)  # [Errno 9] Bad file descriptor
    assert [c.choices[0].delta.content for c in reader.chunks] == ["", "a"]


def test_iterating_after_close_raises_at_once(server: ChatCompletionServer, script: Script):
    """close() while the reader is not in recv (here: between chunks): its next read fails at
    once with APIConnectionError, it does not just end; the server sees the hang-up promptly."""
    script.queue.append([Token("a"), Stall(5)])
    s = stream(server)
    chunks = []
    with pytest.raises(openai.APIConnectionError) as info:
        for chunk in s:
            chunks.append(chunk)
            if len(chunks) == 2:
                s.close()
                closed_at = time.monotonic()
    assert time.monotonic() - closed_at < 0.5 and len(chunks) == 2
    assert isinstance(info.value.__cause__, httpx2.ReadError)
    assert server.wait_for(lambda x: last_closed(x) and x.connections[-1].closed_by_client, DEADLINE)
    assert server.connections[-1].closed - closed_at < 0.5


def test_socket_shutdown_from_another_thread_wakes_the_reader_at_once(server: ChatCompletionServer, script: Script):
    """The remedy: shut the socket down (wakes recv, sends FIN at once), then close the stream."""
    script.queue.append([Token("a"), Stall(5), Token("b")])
    s = stream(server)
    reader = Reader(s)
    assert reader.wait_chunks(2) and reader.wait_blocked_in_recv()
    closed_at = time.monotonic()
    s.response.extensions["network_stream"].get_extra_info("socket").shutdown(socket.SHUT_RDWR)
    s.close()
    reader.join(DEADLINE)
    assert not reader.is_alive() and reader.ended - closed_at < 0.5
    assert type(reader.error) is openai.APIConnectionError
    assert server.wait_for(lambda x: last_closed(x) and x.connections[-1].closed_by_client, DEADLINE)
    assert server.connections[-1].closed - closed_at < 0.5


def test_stop_is_prompt_with_a_stalled_request_in_flight(script: Script):
    srv = ChatCompletionServer(script).start()
    script.queue.append([Token("a"), Stall(30)])
    reader = Reader(stream(srv, timeout=20))
    assert reader.wait_chunks(2)
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 1.0
    reader.join(DEADLINE)
    assert isinstance(reader.error, openai.APIConnectionError)
    assert srv.wait_for(lambda x: x.connections[-1].outcome == "stopped", DEADLINE)
    assert not srv.connections[-1].closed_by_client


def test_the_api_key_is_never_recorded(server: ChatCompletionServer, script: Script):
    script.queue.append([Status(401, {"error": {"message": "bad key", "type": "x", "code": None}})])
    with pytest.raises(openai.AuthenticationError):
        stream(server)
    list(stream(server))
    client(server).chat.completions.create(model="m", messages=MESSAGES)
    assert len(server.requests) == 3
    assert API_KEY not in repr(server.requests) + repr(server.connections)


# -- the offline reply -----------------------------------------------------------------------------
def test_offline_reply_over_the_wire_answers_japanese_in_japanese(server: ChatCompletionServer, script: Script):
    script.queue.append(list(offline_reply({"messages": MESSAGES})))
    started = time.monotonic()
    s = stream(server)
    texts, first_at = [], None
    for chunk in s:
        if chunk.choices and chunk.choices[0].delta.content:
            first_at = first_at or time.monotonic()
            texts.append(chunk.choices[0].delta.content)
    assert 0.2 <= first_at - started <= 1.0
    assert "".join(texts) == offline_text("こんにちは")
    assert "「こんにちは」" in "".join(texts) and all(1 <= len(t) <= 3 for t in texts)


def test_offline_reply_answers_english_in_english_word_by_word():
    steps = list(offline_reply({"messages": [{"role": "user", "content": "What is the weather like?"}]}))
    text = "".join(s.text for s in steps)
    assert '"What is the weather like?"' in text and "language model" in text
    assert not any("\u3040" <= ch <= "\u9fff" for ch in text)
    assert all(" " not in s.text.strip() for s in steps) and all(s.text.startswith(" ") for s in steps[1:])
    assert 0.25 <= steps[0].delay <= 0.35 and all(0.02 <= s.delay <= 0.04 for s in steps[1:])


def test_offline_reply_is_deterministic_and_echoes_at_most_60_characters():
    body = {"messages": [{"role": "user", "content": "長い質問" * 30}]}
    assert list(offline_reply(body)) == list(offline_reply(body))
    text = offline_text(last_user_text(body))
    echo = text[text.index("「") + 1:text.index("」")]
    assert len(echo) == 60 and echo.endswith("…")
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]}
    assert "Hi there" in offline_text(last_user_text(parts))


def test_offline_templates_vary():
    japanese = {offline_text(f"質問{i}").split("」", 1)[1] for i in range(30)}
    english = {offline_text(f"question {i}").rsplit('"', 1)[1] for i in range(30)}
    assert len(japanese) == 3 and len(english) == 3


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=120))
def test_offline_reply_language_follows_the_user(text: str):
    steps = list(offline_reply({"messages": [{"role": "user", "content": text}]}))
    answer = "".join(s.text for s in steps)
    assert answer == offline_text(" ".join(text.split()))
    japanese = any("\u3040" <= ch <= "\u30ff" or "\u3400" <= ch <= "\u4dbf" or "\u4e00" <= ch <= "\u9fff"
                   or "\uff66" <= ch <= "\uff9f" for ch in text)
    assert ("オフライン" in answer or "LLM" in answer) if japanese else ("language model" in answer)


def test_offline_notice_names_both_settings_in_both_languages():
    assert OFFLINE_NOTICE.startswith("mmdagent-llm: no LLM configured (OPENAI_API_KEY / OPENAI_BASE_URL unset)")
    assert "http://localhost:11434/v1" in OFFLINE_NOTICE and "言語モデルではありません" in OFFLINE_NOTICE
