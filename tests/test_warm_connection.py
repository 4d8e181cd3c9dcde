"""No turn pays a TCP or TLS handshake on the user's time (issue 17): the llm stage keeps its
connection to the LLM server open ahead of turns. End to end: the real stage processes, the
real openai client against the local streaming server speaking TLS with a certificate of a
test CA (``SSL_CERT_FILE``, which httpx honours), counting TCP connections and TLS handshakes
and naming the connection each request came on; the fake MMDAgent-EX."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import trustme

from stages.llm import warm
from stages.llm.offline_responder import ChatCompletionServer, ConnectionRecord, Stall, Token
from tests.e2e import ScriptedLLM, World, launched, tokens_of, words
from tests.harness import SECRET_KEY

WAIT = 15.0
QUICK = 1.0  # an opening on loopback takes milliseconds; well under warm.CHECK_EVERY


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


def tls_server(ca: tuple[trustme.CA, Path], **kwargs) -> ChatCompletionServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca[0].issue_cert("127.0.0.1").configure_cert(context)
    return ChatCompletionServer(ScriptedLLM(default="はい。"), ssl_context=context, **kwargs).start()


@contextmanager
def tls_world(tmp: Path, ca: tuple[trustme.CA, Path], **server_kwargs) -> Iterator[World]:
    server = tls_server(ca, **server_kwargs)
    try:
        with launched(tmp, server=server, extra_env={"SSL_CERT_FILE": str(ca[1])}) as world:
            yield world
    finally:
        server.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory, ca) -> Iterator[World]:
    with tls_world(tmp_path_factory.mktemp("warm"), ca) as w:
        yield w


def chats(server: ChatCompletionServer, since: int = 0) -> list[ConnectionRecord]:
    return [c for c in server.connections[since:] if c.path.endswith("/chat/completions")]


def handshakes_by(server: ChatCompletionServer, moment: float) -> int:
    """TLS handshakes the server had completed at ``moment`` (time.monotonic())."""
    with server.cond:
        return sum(1 for link in server.links if link.handshaken is not None and link.handshaken <= moment)


def ask(world: World, text: str, since: int) -> ConnectionRecord:
    """The user finishes saying ``text`` (RECOG_EVENT_STOP); the request it made, once the server has it."""
    world.avatar.send(f"RECOG_EVENT_STOP|{text}")
    assert world.server.wait_for(lambda s: len(chats(s, since)) == 1 and s.requests
                                 and s.requests[-1]["messages"][-1]["content"] == text, WAIT), f"no request for {text!r}"
    return chats(world.server, since)[0]


def assert_no_handshake_of_its_own(server: ChatCompletionServer, record: ConnectionRecord, asked: float) -> None:
    """The request came on a connection whose handshake was over before the user had finished
    speaking (``asked``), and no handshake happened between then and its arrival."""
    link = server.links[record.link]
    assert link.handshaken is not None and link.handshaken < asked, (link, asked)
    assert handshakes_by(server, record.opened) == handshakes_by(server, asked)


def answered_on_it(world: World, link: int, question: str, answer: str) -> None:
    """``question`` is asked and answered on the connection ``link`` opened ahead, with no
    handshake of its own."""
    server = world.server
    world.llm.queue(tokens_of(answer))
    asked = time.monotonic()
    record = ask(world, question, len(server.connections))
    assert record.link == link
    assert_no_handshake_of_its_own(server, record, asked)
    assert server.wait_for(lambda s: record.outcome == "done", WAIT)


def test_open_before_the_first_turn_and_kept_through_ordinary_turns(world: World):
    server = world.server
    # before anyone spoke: one TCP connection, its handshake done, its one request the opening
    assert server.wait_for(lambda s: s.handshakes == 1 and s.connections and s.connections[0].closed, WAIT)
    assert len(server.links) == 1 and [(c.path, c.link) for c in server.connections] == [("/v1/models", 0)]
    assert not server.requests  # no chat request was made for it
    for i, pause in enumerate((0.0, 0.0, 5.5)):
        # the last after a silence longer than the 5 s httpx keeps an idle connection by default
        time.sleep(pause)
        world.llm.queue(tokens_of(f"はい、{i}番目です。"))
        turn = world.talk(f"質問{i}")
        assert turn.result["reason"] == "done" and turn.said == words([f"はい、{i}番目です。"])
    assert [c.link for c in chats(server)] == [0, 0, 0]
    assert server.handshakes == 1 and len(server.links) == 1
    assert all(c.outcome == "done" for c in server.connections)


def test_a_request_cut_by_a_barge_in_is_followed_by_an_opening_before_the_next_turn(world: World):
    server = world.server
    since = len(server.connections)
    world.llm.queue([Token("一文目です。"), Stall(30)])  # the stream stays open after a sentence
    world.avatar.send("RECOG_EVENT_START")
    cut = ask(world, "長く話して", since)
    assert server.wait_for(lambda s: cut.sent, WAIT)
    before = server.handshakes
    world.avatar.send("RECOG_EVENT_START")  # the user speaks again: barge-in
    assert server.wait_for(lambda s: cut.closed_by_client, WAIT), "the request was not cut"
    # while the user is still speaking, a new connection is opened (its handshake done, its opening answered)
    assert server.wait_for(lambda s: s.handshakes == before + 1 and s.connections[-1].path == "/v1/models"
                           and s.connections[-1].closed is not None, QUICK), "no connection opened after the cut"
    answered_on_it(world, server.connections[-1].link, "次の質問", "はい、次です。")


def test_a_server_closing_idle_connections_costs_no_turn_a_handshake(tmp_path: Path, ca):
    with tls_world(tmp_path, ca, idle_timeout=1.0) as world:
        server = world.server
        # opened at start, closed by the server after 1 s idle, opened again by the look every few seconds
        assert server.wait_for(lambda s: len(s.links) >= 2 and s.links[0].idle_closed
                               and s.links[1].handshaken is not None, warm.CHECK_EVERY + WAIT)
        # the user starts speaking at a moment when the server has closed every connection
        assert server.wait_for(lambda s: all(link.closed is not None for link in s.links), WAIT)
        world.avatar.send("RECOG_EVENT_START")

        def opened(s: ChatCompletionServer) -> int | None:  # an open connection whose opening was answered
            return next((c.link for c in reversed(s.connections) if c.path == "/v1/models" and c.closed
                         and s.links[c.link].closed is None), None)

        assert server.wait_for(opened, QUICK), "no connection opened when the user started speaking"
        answered_on_it(world, opened(server), "聞こえますか", "はい、聞こえます。")
        reopened_idle = sum(1 for c in server.connections if c.path == "/v1/models") - 1
        assert reopened_idle >= 2  # ... yet one line says so: not one per opening
        log = (world.run_dir / "pipeline.log").read_text(encoding="utf-8")
        assert log.count("the server closed it after") == 1, log
        assert SECRET_KEY not in log


def test_an_unreachable_server_is_logged_once_and_not_asked_in_a_loop(tmp_path: Path, ca):
    """A server whose TLS handshake always fails (it accepts and hangs up): the opening fails,
    one warning says so, openings are spaced out (3 s, then 6 s), and a turn goes as it would
    without them (the apology: the server cannot be reached)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[float] = []
    done = threading.Event()

    def hang_up() -> None:
        listener.settimeout(0.1)
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            accepted.append(time.monotonic())
            conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}/v1"
    try:
        with launched(tmp_path, base_url=url, extra_env={"SSL_CERT_FILE": str(ca[1])},
                      llm={"max_retries": 0}) as world:
            start = time.monotonic()
            log_path = world.run_dir / "pipeline.log"

            def warnings() -> int:
                return log_path.read_text(encoding="utf-8").count("cannot open a connection to")

            deadline = time.monotonic() + WAIT
            while warnings() == 0 and time.monotonic() < deadline:  # a log file has no event to wait on
                time.sleep(0.05)
            assert warnings() == 1
            # 7 s of idling: openings in a loop would be hundreds; spaced out they are at 0, 3 and 9 s
            time.sleep(max(0.0, start + 7.0 - time.monotonic()))
            assert 1 <= len(accepted) <= 3, accepted
            turn = world.talk("聞こえますか")
            assert turn.result["cause"] == "unreachable"
            assert turn.said == words(["ごめんなさい、今はうまく答えられません。"])
            assert warnings() == 1
            assert SECRET_KEY not in log_path.read_text(encoding="utf-8")
    finally:
        done.set()
        thread.join(5)
        listener.close()
