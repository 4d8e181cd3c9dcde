"""Shared pieces of the end-to-end tests: a scripted LLM server, the fake avatar, one turn's record.

Everything is real: stage processes under supervisord/honcho (or the launcher), the real
openai client in the llm stage against :class:`ChatCompletionServer` on a free port, and
:class:`SimulatedMMDAgent` launching ``mmdagent-llm bridge`` the way MMDAgent-EX does.
"""

from __future__ import annotations

import collections
import random
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import zmq

from broker import wire
from stages.commands.avatar_sim import SimulatedMMDAgent
from broker import config as config_mod
from stages.commands.launcher import Pipeline, wait_ready
from stages.llm import summary
from stages.llm.offline_responder import ChatCompletionServer, Stall, Status, Token
from stages.segmenter.sentences import letters
from tests.harness import BusWatcher, pipeline_env, supervised, wait_pipeline, write_config

PLUGIN_COMMAND = "mmdagent-llm bridge"


def tokens_of(text: str, seed: int = 1, delay: float = 0.005, longest: int = 4) -> list[Token]:
    """``text`` cut into random 1-``longest`` character tokens, as an LLM stream would arrive."""
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, longest)
        out.append(Token(text[i:i + n], delay))
        i += n
    return out


class ScriptedLLM:
    """Reply function for the server: plays queued scripts in order, else a default answer."""

    def __init__(self, default: str = "はい、わかりました。") -> None:
        self.default = default
        self.scripts: collections.deque[list] = collections.deque()
        self.lock = threading.Lock()

    def queue(self, *scripts: Iterable) -> None:
        with self.lock:
            self.scripts.extend(list(s) for s in scripts)

    def __call__(self, body: dict) -> Iterable:
        with self.lock:
            steps = self.scripts.popleft() if self.scripts else None
        return steps if steps is not None else tokens_of(self.default)


def is_summary(body: dict) -> bool:
    return body["messages"][0]["content"].startswith(summary.PROMPT[:40])


class Summarizing:
    """The server's replies: an answer for each turn; for a summary request, what a model asked to
    keep names would keep: the lines of the summary so far and of the exchanges that name one."""

    def __init__(self, first_token: float = 0.0) -> None:
        self.first_token = first_token  # seconds before an answer's first token
        self.stall_summaries = 0  # the next this many summary requests hang
        self.fail_summaries = 0   # the next this many summary requests are refused
        self.lock = threading.Lock()

    def __call__(self, body: dict) -> list:
        if not is_summary(body):
            n = sum(1 for m in body["messages"] if m["role"] == "user")
            return [Stall(self.first_token), *tokens_of(f"はい、そうですね。{n}つ目のお話ですね。", delay=0)]
        with self.lock:
            stall, self.stall_summaries = self.stall_summaries > 0, max(0, self.stall_summaries - 1)
            fail, self.fail_summaries = self.fail_summaries > 0, max(0, self.fail_summaries - 1)
        if stall:
            return [Stall(120)]
        if fail:
            return [Status(400, {"error": {"message": "context too long", "type": "invalid_request_error"}})]
        text = body["messages"][1]["content"]
        kept = [line.removeprefix("User: ") for line in text.splitlines() if "名前" in line]
        return [Token(" ".join(dict.fromkeys(kept)) or "雑談をした。")]


@dataclass
class Turn:
    turn: int
    lines: list[str]                  # every line the bridge printed during the turn
    result: dict                      # turn_result body
    speech: list[dict] = field(default_factory=list)

    @property
    def spoken(self) -> list[str]:
        return [line.split("|", 3)[3] for line in self.lines if line.startswith("SYNTH_START|")]

    @property
    def said(self) -> str:
        """What was said, whatever the cuts (they depend on the avatar's timing): see :func:`words`."""
        return words(self.spoken)


def words(segments: Iterable[str]) -> str:
    """The letters and digits of ``segments`` in order: the same for an answer however it was cut."""
    return letters("".join(segments))


