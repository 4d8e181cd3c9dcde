"""``mmdagent-llm remote``: the bridge over Plugin_Remote, end to end over loopback.

The real ``remote`` process starts the real pipeline (its keeper), the real openai client talks
to a local streaming server, and the fake MMDAgent-EX (Plugin_Remote server or client mode,
as the protocol page describes them) is the avatar. Speech timeouts are 40/60 s: a stage left
waiting on an app that went away would hold the next answer that long."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from stages.llm.offline_responder import Token
from tests.e2e import tokens_of
from tests.remote_world import App, RemoteRun

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture
def run(tmp_path: Path, own_state):
    made = RemoteRun.make(tmp_path)
    try:
        yield made
    finally:
        made.close()


def test_connect_answers_barges_in_survives_the_app_restarting_and_leaves_nothing(run: RemoteRun, tmp_path: Path):
    app = App.start(tmp_path)
    try:
        run.start("--connect", f"127.0.0.1:{app.server.port}")
        run.wait_connected()
        app.ask("こんにちは")

        # barge-in: the user speaks while the avatar does; SYNTH_STOP comes over the connection
        run.llm.queue(tokens_of("長い答えです。" * 6, delay=0.01))
        start = app.log.count()
        app.sim.send("RECOG_EVENT_STOP|長く話して")
        assert app.log.wait("SYNTH_EVENT_START|", 20, start), "the long answer did not start"
        app.sim.send("RECOG_EVENT_START")
        assert app.log.wait("SYNTH_STOP|0", 10, start), "no SYNTH_STOP after the barge-in"

        # the app quits mid-answer and comes back on the same port: the next answer is prompt
        run.llm.queue([Token("ずっと", 0.01)] + tokens_of("話しています。" * 4, delay=0.2))
        start = app.log.count()
        app.sim.send("RECOG_EVENT_STOP|話し続けて")
        assert app.log.wait("SYNTH_EVENT_START|", 20, start)
        port = app.server.port
        app.quit()
        app = App.start(tmp_path, port)
        run.wait_connected(connections=2)
        took = app.ask("もどりました")
        assert took < 10, f"the first answer after the app came back took {took:.1f} s"  # 40 s if anything waited
    finally:
        app.quit()
    left = run.stop()
    assert not left, f"processes left after the remote process was stopped: {left}"
