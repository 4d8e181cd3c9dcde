"""``mmdagent-llm doctor`` against a real local server: it says what is wrong and how to fix it."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from stages.llm.offline_responder import ChatCompletionServer, Status
from tests.e2e import ScriptedLLM
from tests.harness import BIN, SECRET_KEY, pipeline_env, write_config


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


def test_doctor_on_the_offline_default(tmp_path: Path):
    done = doctor(tmp_path, None)
    assert done.returncode == 0 and "offline" in done.stdout.lower()
