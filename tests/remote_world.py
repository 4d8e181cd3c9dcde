"""End-to-end pieces for ``mmdagent-llm remote``: the fake MMDAgent-EX over Plugin_Remote, the
real ``remote`` process (which starts the real pipeline with its keeper), a scripted LLM server.

The app's side is :class:`stages.commands.avatar_sim.SimulatedMMDAgent` with no plugin script,
reached through :class:`stages.commands.avatar_remote.RemoteServer`; every message the app
dispatches is recorded (:class:`AppLog`), which is what a Plugin_Remote client hears too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from broker import config as config_mod
from stages.commands.avatar_remote import RemoteDialer, RemoteServer
from stages.commands.avatar_sim import SimulatedMMDAgent
from stages.commands.launcher import wait_ready
from stages.llm.offline_responder import ChatCompletionServer
from stages.llm.offline_responder import Token
from tests.e2e import ScriptedLLM, tokens_of
from tests.harness import pipeline_env, processes_with, write_config

#: speech bounds far above any wait of a test: a stage waiting on a dead app would block the turn
SLOW_TIMEOUTS = {"start_timeout": 40.0, "stop_timeout_base": 60.0}


class AppLog:
    """Every message the fake app dispatched, with its monotonic time; waitable."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()

    def __call__(self, message: str) -> None:
        with self.cond:
            self.lines.append((time.monotonic(), message))
            self.cond.notify_all()

    def wait(self, prefix: str, timeout: float, after: int = 0) -> tuple[float, str] | None:
        found: list[tuple[float, str]] = []

        def match() -> bool:
            found[:] = [x for x in self.lines[after:] if x[1].startswith(prefix)][:1]
            return bool(found)
        with self.cond:
            self.cond.wait_for(match, timeout)
        return found[0] if found else None

    def count(self) -> int:
        with self.cond:
            return len(self.lines)

    def since(self, after: int) -> list[str]:
        with self.cond:
            return [line for _, line in self.lines[after:]]


@dataclass
class App:
    """One run of the fake MMDAgent-EX with Plugin_Remote's server on ``port``."""
    sim: SimulatedMMDAgent
    server: RemoteServer | RemoteDialer
    log: AppLog

    @classmethod
    def start(cls, folder: Path, port: int = 0, dial: str = "", retry_count: int = 20, source: str = "",
              **kwargs) -> "App":
        """Plugin_Remote's server on ``port``; or, with ``dial`` (the pipeline's host), its client
        mode connecting to ``dial:port`` (``retry_count`` retries 0.5 s apart) from ``source``."""
        sim = SimulatedMMDAgent(None, mdf_dir=folder, seconds_per_char=kwargs.pop("seconds_per_char", 0.005),
                                min_speech=kwargs.pop("min_speech", 0.05), **kwargs)
        log = AppLog()
        sim.add_listener(log)
        sim.start()
        remote = RemoteDialer(sim, dial, port, retry_count, source) if dial else RemoteServer(sim, "127.0.0.1", port)
        return cls(sim, remote, log)

    def quit(self) -> None:
        self.server.close()
        self.sim.kill()

    def ask(self, text: str, answer: str = "はい、わかりました。", timeout: float = 20.0) -> float:
        """Say ``text`` and wait until ``answer`` has been handed to the synthesizer in full and
        spoken to its end; the time from the utterance to its first ``SYNTH_START``."""
        start = self.log.count()
        said_at = time.monotonic()
        self.sim.send("RECOG_EVENT_START")
        self.sim.send(f"RECOG_EVENT_STOP|{text}")
        first = self.log.wait("SYNTH_START|", timeout, start)
        assert first is not None, f"no answer to {text!r} within {timeout} s"
        def said_and_quiet() -> bool:  # every sentence written and ended: the next utterance interrupts nothing
            lines = [line for _, line in self.log.lines[start:]]
            # counted from its first sentence on: the stop event of a speech it cut off is not one of its own
            lines = lines[next(i for i, x in enumerate(lines) if x.startswith("SYNTH_START|")):]
            return "".join(self.spoken_after(start, locked=True)) == answer and \
                sum(x.startswith("SYNTH_EVENT_STOP|") for x in lines) >= sum(x.startswith("SYNTH_START|") for x in lines)
        with self.log.cond:
            done = self.log.cond.wait_for(said_and_quiet, timeout)
        assert done, f"the answer to {text!r} was {self.spoken_after(start)}, not {answer!r} (or did not end)"
        return first[0] - said_at

    def barge_in(self, llm: ScriptedLLM, text: str = "長く話して") -> None:
        """Ask ``text``, answered at length, and speak while the avatar does: ``SYNTH_STOP`` must
        come back over the connection."""
        llm.queue(tokens_of("長い答えです。" * 6, delay=0.01))
        start = self.log.count()
        self.sim.send(f"RECOG_EVENT_STOP|{text}")
        assert self.log.wait("SYNTH_EVENT_START|", 20, start), f"the long answer to {text!r} did not start"
        self.sim.send("RECOG_EVENT_START")
        assert self.log.wait("SYNTH_STOP|0", 10, start), f"no SYNTH_STOP after the barge-in ({text!r})"

    def speaking(self, llm: ScriptedLLM) -> None:
        """Ask for a slowly streamed answer and wait until the avatar speaks it (then quit mid-answer)."""
        llm.queue([Token("ずっと", 0.01)] + tokens_of("話しています。" * 4, delay=0.2))
        start = self.log.count()
        self.sim.send("RECOG_EVENT_STOP|話し続けて")
        # its own SYNTH_START first: a speech event after `start` may still be the last answer's
        # (a loaded machine), and quitting before this answer was asked would leave its script queued
        mine = self.log.wait("SYNTH_START|0|mei_voice_normal|ずっと", 20, start)
        assert mine is not None, f"the slow answer was not written: {self.log.since(start)}"
        with self.log.cond:
            at = start + [line for _, line in self.log.lines[start:]].index(mine[1])
        assert self.log.wait("SYNTH_EVENT_START|", 20, at), "the slow answer did not start"

    def spoken_after(self, start: int, locked: bool = False) -> list[str]:
        lines = [line for _, line in self.log.lines[start:]] if locked else self.log.since(start)
        return [line.split("|", 3)[3] for line in lines if line.startswith("SYNTH_START|")]