@dataclass
class World:
    cfg: dict
    avatar: SimulatedMMDAgent
    bus: BusWatcher
    llm: ScriptedLLM | None
    server: ChatCompletionServer | None
    run_dir: Path
    pipeline: Pipeline | None = None
    env: dict[str, str] = field(default_factory=dict)  # the pipeline's environment

    def talk(self, text: str, timeout: float = 30.0) -> Turn:
        """Say ``text`` as the recognizer would; wait until the turn is fully spoken (or ended)."""
        first_line = len(self.avatar.received)
        first_env = len(self.bus.envelopes)
        self.avatar.send("RECOG_EVENT_START")
        self.avatar.send(f"RECOG_EVENT_STOP|{text}")

        def started(envs: list[wire.Envelope]) -> int:
            return next((e.turn for e in envs[first_env:] if e.kind == "turn_start" and e.body["text"] == text), 0)

        assert self.bus.wait_for(started, timeout), f"no turn started for {text!r}"

        def finished(envs: list[wire.Envelope]) -> int:
            # the turn, or the one that asked the same again after a stage was lost (see stages.bridge.turns)
            mine = {e.turn for e in envs[first_env:] if e.kind == "turn_start" and e.body["text"] == text}
            return next((e.turn for e in envs[first_env:] if e.kind == "spoken" and e.turn in mine), 0)

        turn = self.bus.wait_for(finished, timeout)
        assert turn, f"the turn for {text!r} was not spoken within {timeout} s"
        # the llm's turn_result and the sequencer's spoken come from two processes: either may be first
        assert self.bus.wait_for(lambda envs: any(e.kind == "turn_result" and e.turn == turn for e in envs), 10), \
            f"turn {turn} has no turn_result"
        results = self.bus.of("turn_result", turn)
        lines = [r.line for r in self.avatar.received[first_line:]]
        speech = [e.body for e in self.bus.of("speech", turn)]
        return Turn(turn, lines, results[0].body, speech)


def start_avatar(cfg: dict, mdf_dir: Path, env: dict[str, str], *, command: str = PLUGIN_COMMAND,
                 ctx: zmq.Context | None = None, **kwargs) -> SimulatedMMDAgent:
    """The fake MMDAgent-EX, launching the plugin ``command``; returns once the bridge is ready
    (heard through ``ctx``, default the process's ZeroMQ context)."""
    mdf_dir.mkdir(exist_ok=True)
    avatar = SimulatedMMDAgent(command, mdf_dir=mdf_dir, env=env,
                               seconds_per_char=kwargs.pop("seconds_per_char", 0.005),
                               min_speech=kwargs.pop("min_speech", 0.05), **kwargs).start()
    try:
        beats = wait_ready(cfg, ["bridge"], 20, ctx)
        if not beats["bridge"]["info"]["pipeline"]:  # it has not yet seen every stage's heartbeat
            bridge_sees_pipeline(cfg, 20, ctx)
    except BaseException:
        avatar.kill()
        raise
    return avatar


def bridge_sees_pipeline(cfg: dict, timeout: float, ctx: zmq.Context | None = None) -> None:
    """Wait for a bridge heartbeat that reports the whole pipeline reachable."""
    watcher = BusWatcher(cfg, b"heartbeat.bridge", ctx)
    try:
        assert watcher.wait_for(lambda envs: any(e.body["info"].get("pipeline") for e in envs), timeout), \
            "the bridge did not see the pipeline"
    finally:
        watcher.close()


def speech_pattern_ok(avatar: SimulatedMMDAgent) -> bool:
    """What MMDAgent-EX got is SYNTH_START, SYNTH_EVENT_START, SYNTH_EVENT_STOP, repeated: never a cut."""
    kinds = [r.line.split("|", 1)[0] for r in avatar.inbox
             if r.line.startswith(("SYNTH_START|", "SYNTH_EVENT_START|", "SYNTH_EVENT_STOP|"))]
    return len(kinds) % 3 == 0 and all(
        kinds[i:i + 3] == ["SYNTH_START", "SYNTH_EVENT_START", "SYNTH_EVENT_STOP"] for i in range(0, len(kinds), 3))


