"""The simulated MMDAgent-EX's Plugin_Remote server mode follows the protocol page (issue 18's
first part): every client hears every message, its own lines included; connects and disconnects
are announced; ``__AV_MESSAGE,`` lines are messages and other ``__AV_*`` lines are not; speech
sent over the socket is spoken; an app with no Plugin_AnyScript script at all works."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.commands.avatar_remote import MAX_CLIENTS, RemoteClient, RemoteServer, message_of_remote
from stages.commands.avatar_sim import SimulatedMMDAgent

WAIT = 5.0


@pytest.fixture
def app(tmp_path: Path):
    sim = SimulatedMMDAgent(None, mdf_dir=tmp_path, seconds_per_char=0.01, min_speech=0.05, start_delay=0.01).start()
    server = RemoteServer(sim)
    clients: list[RemoteClient] = []
    try:
        yield sim, server, clients
    finally:
        for client in clients:
            client.close()
        server.close()
        sim.kill()


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
