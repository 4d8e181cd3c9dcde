"""``mmdagent-llm console``: the terminal stand-in for MMDAgent-EX, run as a user would."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Callable
from pathlib import Path

from stages.llm.offline_responder import OFFLINE_NOTICE, offline_text
from stages.segmenter.sentences import letters
from tests.harness import BIN, pipeline_env, processes_with, write_config


class Output:
    """The console's stdout, collected by a thread, waited on with deadlines."""

    def __init__(self, stream) -> None:
        self.text = ""
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            with self._cond:
                self.text += chunk.decode("utf-8", errors="replace")
                self._cond.notify_all()

    def wait_for(self, needle: str | Callable[[str], bool], timeout: float) -> bool:
        found = needle if callable(needle) else lambda text: needle in text
        deadline = time.monotonic() + timeout
        with self._cond:
            while not found(self.text):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


def start_console(folder: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Output]:
    """``mmdagent-llm console`` in ``folder``, once it asks for the first line."""
    proc = subprocess.Popen([str(BIN / "mmdagent-llm"), "console"], cwd=folder, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = Output(proc.stdout)
    if not out.wait_for("you> ", 40):
        proc.kill()
        proc.wait(5)
        raise AssertionError(f"the console did not start: {out.text}")
    return proc, out


def test_console_conversation_on_the_offline_default(tmp_path: Path):
    cfg_path = write_config(tmp_path)
    proc, out = start_console(tmp_path, pipeline_env(cfg_path, None))
    try:
        said = "こんにちは、調子はどう？"
        proc.stdin.write(f"{said}\n".encode())
        proc.stdin.flush()
        answer = letters(offline_text(said))  # said in segments cut by the avatar's pace: compared by letters

        def avatar_said(text: str) -> str:
            return letters("".join(line.split("avatar> ", 1)[1] for line in text.splitlines() if "avatar> " in line))
        assert out.wait_for(lambda text: avatar_said(text) == answer, 20), out.text
        proc.stdin.write(b"\n/quit\n")  # an empty line does nothing; /quit leaves
        proc.stdin.flush()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert out.text.count(OFFLINE_NOTICE.splitlines()[0]) == 1
    assert not list(tmp_path.glob("*.log"))                          # nothing in the current folder
    from broker.config import log_dir
    assert (log_dir() / "console-default.log").exists()
    left = processes_with(str(cfg_path))
    for pid in left:
        os.kill(pid, 9)
    assert not left, "the console left processes behind"


def test_console_shows_why_a_turn_failed(tmp_path: Path):
    """An LLM server that is not there: the console says so, with what to check, not just the apology."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg_path = write_config(tmp_path, llm={"max_retries": 0})
    proc, out = start_console(tmp_path, pipeline_env(cfg_path, f"http://127.0.0.1:{port}/v1"))
    try:
        proc.stdin.write("聞こえますか\n".encode())
        proc.stdin.flush()
        assert out.wait_for("(mmdagent-llm: unreachable: no connection to the LLM server (OPENAI_BASE_URL))", 30), out.text
        proc.stdin.write(b"/quit\n")
        proc.stdin.flush()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for pid in processes_with(str(cfg_path)):
            os.kill(pid, 9)


def test_console_checks_the_key_at_start(tmp_path: Path):
    """A refused key is reported right after start-up, before anything is said."""
    from stages.llm.offline_responder import ChatCompletionServer, Status
    from tests.e2e import ScriptedLLM

    llm = ScriptedLLM()
    llm.queue([Status(401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}, {})])
    server = ChatCompletionServer(llm).start()
    cfg_path = write_config(tmp_path)
    proc, out = start_console(tmp_path, pipeline_env(cfg_path, server.base_url))
    try:
        assert out.wait_for("(mmdagent-llm: the API key was refused (OPENAI_API_KEY): run `mmdagent-llm doctor`)",
                            30), out.text
        assert "avatar>" not in out.text
        proc.stdin.write(b"/quit\n")
        proc.stdin.flush()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        server.stop()
        for pid in processes_with(str(cfg_path)):
            os.kill(pid, 9)
