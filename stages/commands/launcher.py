"""Start the pipeline's stage processes as children, wait until they are ready, stop them.

For the console and for tests. In production use supervisord (``deploy/``), which also
restarts a stage that dies; honcho (``Procfile``) stops everything when one process exits.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import IO, Iterable

import zmq

from broker import wire
from broker import config as config_mod
from broker.liveness import PIPELINE
from broker.runtime import connect


def stage_command(name: str) -> list[str]:
    return [sys.executable, "-m", "stages.commands.cli", name]


def start_doctor(stderr: IO[bytes] | int | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``mmdagent-llm doctor --notice`` in the background: the start-up check of ``plugin`` and
    ``console``. Start-up does not wait for it, and the process that starts it (the plugin is
    the bridge) never imports the LLM client. It ends by itself (at most about 40 s), and at
    once when the process that started it is gone, if ``env`` names it (``MMDAGENTLLM_OWNER_PID``)."""
    return subprocess.Popen([*stage_command("doctor"), "--notice"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=stderr)


def stop_all(procs: Iterable[subprocess.Popen], timeout: float = 5.0) -> None:
    """Ask every process to stop (SIGTERM), then kill what is left after ``timeout``."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Pipeline:
    def __init__(self, env: dict[str, str] | None = None, stderr: IO[bytes] | int | None = None,
                 names: Iterable[str] = PIPELINE) -> None:
        self.env = env
        self.stderr = stderr
        self.names = tuple(names)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> "Pipeline":
        for name in self.names:
            self.procs[name] = subprocess.Popen(stage_command(name), env=self.env, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL, stderr=self.stderr)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        stop_all(self.procs.values(), timeout)

    def __enter__(self) -> "Pipeline":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_ready(cfg: config_mod.Config, stages: Iterable[str], timeout: float,
               ctx: zmq.Context | None = None) -> dict[str, dict]:
    """Wait until each stage's heartbeat says ready; return their last heartbeat bodies.

    Raises TimeoutError naming the stages that did not report. ``ctx``: the ZeroMQ context to
    listen with (default: the process's own).
    """
    want = set(stages)
    seen: dict[str, dict] = {}
    sub = connect(cfg, zmq.SUB, "events_out", ("heartbeat.",), ctx)
    deadline = time.monotonic() + timeout
    try:
        while not want <= {name for name, body in seen.items() if body.get("ready")}:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(n for n in want if not seen.get(n, {}).get("ready"))
                raise TimeoutError(f"stages not ready after {timeout} s: {', '.join(missing)}")
            if sub.poll(int(left * 1000) + 1):
                try:
                    env = wire.decode(sub.recv_multipart())
                except wire.WireError:
                    continue
                seen[env.body.get("stage", "")] = env.body
    finally:
        sub.close(linger=0)
    return seen
