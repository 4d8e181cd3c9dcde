"""Test harness: run the real pipeline under supervisord or honcho, watch the bus, clean up.

Every run gets its own free tcp ports (or a unique ipc name) and its own temporary folder,
so two test runs on one machine never collide; every process started here is ended in
``finally``, by process group, even when the test fails.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import zmq

from broker import wire
from broker import config as config_mod
from stages.commands.launcher import PIPELINE, wait_ready
from broker.runtime import connect

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SECRET_KEY = "sk-test-DO-NOT-LOG-" + uuid.uuid4().hex


def free_base_port(count: int = len(config_mod.ENDPOINTS)) -> int:
    """A base port with ``count`` consecutive free tcp ports on 127.0.0.1."""
    for _ in range(200):
        base = random.randrange(20000, 32768 - count)  # below the ephemeral ports (see config.FIRST_PORT)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def write_config(folder: Path, *, transport: str = "tcp", **sections: dict) -> Path:
    """A config file with fresh endpoints and test-friendly timeouts, plus ``sections``."""
    values: dict[str, dict] = {
        "bus": {"transport": transport, "base_port": free_base_port(),
                "ipc_prefix": f"@mmdagent-llm-test-{uuid.uuid4().hex[:12]}-"},
        # no summaries unless a test asks: a summary request would take a test's scripted answer,
        # and be the server's last request when the test looks at its last turn's
        "llm": {"first_token_timeout": 3.0, "chunk_timeout": 5.0, "turn_timeout": 20.0, "max_retries": 2,
                "history_file": str(folder / "history.json"), "summarize": False},
        "speech": {"start_timeout": 1.5, "stop_timeout_base": 3.0},
        "transcript": {"folder": str(folder / "transcripts")},
        "subtitles": {"port": free_base_port(1)},
        "metrics": {"port": free_base_port(1)},
        "api": {"port": free_base_port(1)},
        # no listening or thinking motions unless a test asks: the exact lines stay those of speech
        "expression": {"listening": "", "thinking": ""},
    }
    for name, items in sections.items():
        values.setdefault(name, {}).update(items)
    lines = []
    for name, items in values.items():
        lines.append(f"[{name}]")
        for key, value in items.items():
            lines.append(f"{key} = {_toml(value)}")
    path = folder / "mmdagent-llm.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def pipeline_env(config_path: Path, base_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MMDAGENT_LLM_", "OPENAI_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MMDAGENT_LLM_CONFIG"] = str(config_path)
    env["PYTHONUNBUFFERED"] = "1"
    if base_url is not None:
        env["OPENAI_BASE_URL"] = base_url
        env["OPENAI_API_KEY"] = SECRET_KEY
    return env


def _end_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their manager
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(5)


@contextmanager
def supervised(folder: Path, env: dict[str, str], runner: str) -> Iterator[Path]:
    """Run the pipeline under ``supervisord`` (deploy/supervisord.conf) or ``honcho`` (Procfile).

    The real files are copied into ``folder``. supervisord's logs, socket and pid file go to
    ``~/.local/state/mmdagent-llm/supervisor`` as the file says: ``HOME`` (set in ``env``, so
    supervisorctl finds the socket too) is a short folder of this run whose
    ``.local/state/mmdagent-llm/supervisor`` leads to ``folder/<runner>`` (a socket path must
    stay under about 100 bytes). Yields the folder holding the logs.
    """
    run_dir = folder / runner
    run_dir.mkdir()
    home = None
    if runner == "supervisord":
        conf = run_dir / "supervisord.conf"
        shutil.copy(ROOT / "deploy" / "supervisord.conf", conf)
        home = Path(tempfile.mkdtemp(prefix="mmh-"))
        (home / ".local" / "state" / "mmdagent-llm").mkdir(parents=True)
        (home / ".local" / "state" / "mmdagent-llm" / "supervisor").symlink_to(run_dir)
        env["HOME"] = str(home)
        cmd = [str(BIN / "supervisord"), "-c", str(conf)]
    else:
        shutil.copy(ROOT / "Procfile", run_dir / "Procfile")
        cmd = [str(BIN / "honcho"), "-f", str(run_dir / "Procfile"), "start"]
    log = open(run_dir / "manager.log", "wb")
    proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield run_dir
    finally:
        _end_group(proc)
        log.close()
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)


def logs_text(run_dir: Path) -> str:
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(run_dir.glob("*.log")))


class BusWatcher:
    """Collects every envelope on the bus (an observer: it only subscribes), through ``ctx``
    (default: the process's ZeroMQ context; another one listens from another host, tests/netns.py)."""

    def __init__(self, cfg: config_mod.Config, topic: bytes = b"", ctx: zmq.Context | None = None) -> None:
        self.envelopes: list[wire.Envelope] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._cfg = cfg
        self._topic = topic
        self._ctx = ctx
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        sub = connect(self._cfg, zmq.SUB, "events_out", (self._topic.decode(),), self._ctx)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if sub.poll(100):
                    try:
                        env = wire.decode(sub.recv_multipart())
                    except wire.WireError:
                        continue
                    with self._cond:
                        self.envelopes.append(env)
                        self._cond.notify_all()
        finally:
            sub.close(linger=0)

    def wait_for(self, predicate: Callable[[list[wire.Envelope]], object], timeout: float) -> object:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate(self.envelopes)
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    return result
                self._cond.wait(left)

    def of(self, kind: str, turn: int | None = None) -> list[wire.Envelope]:
        with self._cond:
            return [e for e in self.envelopes if e.kind == kind and (turn is None or e.turn == turn)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def wait_pipeline(cfg: config_mod.Config, timeout: float = 30.0, ctx: zmq.Context | None = None) -> dict[str, dict]:
    return wait_ready(cfg, PIPELINE, timeout, ctx)


def wait_text(path: Path, text: str, timeout: float) -> bool:
    """Whether ``text`` appears in the file within ``timeout`` s (a log file: no event to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(encoding="utf-8", errors="replace"):
            return True
        time.sleep(0.1)
    return False


def processes_with(marker: str) -> list[int]:
    """Pids whose environment holds ``marker`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
