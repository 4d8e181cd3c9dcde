"""``mmdagent-llm doctor`` against a real local server: it says what is wrong and how to fix it."""

from __future__ import annotations

import socket
import sys
import subprocess
import time
from pathlib import Path

import httpx2
import openai
import pytest

from broker import wire
from stages.commands.doctor import FIXES
from stages.llm.failures import cause_of, wrong_path
from stages.llm.llm_http import make_client
from stages.llm.offline_responder import ChatCompletionServer, Stall, Status
from tests.e2e import ScriptedLLM
from tests.harness import BIN, SECRET_KEY, pipeline_env, processes_with, write_config


def doctor(tmp_path: Path, base_url: str | None) -> subprocess.CompletedProcess:
    cfg_path = write_config(tmp_path, llm={"model": "qwen-test"})
    return subprocess.run([str(BIN / "mmdagent-llm"), "doctor"], env=pipeline_env(cfg_path, base_url),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script, rc, words", [
    (None, 0, ["OK:", "'qwen-test'"]),
    ([Status(401, {"error": {"message": f"Incorrect API key provided: {SECRET_KEY}", "code": "invalid_api_key"}}, {})],
     1, ["FAILED: authentication", "Check OPENAI_API_KEY"]),
    ([Status(404, {"error": {"message": "model 'qwen-test' not found", "code": "model_not_found"}}, {})],
     1, ["FAILED: model_not_found", "The server has no model 'qwen-test'", "[llm] model"]),
    ([Status(429, {"error": {"message": "quota", "code": "insufficient_quota"}}, {})],
     1, ["FAILED: rate_limited", "billing"]),
    # a web server's own 404, not the API's (a base URL without /v1): not the model's fault
    ([Status(404, "404 page not found")],
     1, ["FAILED: wrong_url", "answered 404 for /chat/completions: does the URL end in /v1?", "usually ends in /v1"]),
    ([Status(404, {"detail": "Not Found"})], 1, ["FAILED: wrong_url"]),
])
def test_doctor_names_the_cause_and_the_fix(tmp_path: Path, script, rc, words):
    llm = ScriptedLLM()
    if script is not None:
        llm.queue(script)
    server = ChatCompletionServer(llm).start()
    try:
        done = doctor(tmp_path, server.base_url)
        requests = len(server.requests)
    finally:
        server.stop()
    assert done.returncode == rc, done.stdout + done.stderr
    for word in words:
        assert word in done.stdout, done.stdout
    assert SECRET_KEY not in done.stdout + done.stderr
    assert requests == 1   # one cheap request, no retries


