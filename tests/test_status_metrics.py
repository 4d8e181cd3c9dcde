"""``mmdagent-llm status`` and the metrics observer, against the real stage processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stages.commands.status import report
from stages.llm.offline_responder import ChatCompletionServer, Status
from stages.observers import web
from tests.e2e import Observer, ScriptedLLM, launched
from tests.test_restart import pid_of


def status(world) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.commands.cli", "status"], env=world.env,
                          capture_output=True, text=True, encoding="utf-8", timeout=30)


def row(out: str, name: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.split()[:1] == [name])


def test_status_shows_each_process_the_llm_and_the_last_turns_and_a_killed_stage_as_down(tmp_path: Path):
    llm = ScriptedLLM(default="はい。")
    server = ChatCompletionServer(llm).start()
    try:
        with launched(tmp_path, server=server) as world, Observer(world, "transcript"):
            world.talk("こんにちは")
            llm.queue([Status(401, "Incorrect API key provided")])
            world.talk("もう一度")
            world.avatar.send("\xff")  # one bad line (a lone byte that is not UTF-8 after the sim's encoding)
            healthy = status(world)
            victim = pid_of(world, "segmenter")
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            down = status(world)
            shown_after = time.monotonic() - killed_at
    finally:
        server.stop()
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    out = healthy.stdout
    for name in ("broker", "llm", "segmenter", "sequencer", "bridge", "transcript"):
        assert row(out, name)[1] == "up" and row(out, name)[3] == "yes", out
    assert row(out, "transcript")[-1] == "(observer)"
    assert f"model {world.cfg['llm']['model']}" in out
    assert "first token" in out and "speech began" in out
    assert "failed turns by cause: authentication 1" in out
    assert "tools: current_time, gesture, remember, set_timer; calls: none" in out
    assert out.rstrip().endswith("healthy")
    assert down.returncode == 1
    assert row(down.stdout, "segmenter")[1] == "DOWN"
    assert "NOT HEALTHY: segmenter is down" in down.stdout
    print(f"status showed the killed segmenter as down {shown_after:.2f} s after SIGKILL")


def test_status_of_a_session_that_is_not_running(tmp_path: Path, own_state):
    env = dict(os.environ, MMDAGENT_LLM_BUS_SESSION=f"nobody-{os.getpid()}")
    out = subprocess.run([sys.executable, "-m", "stages.commands.cli", "status"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 1 and "the session is not running" in out.stdout
    assert "broker is down" in out.stdout


def test_a_duplicate_or_unready_process_is_unhealthy():
    beats = {n: {"pid": i, "ready": True, "info": {}} for i, n in enumerate(
        ("broker", "llm", "segmenter", "sequencer", "bridge"), 1)}
    assert report(beats, "s")[1] == []
    beats["llm"]["ready"] = False
    beats["bridge"]["duplicates"] = {"sequencer": [4, 9]}
    assert report(beats, "s")[1] == ["llm is not ready", "two sequencer processes: pids [4, 9]"]


def test_status_shows_tools_mcp_servers_and_the_summary_without_calling_a_failed_server_unhealthy():
    beats = {n: {"pid": i, "ready": True, "info": {}} for i, n in enumerate(
        ("broker", "llm", "segmenter", "sequencer", "bridge"), 1)}
    beats["llm"]["info"] = {"backend": "b", "model": "m", "tools": ["current_time", "get_weather"],
                            "tool_calls": {"get_weather ok": 2},
                            "mcp": {"weather": "ok: 1 tool(s)", "crash": "failed: could not start: boom"},
                            "summary": {"exchanges": 12, "characters": 80, "ok": 2, "failed": 1}}
    lines, problems = report(beats, "s")
    assert problems == []
    assert "tools: current_time, get_weather; calls: get_weather ok 2" in lines
    assert "  MCP server crash: failed: could not start: boom" in lines and "  MCP server weather: ok: 1 tool(s)" in lines
    assert "summary: 12 older exchanges in 80 characters; summaries since start: 2 ok, 1 failed" in lines


def test_metrics_scrape_parses_and_counts(tmp_path: Path):
    llm = ScriptedLLM(default="はい。そうです。")
    server = ChatCompletionServer(llm).start()
    try:
        with launched(tmp_path, server=server) as world, Observer(world, "metrics"):
            url = subprocess.run([sys.executable, "-m", "stages.commands.cli", "observe", "metrics", "--url"],
                                 env=world.env, capture_output=True, text=True, timeout=30).stdout.strip()
            world.talk("一つ目")
            world.talk("二つ目")
            llm.queue(*[[Status(429, "Rate limit reached")]] * 3)  # the first try and both retries
            world.talk("三つ目")
            plain = url.split("?")[0]
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(plain, timeout=10)
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(plain + "?key=wrong", timeout=10)
            bearer = urllib.request.Request(plain, headers={"Authorization": f"Bearer {web.access_key(world.cfg)}"})
            deadline = time.monotonic() + 10
            while True:  # the third turn's result may still be on its way to the observer
                text = urllib.request.urlopen(bearer, timeout=10).read().decode("utf-8")
                if 'mmdagent_llm_errors_total{cause="rate_limited"} 1' in text or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            by_url = urllib.request.urlopen(url, timeout=10).read().decode("utf-8")
    finally:
        server.stop()
    assert refused.value.code == 403 and web.access_key(world.cfg) not in refused.value.read().decode("utf-8")
    assert url.startswith(f"http://127.0.0.1:{world.cfg['metrics']['port']}/metrics?key=")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(by_url.splitlines()[:3]) <= set(text.splitlines())

    def value(family: str, sample: str, **labels: str) -> float:
        return next(s.value for s in families[family].samples if s.name == sample and s.labels == labels)

    assert value("mmdagent_llm_turns", "mmdagent_llm_turns_total") == 3
    assert value("mmdagent_llm_errors", "mmdagent_llm_errors_total", cause="rate_limited") == 1
    assert value("mmdagent_llm_turn_results", "mmdagent_llm_turn_results_total", reason="done") == 2
    for name in ("first_token", "first_synth_start", "first_speech"):
        family = f"mmdagent_llm_{name}_seconds"
        assert families[family].type == "histogram"
        assert value(family, f"{family}_count") >= 2
        assert value(family, f"{family}_bucket", le="+Inf") == value(family, f"{family}_count")
    assert value("mmdagent_llm_stage_up", "mmdagent_llm_stage_up", stage="llm") == 1


def test_metrics_count_restarts_and_interruptions():
    from broker import wire
    from stages.observers.metrics import Metrics, Registry

    m = Metrics.__new__(Metrics)  # the bookkeeping only: no sockets
    m.registry = Registry()
    from stages.latency import TurnClock
    m.clock = TurnClock()
    make = wire.Sender("bridge").make
    m.on_event(make("turn_start", {"text": "x"}, turn=1, origin=100.0))
    m.on_event(make("cancel", {"reason": "interrupted"}, turn=1))
    m.on_peer("llm", "restarted")
    m.on_peer("llm", "restarted")
    llm = wire.Sender("llm").make
    for ok in (True, True, False):
        m.on_event(llm("tool", {"name": "current_time", "ok": ok, "seconds": 0.01, "result": ""}, turn=1))
        m.on_event(llm("summary", {"ok": ok, "exchanges": 3, "text": "", "error": ""}))
    families = {f.name: f for f in text_string_to_metric_families(m.registry.render())}
    samples = {(s.name, tuple(s.labels.items())): s.value for f in families.values() for s in f.samples}
    assert samples[("mmdagent_llm_interruptions_total", (("reason", "interrupted"),))] == 1
    assert samples[("mmdagent_llm_stage_restarts_total", (("stage", "llm"),))] == 2
    assert samples[("mmdagent_llm_tool_calls_total", (("tool", "current_time"),))] == 2
    assert samples[("mmdagent_llm_tool_failures_total", (("tool", "current_time"),))] == 1
    assert samples[("mmdagent_llm_summaries_total", (("outcome", "ok"),))] == 2
    assert samples[("mmdagent_llm_summaries_total", (("outcome", "failed"),))] == 1
