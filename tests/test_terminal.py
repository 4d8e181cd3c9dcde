"""The console, the avatar command and a bridge run by hand, in a pseudo-terminal as a person uses
them: the prompt comes back, an interruption is shown, an empty line does not quit, a long line
is cut with a note, Ctrl-C ends everything cleanly at any moment."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from stages.commands.avatar import MAX_UTTERANCE_BYTES
from tests.harness import BIN, pipeline_env, processes_with, write_config
from tests.pty_term import PtyProcess


def gone_within(marker: str, seconds: float, but: int = 0) -> bool:
    """Whether every process whose environment holds ``marker`` (but pid ``but``) is gone within ``seconds``."""
    deadline = time.monotonic() + seconds
    while [pid for pid in processes_with(marker) if pid != but]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_console_in_a_terminal(tmp_path: Path):
    cfg_path = write_config(tmp_path)
    term = PtyProcess([str(BIN / "mmdagent-llm"), "console"], str(tmp_path), pipeline_env(cfg_path, None))
    try:
        at = term.expect("you> ", 40)
        term.send("こんにちは、元気ですか？\r")
        at = term.expect("avatar> ", 20, at)
        # after the answer's last sentence the prompt is back, below it
        deadline = time.monotonic() + 30
        while True:
            last = term.text.rfind("avatar> ")
            if term.text.find("you> ", last) > last:
                try:
                    term.expect("avatar> ", 2.5, last + 1)  # another sentence may still come
                    continue
                except AssertionError:
                    break
            assert time.monotonic() < deadline, term.text[-2000:]
            term._pump(0.2)
        at = len(term.text)
        term.send("\r")                                    # an empty line: nothing happens
        at = term.expect("you> ", 10, at)
        assert term.proc.poll() is None
        term.send("x" * 3000 + "\r")                       # too long for one MMDAgent-EX message
        at = term.expect(f"your line was cut to its first {MAX_UTTERANCE_BYTES} of 3000 characters", 15, at)
        at = term.expect("avatar> ", 20, at)
        term.send("割り込みます\r")                           # said while the avatar speaks
        at = term.expect("(avatar interrupted)", 15, at)
        term.expect("avatar> ", 20, at)
        term.send("/quit\r")
        assert term.wait(30) == 0
    finally:
        term.close()
    assert "Traceback" not in term.text
    assert gone_within(str(cfg_path), 5), "a stage outlived the console"


def test_ctrl_c_during_start_up_and_at_the_prompt(tmp_path: Path):
    cfg_path = write_config(tmp_path)
    env = pipeline_env(cfg_path, None)

    def ctrl_c_once(seen: str, within: float) -> tuple[int, str]:
        """The console, interrupted once ``seen`` is on screen: its exit status and screen."""
        term = PtyProcess([str(BIN / "mmdagent-llm"), "console"], str(tmp_path), env)
        try:
            term.expect(seen, within)
            term.send("\x03")
            return term.wait(30), term.text
        finally:
            term.close()

    code, text = ctrl_c_once("starting the pipeline", 20)
    assert code == 130 and "interrupted" in text and "Traceback" not in text, text[-2000:]
    assert gone_within(str(cfg_path), 5)
    code, text = ctrl_c_once("you> ", 40)
    assert code in (0, 130) and "Traceback" not in text, text[-2000:]
    assert gone_within(str(cfg_path), 5)


def test_what_the_console_started_ends_when_it_is_killed(tmp_path: Path):
    """Killed outright (no cleanup of its own): its stages, its bridge and its start-up check
    see its pid gone and stop. Run from a shell, which stays: the terminal's session does not
    end, so no SIGHUP ends them instead."""
    cfg_path = write_config(tmp_path)
    term = PtyProcess(["sh", "-c", f'"{BIN / "mmdagent-llm"}" console; echo "console ended"; read line'],
                      str(tmp_path), pipeline_env(cfg_path, None))
    try:
        term.expect("you> ", 40)
        ours = [p for p in processes_with(str(cfg_path)) if p != term.proc.pid]
        console = [p for p in ours if Path(f"/proc/{p}/stat").read_text().split(")")[1].split()[1]
                   == str(term.proc.pid)]
        assert len(console) == 1 and len(ours) >= 6, ours   # the console, broker, llm, segmenter, sequencer, bridge
        os.kill(console[0], signal.SIGKILL)
        term.expect("console ended", 10)
        assert gone_within(str(cfg_path), 5, but=term.proc.pid), "a process outlived the killed console"
    finally:
        term.close()


# A Ctrl-C taken while the main thread cannot act on it: by another thread, or in the moment
# between readline's prompt and its wait for a key (there the signal's handler only notes it,
# and nothing wakes the wait). Here, deterministically, by another thread once readline is
# about to wait (its pre-input hook); the ``except`` says a second Ctrl-C does not cut it short.
_CTRL_C_ELSEWHERE = """
import os, readline, signal, threading, time
from stages.commands import ctrl_c
ctrl_c.install()
waiting = threading.Event()
readline.set_pre_input_hook(waiting.set)
def elsewhere():
    waiting.wait()
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
threading.Thread(target=elsewhere, daemon=True).start()
try:
    input("you> ")
