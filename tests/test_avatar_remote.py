"""The simulated MMDAgent-EX's Plugin_Remote follows the protocol page and Plugin_Remote.cpp.
Server mode (issue 18's first part): every client hears every message, its own lines included;
connects and disconnects are announced; ``__AV_MESSAGE,`` lines are messages and other ``__AV_*``
lines are not; speech sent over the socket is spoken; an app with no Plugin_AnyScript script at all
works. Client mode: the app dials the pipeline, retries ``retry_count`` times 0.5 s apart then gives
up for good, dials again at once when the connection is lost, announces nothing, and quits cleanly."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from stages.commands.avatar_remote import (MAX_CLIENTS, RETRY_INTERVAL, RemoteClient, RemoteDialer, RemoteServer,
                                           message_of_remote)
from stages.commands.avatar_sim import SimulatedMMDAgent

WAIT = 5.0


@pytest.fixture
def sim(tmp_path: Path):
    app = SimulatedMMDAgent(None, mdf_dir=tmp_path, seconds_per_char=0.01, min_speech=0.05, start_delay=0.01).start()
    try:
        yield app
    finally:
        app.kill()


@pytest.fixture
def app(sim: SimulatedMMDAgent):
    server = RemoteServer(sim)
    clients: list[RemoteClient] = []
    try:
        yield sim, server, clients
    finally:
        for client in clients:
            client.close()
        server.close()


def connect(server: RemoteServer, clients: list[RemoteClient]) -> RemoteClient:
    client = RemoteClient("127.0.0.1", server.port)
    clients.append(client)
    assert client.wait_line("REMOTE_EVENT_CONNECTED|127.0.0.1", WAIT), "no REMOTE_EVENT_CONNECTED for itself"
    return client


def test_every_client_hears_every_line_its_own_included(app):
    sim, server, clients = app
    a = connect(server, clients)
    b = connect(server, clients)
    assert a.wait_line("REMOTE_EVENT_CONNECTED|", WAIT, after=1)  # a hears b arrive
    a.send("RECOG_EVENT_STOP|こんにちは")
    for client in (a, b):
        assert client.wait_line("RECOG_EVENT_STOP|こんにちは", WAIT), client.received
    sim.send("CURRENT_TIME|10|30")  # the app's own messages too
    assert a.wait_line("CURRENT_TIME|10|30", WAIT) and b.wait_line("CURRENT_TIME|10|30", WAIT)


def test_speech_sent_over_the_socket_is_spoken_and_its_events_reach_everyone(app):
    sim, server, clients = app
    a, b = connect(server, clients), connect(server, clients)
    b.send("SYNTH_START|0|mei_voice_normal|はい。")
    for client in (a, b):
        start = client.wait_line("SYNTH_START|0|mei_voice_normal|はい。", WAIT)
        sound = client.wait_line("SYNTH_EVENT_START|0", WAIT)
        stop = client.wait_line("SYNTH_EVENT_STOP|0", WAIT)
        assert start and sound and stop and start.t <= sound.t <= stop.t


def test_av_message_lines_are_messages_and_other_av_lines_are_not(app):
    sim, server, clients = app
    a = connect(server, clients)
    a.send("__AV_START")
    a.send("__AV_MESSAGE,NOTIFY_SHOW|hello")
    a.send("")
    assert a.wait_line("NOTIFY_SHOW|hello", WAIT)
    assert not [r for r in a.received if r.line.startswith("__AV_") or not r.line]
    assert message_of_remote(b"__AV_ACTION,3\r") is None and message_of_remote(b"KEY|a\r") == "KEY|a"
    assert message_of_remote(b"\xffX|y") == "\ufffdX|y"


def test_a_client_that_leaves_is_announced_and_the_others_go_on(app):
    sim, server, clients = app
    a, b = connect(server, clients), connect(server, clients)
    seen = len(a.received)
    b.close()
    assert a.wait_line("REMOTE_EVENT_DISCONNECTED|127.0.0.1", WAIT, after=seen)
    a.send("KEY|x")
    assert a.wait_line("KEY|x", WAIT)
    assert server.clients == 1


def test_more_clients_than_the_limit_are_refused(app):
    sim, server, clients = app
    for _ in range(MAX_CLIENTS):
        connect(server, clients)
    extra = RemoteClient("127.0.0.1", server.port)
    clients.append(extra)
    assert extra.wait_closed(WAIT) and not extra.received  # closed at once, having heard nothing
    assert server.clients == MAX_CLIENTS and server.refused == 1


# -- client mode: the app dials the pipeline ------------------------------------------------------
DIALER_THREAD = "avatar-sim-remote-dialer"


class Pipeline:
    """The test's pipeline end: a port bound at once (connects to it are refused) that listens only
    when :meth:`listen` is called, and the connections it accepted."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.peers: list[RemoteClient] = []

    def listen(self) -> None:
        self.sock.listen()

    def accept(self) -> RemoteClient:
        peer = RemoteClient.accepted(self.sock, WAIT)
        self.peers.append(peer)
        return peer

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.sock.close()