def test_doctor_says_when_nothing_answers(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    done = doctor(tmp_path, f"http://127.0.0.1:{port}/v1")
    assert done.returncode == 1
    assert "FAILED: unreachable" in done.stdout and f"Nothing answers at http://127.0.0.1:{port}/v1" in done.stdout
    assert "Check OPENAI_BASE_URL" in done.stdout and "OpenAI's API" not in done.stdout


def test_doctor_without_a_base_url_says_it_is_openai_that_cannot_be_reached(tmp_path: Path):
    """A key but no OPENAI_BASE_URL, and no way out (a proxy nobody listens at stands for the
    missing network): it is OpenAI's API that is unreachable, not a setting the user does not have."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    env = {k: v for k, v in pipeline_env(write_config(tmp_path), None).items() if not k.lower().endswith("_proxy")}
    env.update(OPENAI_API_KEY=SECRET_KEY, https_proxy=f"http://127.0.0.1:{port}")
    done = subprocess.run([str(BIN / "mmdagent-llm"), "doctor"], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED: openai_unreachable: no connection to OpenAI's API" in done.stdout, done.stdout
    assert "OPENAI_BASE_URL is not set" in done.stdout and "network" in done.stdout
    assert "Check OPENAI_BASE_URL" not in done.stdout and "(OPENAI_BASE_URL)" not in done.stdout
    assert SECRET_KEY not in done.stdout + done.stderr


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("script, path, cause", [
    ([Status(404, "404 page not found")], "/v1", "wrong_url"),
    ([Status(404, {"detail": "Not Found"})], "/v1", "wrong_url"),
    ([Status(404, {"error": {"message": "model 'x' not found", "code": None}})], "/v1", "model_not_found"),
    ([], "", "wrong_url"),    # the base URL without /v1: the server's unknown_url error
])
def test_a_404_is_the_models_fault_only_when_the_api_says_so(script, path, cause, stream):
    """The llm stage's own client (streaming or not) and the doctor's classify alike."""
    llm = ScriptedLLM()
    llm.queue(script)
    server = ChatCompletionServer(llm).start()
    client, _ = make_client("k", server.base_url.removesuffix("/v1") + path, 0, openai.Timeout(10))
    try:
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "ping"}], stream=stream)
    finally:
        client.close()
        server.stop()
    assert cause_of(caught.value) == cause


def test_causes_of_connection_failures_name_who_could_not_be_reached():
    to = lambda url: httpx2.Request("POST", url)  # noqa: E731
    assert cause_of(openai.APIConnectionError(request=to("https://api.openai.com/v1/chat/completions"))) \
        == "openai_unreachable"
    assert cause_of(openai.APIConnectionError(request=to("http://localhost:11434/v1/chat/completions"))) \
        == "unreachable"
    assert cause_of(openai.APITimeoutError(request=to("https://api.openai.com/v1/chat/completions"))) == "timeout"
    assert "OPENAI_BASE_URL" not in wire.CAUSES["openai_unreachable"]
    assert set(FIXES) == set(wire.CAUSES)   # every cause has its fix


@pytest.mark.parametrize("body, wrong", [
    ("404 page not found", True), ("", True), ("<html>Not Found</html>", True), ('{"detail": "Not Found"}', True),
    ("[1]", True), ('{"error": "no"}', True), ('{"error": {"code": "unknown_url", "message": "Unknown path"}}', True),
    ('{"error": {"message": "model not found", "code": "model_not_found"}}', False),
    ('{"error": {"message": "model \\"q\\" not found, try pulling it first", "type": "api_error", "code": null}}', False),
])
def test_wrong_path(body, wrong):
    assert wrong_path(body) is wrong


def test_doctor_on_the_offline_default(tmp_path: Path):
    done = doctor(tmp_path, None)
    assert done.returncode == 0 and "offline" in done.stdout.lower()


def _plugin_beside(tmp_path: Path, script: list) -> tuple:
    """A running pipeline (the launcher) whose LLM server first plays ``script`` (the start-up
    check's request), and the fake MMDAgent-EX starting ``mmdagent-llm plugin``, which joins it."""
    from broker import config as config_mod
    from stages.commands.avatar_sim import SimulatedMMDAgent
    from stages.commands.launcher import Pipeline, wait_ready
    from tests.harness import wait_pipeline

    llm = ScriptedLLM(default="はい。")
    llm.queue(script)
    server = ChatCompletionServer(llm).start()
    mdf = tmp_path / "content"
    mdf.mkdir()
    cfg_path = write_config(mdf)
    cfg = config_mod.load(cfg_path)
    env = pipeline_env(cfg_path, server.base_url)
    log = open(tmp_path / "pipeline.log", "wb")
    pipeline = Pipeline(env=env, stderr=log).start()
    wait_pipeline(cfg)
    avatar = SimulatedMMDAgent("mmdagent-llm plugin", mdf_dir=mdf, stderr=log,
                               env={k: v for k, v in env.items() if k != "MMDAGENT_LLM_CONFIG"}).start()
    wait_ready(cfg, ["bridge"], 20)

    def stop() -> None:
        avatar.kill()
        pipeline.stop()
        server.stop()
        log.close()
        for pid in processes_with(server.base_url):  # the doctor, should one be left
            subprocess.run(["kill", "-9", str(pid)], check=False)
    return avatar, server, cfg_path, stop


def test_the_plugin_checks_the_key_at_start_and_shows_what_is_wrong(tmp_path: Path):
    avatar, server, _, stop = _plugin_beside(tmp_path, [Status(401, {"error": {
        "message": f"Incorrect API key provided: {SECRET_KEY}", "code": "invalid_api_key"}}, {})])
    try:
        shown = avatar.wait_line("NOTIFY_SHOW|", 30)
        lines = [r.line for r in avatar.received]
    finally:
        stop()
    assert shown is not None and shown.line.startswith("NOTIFY_SHOW|mmdagent-llm: the API key was refused")
    assert "mmdagent-llm doctor" in shown.line and SECRET_KEY not in "".join(lines)
    assert not any(line.startswith("SYNTH_START") for line in lines)        # no turn was needed for it
    assert server.requests[0].get("max_tokens") == 1                        # the one cheap request


def test_the_start_up_check_does_not_delay_the_first_answer(tmp_path: Path):
    """The check's request hangs for 12 s; the plugin answers a turn meanwhile."""
    avatar, server, cfg_path, stop = _plugin_beside(tmp_path, [Stall(12.0)])
    try:
        # the check starts DOCTOR_DELAY after the plugin: its request comes first
        assert server.wait_for(lambda srv: srv.requests, 20)
        assert server.requests and server.requests[0].get("max_tokens") == 1, "the start-up check did not run"
        avatar.send("RECOG_EVENT_START")
        avatar.send("RECOG_EVENT_STOP|こんにちは")
        said = avatar.wait_line("SYNTH_START|", 20)
        checking = [c for c in server.connections if c.closed is None]
    finally:
        stop()
    assert said is not None and said.line.endswith("|はい。")
    assert checking, "the start-up check should still be waiting for its answer"


def _doctors(marker: str) -> list[int]:
    """Pids of ``mmdagent-llm doctor`` processes whose environment holds ``marker``."""
    found = []
    for pid in processes_with(marker):
        try:
            if b"doctor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def test_the_start_up_check_ends_when_the_plugin_is_killed(tmp_path: Path):
    """MMDAgent-EX kills the plugin outright while the check's request hangs: the check (which
    would wait up to 15 s for its answer, then up to 20 s to show it) ends with it."""
    avatar, server, _, stop = _plugin_beside(tmp_path, [Stall(30.0)])
    try:
        assert server.wait_for(lambda srv: srv.requests, 20), "the start-up check did not run"
        assert _doctors(server.base_url)
        avatar.kill()   # SIGKILL: the plugin's own cleanup never runs
        deadline = time.monotonic() + 5
        while _doctors(server.base_url) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _doctors(server.base_url)
    finally:
        stop()
    assert not left, "the start-up check outlived the plugin"


def test_doctor_starts_each_mcp_server_and_says_which_cannot_be_used(tmp_path: Path):
    here = Path(__file__).parent / "mcp_servers"
    servers = {name: {"command": sys.executable, "args": [str(here / f"{name}.py")]} for name in ("weather", "crash")}
    cfg_path = write_config(tmp_path, tools={"mcp": servers})
    done = subprocess.run([str(BIN / "mmdagent-llm"), "doctor"], env=pipeline_env(cfg_path, None),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "OK: MCP server weather: 1 tool(s)" in done.stdout and "tools from MCP servers: forecast" in done.stdout
    [failed] = [line for line in done.stdout.splitlines() if line.startswith("MCP SERVER FAILED: crash:")]
    assert "could not start" in failed and "weather" not in failed
    assert not processes_with(str(here))  # the servers it started ended with it