except KeyboardInterrupt:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.3)
    print("interrupted, cleaned up", flush=True)
"""


def test_ctrl_c_reaches_a_main_thread_waiting_at_the_prompt(tmp_path: Path):
    term = PtyProcess([sys.executable, "-c", _CTRL_C_ELSEWHERE], str(tmp_path), dict(os.environ))
    try:
        term.expect("you> ", 20)
        term.expect("interrupted, cleaned up", 5)   # without ctrl_c.install(): it waits for a key
        assert term.wait(5) == 0
    finally:
        term.close()
    assert "Traceback" not in term.text


def test_a_bridge_run_by_hand_stops_cleanly_on_ctrl_c(tmp_path: Path):
    cfg_path = write_config(tmp_path)
    term = PtyProcess([str(BIN / "mmdagent-llm"), "bridge"], str(tmp_path), pipeline_env(cfg_path, None))
    try:
        term.expect("mmdagent-llm[bridge] INFO started", 20)
        term.send("\x03")
        code = term.wait(20)
    finally:
        term.close()
    assert code == 0, term.text[-2000:]
    assert "Fatal Python error" not in term.text and "Traceback" not in term.text


def test_the_avatar_command_attaches_to_a_running_pipeline(tmp_path: Path):
    from broker import config as config_mod
    from stages.commands.launcher import Pipeline
    from tests.harness import wait_pipeline

    cfg_path = write_config(tmp_path)
    env = pipeline_env(cfg_path, None)
    with open(tmp_path / "pipeline.log", "wb") as log, Pipeline(env=env, stderr=log):
        wait_pipeline(config_mod.load(cfg_path))
        term = PtyProcess([sys.executable, "-m", "stages.commands.cli", "avatar"], str(tmp_path), env)
        try:
            at = term.expect("you> ", 30)
            term.send("こんにちは\r")
            at = term.expect("| RECOG_EVENT_STOP|こんにちは", 10, at)   # as the plugin receives it
            at = term.expect("| SYNTH_START|0|mei_voice_normal|", 20, at)  # the plugin's line, echoed
            at = term.expect("| SYNTH_EVENT_START|0", 10, at)
            at = term.expect("avatar> ", 10, at)
            term.send("/stop\r")
            at = term.expect("| RECOG_EVENT_START", 10, at)
            at = term.expect("| SYNTH_STOP|0", 10, at)                      # the interruption
            term.send("/send TIMER_START|t|0.2\r")
            at = term.expect("| TIMER_EVENT_STOP|t", 10, at)
            term.send("/quit\r")
            assert term.wait(20) == 0
        finally:
            term.close()
    assert "Traceback" not in term.text
    assert not [p for p in processes_with(str(cfg_path)) if p != os.getpid()]