@pytest.fixture
def dialling(sim: SimulatedMMDAgent):
    """``(sim, pipeline, dial)``: ``dial(retry_count)`` starts the app's client mode towards the pipeline."""
    pipeline = Pipeline()
    dialers: list[RemoteDialer] = []

    def dial(retry_count: int = 0) -> RemoteDialer:
        dialer = RemoteDialer(sim, "127.0.0.1", pipeline.port, retry_count)
        dialers.append(dialer)
        return dialer
    try:
        yield sim, pipeline, dial
    finally:
        for dialer in dialers:
            dialer.close()
        pipeline.close()


def dialer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == DIALER_THREAD]


def test_a_dialling_app_talks_both_ways_and_announces_no_connection(dialling):
    sim, pipeline, dial = dialling
    pipeline.listen()
    dialer = dial()
    peer = pipeline.accept()
    assert dialer.wait_connected(WAIT) and dialer.connections == 1
    peer.send("RECOG_EVENT_STOP|こんにちは")
    assert peer.wait_line("RECOG_EVENT_STOP|こんにちは", WAIT), peer.received  # queued, dispatched, sent back
    peer.send("__AV_START")
    peer.send("__AV_MESSAGE,SYNTH_START|0|mei_voice_normal|はい。")
    assert peer.wait_line("SYNTH_EVENT_STOP|0", WAIT), peer.received  # the app spoke it
    sim.send("CURRENT_TIME|10|30")
    assert peer.wait_line("CURRENT_TIME|10|30", WAIT)
    assert not [r for r in peer.received if r.line.startswith(("REMOTE_EVENT_", "__AV_"))], peer.received


@pytest.mark.parametrize("retry_count", [0, 2])
def test_nobody_listening_it_tries_retry_count_more_times_then_gives_up_for_good(dialling, retry_count):
    sim, pipeline, dial = dialling
    start = time.monotonic()
    dialer = dial(retry_count)
    assert dialer.wait_for(lambda: dialer.gave_up, WAIT + retry_count * RETRY_INTERVAL)
    assert time.monotonic() - start >= retry_count * RETRY_INTERVAL * 0.9  # the tries were spaced
    assert dialer.failed_tries == retry_count + 1 and dialer.connections == 0 and not dialer.connected
    assert dialer.join(WAIT) and not dialer_threads()  # its network thread ended: nothing is ever tried again
    sim.send("CURRENT_TIME|10|30")  # an app message with nobody to send it to is harmless


def test_it_retries_until_the_pipeline_listens(dialling):
    sim, pipeline, dial = dialling
    start = time.monotonic()
    dialer = dial(retry_count=3)
    assert dialer.wait_for(lambda: dialer.failed_tries >= 2, WAIT)
    pipeline.listen()  # during the wait before the third try
    peer = pipeline.accept()
    assert dialer.wait_connected(WAIT)
    assert time.monotonic() - start >= 2 * RETRY_INTERVAL * 0.9
    assert dialer.failed_tries == 2 and dialer.connections == 1 and not dialer.gave_up
    sim.send("CURRENT_TIME|10|30")
    assert peer.wait_line("CURRENT_TIME|10|30", WAIT)


def test_a_lost_connection_is_dialled_again_at_once_and_traffic_goes_on(dialling):
    sim, pipeline, dial = dialling
    pipeline.listen()
    dialer = dial()
    first = pipeline.accept()
    assert dialer.wait_connected(WAIT)
    lost = time.monotonic()
    first.close()
    second = pipeline.accept()
    assert time.monotonic() - lost < RETRY_INTERVAL  # at once, not after a retry's wait
    assert dialer.wait_for(lambda: dialer.connections == 2 and dialer.connected, WAIT)
    assert dialer.failed_tries == 0
    second.send("KEY|x")
    assert second.wait_line("KEY|x", WAIT)
    sim.send("CURRENT_TIME|10|30")
    assert second.wait_line("CURRENT_TIME|10|30", WAIT)


def test_a_pipeline_gone_for_good_is_retried_then_given_up(dialling):
    sim, pipeline, dial = dialling
    pipeline.listen()
    dialer = dial(retry_count=1)
    peer = pipeline.accept()
    assert dialer.wait_connected(WAIT)
    pipeline.sock.close()  # nobody listens any more: the redials are refused
    peer.close()
    assert dialer.wait_for(lambda: dialer.gave_up, WAIT + RETRY_INTERVAL)
    assert dialer.failed_tries == 2 and dialer.connections == 1 and not dialer.connected


def test_close_drops_the_connection_and_ends_its_thread(dialling):
    sim, pipeline, dial = dialling
    pipeline.listen()
    dialer = dial(retry_count=5)
    peer = pipeline.accept()
    assert dialer.wait_connected(WAIT)
    dialer.close()
    assert peer.wait_closed(WAIT)  # the app dropped it
    assert not dialer_threads() and not dialer.connected and not dialer.gave_up


def test_close_while_waiting_to_retry_returns_at_once(dialling):
    sim, pipeline, dial = dialling
    dialer = dial(retry_count=100)
    assert dialer.wait_for(lambda: dialer.failed_tries >= 1, WAIT)
    start = time.monotonic()
    dialer.close()
    assert time.monotonic() - start < RETRY_INTERVAL and not dialer_threads()
    assert not dialer.gave_up and dialer.connections == 0