@contextmanager
def launched(tmp: Path, *, server: ChatCompletionServer | None = None, base_url: str | None = None,
             transport: str = "tcp", avatar_kwargs: dict | None = None, extra_env: dict[str, str] | None = None,
             **sections: dict) -> Iterator[World]:
    """The real stage processes started by :class:`stages.commands.launcher.Pipeline` (no manager), the fake
    avatar and a bus watcher. ``base_url`` None and no ``server``: the embedded offline default.
    ``extra_env``: added to the processes' environment (``SSL_CERT_FILE``)."""
    mdf = tmp / "content"
    mdf.mkdir()
    cfg_path = write_config(mdf, transport=transport, **sections)
    cfg = config_mod.load(cfg_path)
    env = {**pipeline_env(cfg_path, server.base_url if server else base_url), **(extra_env or {})}
    log_path = tmp / "pipeline.log"
    bus = avatar = None
    with open(log_path, "wb") as log, Pipeline(env=env, stderr=log) as pipeline:
        try:
            wait_pipeline(cfg)
            bus = BusWatcher(cfg)
            avatar = start_avatar(cfg, mdf, {k: v for k, v in env.items() if k != "MMDAGENT_LLM_CONFIG"},
                                  **(avatar_kwargs or {}))
            yield World(cfg, avatar, bus, server.reply if server else None, server, tmp, pipeline, env=env)
        finally:
            if avatar is not None:
                avatar.kill()
            if bus is not None:
                bus.close()


@contextmanager
def managed(tmp: Path, runner: str = "supervisord", *, reply=None, avatar_kwargs: dict | None = None,
            extra_env: dict[str, str] | None = None, **sections: dict) -> Iterator[World]:
    """The real pipeline under ``runner`` (supervisord with deploy/supervisord.conf, or honcho with
    the Procfile), a local streaming server answering with ``reply`` (default: a
    :class:`ScriptedLLM`), the fake MMDAgent-EX and a bus watcher; everything ended on exit.
    ``extra_env``: added to the processes' environment (``SSL_CERT_FILE``).
    The configuration sits in the .mdf folder: the bridge (cwd = that folder) finds it by itself."""
    llm = ScriptedLLM() if reply is None else None
    server = ChatCompletionServer(reply or llm).start()
    mdf = tmp / "content"
    mdf.mkdir()
    cfg_path = write_config(mdf, **sections)
    cfg = config_mod.load(cfg_path)
    env = {**pipeline_env(cfg_path, server.base_url), **(extra_env or {})}
    bus = avatar = None
    try:
        with supervised(tmp, env, runner) as run_dir:
            wait_pipeline(cfg)
            bus = BusWatcher(cfg)
            avatar = start_avatar(cfg, mdf, {k: v for k, v in env.items() if k != "MMDAGENT_LLM_CONFIG"},
                                  **(avatar_kwargs or {}))
            yield World(cfg, avatar, bus, llm, server, run_dir, env=env)
    finally:
        if avatar is not None:
            avatar.kill()
        if bus is not None:
            bus.close()
        server.stop()


class Observer:
    """``mmdagent-llm observe <name>`` (or ``input <name>``: ``command="input"``) as a real process
    of its own, on the world's bus."""

    def __init__(self, world: World, name: str, log: Path | None = None, command: str = "observe") -> None:
        self.world, self.name, self.command = world, name, command
        self.log_path = log or world.run_dir / f"{'observer' if command == 'observe' else command}-{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, ready: bool = True) -> "Observer":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "stages.commands.cli", self.command, self.name],
                                         env=self.world.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=log)
        if ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 20
        watcher = BusWatcher(self.world.cfg, f"heartbeat.{self.name}".encode())
        try:
            assert watcher.wait_for(lambda envs: any(e.body.get("ready") and e.body.get("pid") == self.proc.pid
                                                     for e in envs), max(0.0, deadline - time.monotonic())), \
                f"observer {self.name} not ready: {self.log_path.read_text(errors='replace')[-2000:]}"
        finally:
            watcher.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> "Observer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a test may have stopped it
        self.stop()