@dataclass
class RemoteRun:
    """The ``remote`` process and what it needs: a config, an LLM server, a mark on its processes."""
    tmp: Path
    cfg: config_mod.Config
    env: dict[str, str]
    llm: ScriptedLLM
    server: ChatCompletionServer
    mark: str = field(default_factory=lambda: f"mark-{uuid.uuid4().hex}")
    procs: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def make(cls, tmp: Path, reply=None, **sections: dict) -> "RemoteRun":
        """``reply``: the LLM server's answer to a request body (default: a :class:`ScriptedLLM`)."""
        llm = ScriptedLLM()
        server = ChatCompletionServer(reply or llm).start()
        folder = tmp / "pipeline"
        folder.mkdir(parents=True, exist_ok=True)
        sections.setdefault("speech", {}).update(SLOW_TIMEOUTS)
        cfg_path = write_config(folder, **sections)
        env = pipeline_env(cfg_path, server.base_url)  # the test's state folder (own_state): the same keys
        run = cls(tmp, config_mod.load(cfg_path), env, llm, server)
        env["TEST_MMDAGENT_MARK"] = run.mark
        return run

    def start(self, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"remote-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "stages.commands.cli", "remote", *args], env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def avatar_cfg(self, name: str) -> config_mod.Config:
        """The configuration avatar ``name`` of a listener runs with (its session, its ports)."""
        index = list(self.cfg["remote"]["avatars"]).index(name)
        base = self.cfg["bus"]["base_port"] or config_mod.derived_base_port(self.cfg["bus"]["session"])
        return {**self.cfg, "bus": {**self.cfg["bus"], "session": name, "base_port": base + 8 * (index + 1)}}

    def wait_log(self, text: str, timeout: float = 10.0) -> bool:
        """Whether ``text`` appears in the ``remote`` processes' logs within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while text not in self.logs():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)  # a log file has no event to wait on
        return True

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("remote-*.log")))

    def wait_connected(self, cfg: config_mod.Config | None = None, connections: int = 1, timeout: float = 30.0) -> None:
        """Until the bridge is ready, sees the whole pipeline and has made ``connections`` connections."""
        from tests.harness import BusWatcher
        cfg = cfg or self.cfg
        wait_ready(cfg, ["bridge"], timeout)
        watcher = BusWatcher(cfg, b"heartbeat.bridge")
        try:
            ok = watcher.wait_for(lambda envs: any(
                e.body["info"].get("pipeline") and e.body["info"].get("connected")
                and e.body["info"].get("connections", 0) >= connections for e in envs), timeout)
            assert ok, f"the remote bridge did not connect ({connections}) and see its pipeline:\n{self.logs()[-3000:]}"
        finally:
            watcher.close()

    def stop(self, timeout: float = 15.0) -> list[int]:
        """SIGTERM every ``remote`` process; the pids of ours still alive after ``timeout``."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + timeout
        while (left := processes_with(self.mark)) and time.monotonic() < deadline:
            time.sleep(0.1)  # /proc has no event for another process's exit
        return left

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for pid in processes_with(self.mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.server.stop()
