"""llm: turns each recognized utterance into a stream of answer tokens.

- Answers each ``turn_start`` the bridge publishes; one that *resumes* an answer (a stage was
  lost in its middle) gets the whole answer again under the new turn, and the rest as it streams.
  A ``cancel`` of the running turn closes
  its request at once (the HTTP connection is shut down, so the server sees it go) and ends
  the turn with the cancel's reason; history then keeps only the segments the user heard,
  marked interrupted, even when the answer had already been fully streamed.
- The request runs on a worker thread with the openai client (streaming or not, per
  ``[llm] stream``); tokens come back to the stage loop and go to the ``tokens`` queue, each
  stamped with its arrival time (``origin``). The turn ends with ``turn_end`` on the queue
  and ``turn_result`` on the bus.
- Failures (authentication, rate limit after the client's bounded retries with backoff,
  5xx, timeouts, refused connection, a stream cut midway, an error event in the stream)
  end the turn: one log line without secrets, naming the cause a person can act on
  (:data:`broker.wire.CAUSES`, also in ``turn_result``), the configured apology spoken if
  nothing was said yet, and history left consistent (see :mod:`stages.llm.history`). Deadlines are enforced
  here, not left to the client: ``first_token_timeout`` and ``turn_timeout``.
- Server: OpenAI, or any OpenAI-compatible server via ``OPENAI_BASE_URL``; with neither
  ``OPENAI_API_KEY`` nor ``OPENAI_BASE_URL``, the embedded offline responder
  (:mod:`stages.llm.offline_responder`), announced once in the log and in the heartbeat.
- Tools (:mod:`stages.llm.tools`, ``[tools]``): offered with each streamed request; text before
  a call is spoken as it comes, the calls run (each with a deadline; a cancel stops waiting at
  once and no follow-up request is made), and the answer goes on from a follow-up request with
  their results. Each call is a ``tool`` event on the bus. A server that refuses a request with
  tools (before any text) is asked again without them, once, and never offered them again.
- History (:mod:`stages.llm.history`): each request holds the newest exchanges within ``[llm]
  history_turns`` and ``history_tokens`` (counted the model's way, :mod:`stages.llm.tokens`); older
  ones are folded into a summary by the LLM in the background (:mod:`stages.llm.summary`), which
  never delays a turn; the long-term memory's facts (:mod:`stages.llm.memory`) ride along.
- The connection to the server is opened ahead of turns, so none pays a handshake: at start,
  after a request was cut off or failed, when the user starts speaking
  (``mmd.RECOG_EVENT_START``) and every few seconds while idle, if it is not open (decisions in
  :mod:`stages.llm.warm`; the opening runs on a thread of its own, never during a turn's request).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import openai
import zmq

from broker import wire
from broker import config as config_mod
from stages import persona
from stages.expression import Vocabulary
from stages.llm.history import History
from stages.llm.history_archive import archive_of
from stages.llm.history_store import default_path, store_for
from stages.llm.memory import Memory, path_beside
from stages.llm.failures import describe, redact
from stages.llm.llm_http import make_client, open_ahead
from stages.llm.worker import Worker
from stages.llm import summary, tools, warm
from stages.llm.tokens import TokenCounter
from stages.llm.mcp_tools import McpTools
from broker.runtime import Stage, setup_logging
from stages.states import Machine, TURN_TRANSITIONS, TurnState

log = logging.getLogger("mmdagent_llm")

def join_segments(segments: list[str]) -> str:
    """Spoken segments as one text: a space between Latin neighbours, none next to CJK."""
    out = ""
    for seg in segments:
        if out and out[-1].isascii() and seg[:1].isascii():
            out += " "
        out += seg
    return out


class LlmStage(Stage):
    name = "llm"
    topics = ("turn_start", "cancel", "speech", "spoken", "mmd.RECOG_EVENT_START")
    watches_peers = False
    output_queue = "tokens"

    def __init__(self, cfg: config_mod.Config) -> None:
        super().__init__(cfg)
        c = cfg["llm"]
        self.offline_server = None
        self.client, self.backend = self._make_client()
        store = store_for(cfg, archive=archive_of(cfg).copy_in)
        # the character (a persona file, else [llm] system_prompt), and the tags it may write
        prompt = "\n".join(p for p in (character_prompt(cfg) or c["system_prompt"], Vocabulary(cfg).prompt) if p)
        self.memory = Memory(path_beside(store.path if store is not None else default_path(cfg["bus"]["session"])))
        # the offline responder is no language model: it cannot summarize
        self.history = History(prompt, c["history_turns"], c["history_tokens"], store=store, notes=self.memory.prompt,
                               counter=TokenCounter(c["model"]),
                               summarize=c["summarize"] and self.offline_server is None)
        timeout = openai.Timeout(connect=5.0, read=c["turn_timeout"], write=10.0, pool=5.0)
        self.summaries = summary.Summaries(
            c, self.history, lambda: make_client(*self._server, c["max_retries"], timeout)[0],
            lambda data: self._to_loop("summary", data), lambda body: self.publish("summary", body), describe)
        if store is not None and self.history.pairs:  # said, so nobody wonders what the LLM "remembers"
            log.info("continuing the conversation in %s: %d earlier exchanges (mmdagent-llm history --clear "
                     "to start afresh)", store.path, len(self.history.pairs))
        elif store is not None:
            log.info("a new conversation, kept in %s", store.path)
        self.errors: dict[str, int] = {}  # failed turns by cause, since start (the heartbeat carries it)
        self.machine: Machine[TurnState] = Machine("turn", TURN_TRANSITIONS, TurnState.IDLE)
        self.warmth = warm.Warmth(self.backend) if warm.worth_keeping_warm(str(self.client.base_url)) else None
        self.opening_done = threading.Event()  # clear while a connection is being opened ahead of turns
        self.opening_done.set()
        self.worker_address = f"inproc://llm-workers-{id(self)}"
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.bind(self.worker_address)
        self.extra[self.inbox] = self._on_worker
        self.turn = 0
        self.asked_turn = 0  # the turn the current answer was first asked under (a resume names it)
        self.cancelled = 0  # highest cancelled turn: a turn_start of it or an older one is stale
        self.heard: list[str] = []  # the current turn's sentences the avatar began to say (speech started)
        self.worker: Worker | None = None
        self.user_text = ""
        self.answer: list[str] = []
        self.first_token_at = 0.0  # when the turn's first LLM token arrived (time.time()), 0 if none
        self.recorded = False  # the current turn's full answer is the last pair in history
        self.ended = "done"    # how the current turn's request ended, once it has
        self.turn_started = 0.0
        self.scripted = False  # the current turn says fixed words (no request, no history)
        names = [n for n, e in cfg["expression"]["names"].items() if e.get("motion")]
        self.tools = tools.builtin(cfg["tools"]["builtin"], names, self.memory)
        self.tools_refused = threading.Event()  # the server refused a request with tools once
        self.mcp = McpTools(cfg["tools"]["mcp"], set(self.tools), self._mcp_problem) if cfg["tools"]["mcp"] else None
        self.tool_calls: dict[tuple[str, bool], int] = {}  # (name, ok) -> calls since start
        self.summaries.ask()  # what an earlier process left unfolded (it ended in the middle of a summary)

    def tools_now(self) -> dict[str, tools.Tool]:
        """The tools to offer now: the built-in ones and those of the MCP servers that are up."""
        return {**(self.mcp.tools if self.mcp is not None else {}), **self.tools}

    def _mcp_problem(self, server: str, what: str) -> None:
        """On the MCP thread: to the loop, which reports it (once per server)."""
        self._to_loop("mcp", (server, what))

    def _to_loop(self, what: str, data: Any) -> None:
        """From a thread of its own to the stage loop (:meth:`_on_worker`)."""
        out = self.ctx.socket(zmq.PUSH)
        out.linger = 1000
        out.connect(self.worker_address)
        try:
            out.send_pyobj((0, what, data))
        finally:
            out.close()

    def _make_client(self) -> tuple[openai.OpenAI, str]:
        c = self.cfg["llm"]
        timeout = openai.Timeout(connect=5.0, read=c["chunk_timeout"], write=10.0, pool=5.0)
        key = os.environ.get("OPENAI_API_KEY")
        base = os.environ.get("OPENAI_BASE_URL")
        if not key and not base:
            from stages.llm.offline_responder import OFFLINE_NOTICE, ChatCompletionServer, offline_reply
            self.offline_server = ChatCompletionServer(offline_reply).start()
            for line in OFFLINE_NOTICE.splitlines():  # one log line per language: a log line has no newline
                log.warning("%s", line)
            key, base, backend = "offline", self.offline_server.base_url, "offline responder"
        else:
            backend = base or "OpenAI"
            log.info("answering with %s, model %s", backend, c["model"])
        client, self.connections = make_client(key or "not-needed", base or None, c["max_retries"], timeout)
        self._server = (key or "not-needed", base or None)  # for the summarizer's own client
        return client, backend

    def info(self) -> dict[str, Any]:
        return {"backend": self.backend, "offline": self.offline_server is not None,
                "model": self.cfg["llm"]["model"], "turn": self.turn, "state": self.machine.state.value,
                "errors": dict(self.errors), "history": len(self.history.pairs),
                "tools": [] if self.tools_refused.is_set() else sorted(self.tools_now()),
                "mcp": dict(self.mcp.state) if self.mcp is not None else {},
                "tool_calls": {f"{name} {'ok' if ok else 'failed'}": n for (name, ok), n in self.tool_calls.items()},
                "summary": self.summaries.info()}

    # -- turns -----------------------------------------------------------------------------
    def on_event(self, env: wire.Envelope) -> None:
        if env.kind == "mmd" and env.body.get("type") == "RECOG_EVENT_START":  # a turn will need the connection
            if self.warmth is not None:
                self.warmth.soon()
        elif env.kind == "cancel":
            self._cancel(env)
        elif env.kind == "turn_start" and env.turn > max(self.turn, self.cancelled):
            self._start(env)
        elif env.kind == "speech" and env.turn == self.turn and env.body.get("state") == "started":
            self.heard.append(str(env.body.get("text", "")))
        elif env.kind == "spoken" and env.turn == self.turn:
            self.recorded = False  # said in full: no later cancel can shorten it

    def _start(self, env: wire.Envelope) -> None:
        if isinstance(env.body.get("say"), str):
            self._say(env.turn, env.body["say"])
            return
        if type(env.body.get("resume")) is int:
            self._resume(env, env.body["resume"], [str(h) for h in env.body.get("heard") or []])
            return
        text = str(env.body.get("text", "")).strip()
        self._begin(env.turn, text)
        log.info("turn %d: %d characters from the user", self.turn, len(text))
        self.worker = Worker(self, self.turn, self.history.request(text))
        self.worker.start()

    def _say(self, turn: int, text: str) -> None:
        """A turn the avatar opens with fixed words (the persona's greeting): streamed as its
        answer, no request, not kept in history (the prompt tells the model it greeted)."""
        self._begin(turn, "")
        self.scripted = True
        log.info("turn %d: saying %d characters of the character's own", turn, len(text))
        self.machine.move(TurnState.STREAMING, "scripted")
        self.first_token_at = time.time()
        self.answer.append(text)
        self._push_token(text, self.first_token_at)
        self._end_turn("done", "")

    def _begin(self, turn: int, text: str) -> None:
        if self.machine != TurnState.IDLE:  # the bridge cancels first; this is only a safety net
            self._end_turn("superseded", "")
        self.turn = self.asked_turn = turn
        self.user_text = text
        self.answer = []
        self.heard = []
        self.first_token_at = 0.0
        self.tokens_sent = 0
        self.recorded = False
        self.scripted = False
        self.turn_started = time.monotonic()
        self.machine.move(TurnState.REQUESTING, f"turn {self.turn}")

    def _resume(self, env: wire.Envelope, of: int, heard: list[str]) -> None:
        """A stage was lost in the middle of turn ``of``: its answer goes on under ``env.turn``. Sent
        again from its start (the segmenter skips what was ``heard`` already), then the
        rest as it streams; history records it once, as one answer. A restarted llm holds no
        answer to go on with: it asks the server for the rest (``[llm] prefill``), or keeps what
        was heard in history and reports the turn broken (the bridge ends it with the notice)."""
        if of != self.asked_turn or not (self.answer or self.machine != TurnState.IDLE):
            if self.cfg["llm"]["prefill"] and heard:
                self._continue(env, of, join_segments(heard))
                return
            log.warning("turn %d: asked to go on with turn %d, which this process does not hold", env.turn, of)
            self.turn = env.turn
            if heard:  # what the user heard of it is all the conversation has
                self.history.add(str(env.body.get("text", "")).strip(), join_segments(heard), interrupted=True)
            self.publish("broken", {"stage": self.name, "reason": f"turn {of} is not held here"}, turn=env.turn)
            return
        log.info("turn %d goes on as turn %d: %d characters again, %d segments heard", of, env.turn,
                 len("".join(self.answer)), len(heard))
        self.turn, self.tokens_sent = env.turn, 0
        self.push("token", {"text": "".join(self.answer), "index": 0, "heard": heard}, turn=self.turn,
                  origin=env.origin)
        self.tokens_sent = 1
        if self.machine == TurnState.IDLE:  # the whole answer had come: it ends here too
            self.push("turn_end", {"reason": self.ended, "segments": 0, "tokens": self.tokens_sent}, turn=self.turn)
            self.publish("turn_result", {"reason": self.ended, "answer": "".join(self.answer), "error": "",
                                         "cause": "", "first_token": self.first_token_at}, turn=self.turn)

    def _continue(self, env: wire.Envelope, of: int, heard: str) -> None:
        """This process was restarted in the middle of the answer: ask for its rest, with what the
        user heard as the assistant's beginning (``[llm] prefill``: a server that continues it)."""
        self._begin(env.turn, str(env.body.get("text", "")).strip())
        self.asked_turn = of  # still the answer to that question, should it be resumed again
        self.answer, self.heard = [heard], []
        log.info("turn %d: asking for the rest of an answer after %d heard characters", self.turn, len(heard))
        messages = [*self.history.request(self.user_text), {"role": "assistant", "content": heard}]
        self.worker = Worker(self, self.turn, messages)
        self.worker.start()

    def _cancel(self, env: wire.Envelope) -> None:
        """The user cut the turn off: stop the request, keep in history only what was spoken.
        A cancel of a later turn covers ours too (a new bridge cancels every turn before its own:
        ``gone``); then what was spoken is what the sequencer reported started."""
        self.cancelled = max(self.cancelled, env.turn)
        if env.turn < self.turn:
            return
        reason = str(env.body.get("reason", "interrupted"))
        if reason == "lost":  # the answer goes on under a new turn (turn_start's resume): keep it going
            return
        said = [str(s) for s in env.body.get("spoken", [])] if env.turn == self.turn else self.heard
        spoken = join_segments(said)
        if self.machine != TurnState.IDLE:
            self._end_turn(reason, "", spoken=spoken)
        elif self.recorded and self.history.revise_last(self.user_text, spoken):
            self.recorded = False
            log.info("turn %d %s while speaking: history keeps %d spoken characters", self.turn, reason, len(spoken))

    def _on_worker(self) -> None:
        while self.inbox.poll(0):
            turn, what, data = self.inbox.recv_pyobj()
            if what == "warm":
                self._warmed(data)
                continue
            if what == "summary":
                self.summaries.took(*data)
                continue
            if what == "mcp":
                server, problem = data
                log.error("MCP server %s %s: its tools are left out", server, problem)
                self.publish("notice", {"level": "error", "text": f"MCP server {server} {problem}"[:300]})
                continue
            if self.worker is None or turn != self.worker.turn or self.machine == TurnState.IDLE:
                continue  # a superseded or timed-out request still finishing
            if what == "tool":
                self.tool_calls[(data["name"], data["ok"])] = self.tool_calls.get((data["name"], data["ok"]), 0) + 1
                log.info("turn %d: tool %s %s in %.2f s", turn, data["name"], "answered" if data["ok"] else
                         f"failed ({data['result'][:80]})", data["seconds"])
                self.publish("tool", {**data, "result": data["result"][:wire.TOOL_RESULT_MAX]}, turn=turn)
                continue
            if what == "timer":  # the bridge starts it and says the reminder when it ends
                self.publish("timer", data, turn=turn)
                continue
            if what == "token":
                text, arrived = data
                if self.machine == TurnState.REQUESTING:
                    self.machine.move(TurnState.STREAMING, "first token")
                    self.first_token_at = arrived
                self.answer.append(text)
                self._push_token(text, arrived)
            elif what == "done":
                if data is not None:  # the server's count of the request's tokens
                    self.history.counter.calibrate(*data)
                self._end_turn("done", "")
            else:
                error, cause = data
                if cause in ("unreachable", "openai_unreachable") and self.answer:  # it was reached: the stream broke
                    cause = "connection_lost"
                self._end_turn("error", error, cause=cause)

    def _push_token(self, text: str, arrived: float) -> None:
        self.push("token", {"text": text, "index": self.tokens_sent}, turn=self.turn, origin=arrived)
        self.tokens_sent += 1

    def _turn_deadline(self) -> float | None:
        if self.machine == TurnState.IDLE:
            return None
        c = self.cfg["llm"]
        end = self.turn_started + c["turn_timeout"]
        if self.machine == TurnState.REQUESTING:
            end = min(end, self.turn_started + c["first_token_timeout"])
        return end

    def next_deadline(self) -> float | None:
        retry = self.summaries.retry_at()  # a summary that failed is asked again then, turns or not
        if self.machine != TurnState.IDLE:
            ahead = self._turn_deadline()
        else:
            ahead = self.warmth.next_deadline() if self.warmth is not None else None
        return min((t for t in (ahead, retry) if t is not None), default=None)

    def on_tick(self, now: float) -> None:
        if (retry := self.summaries.retry_at()) is not None and now >= retry:
            self.summaries.ask()
        deadline = self._turn_deadline()
        if deadline is not None and now >= deadline:
            which = "first_token_timeout" if self.machine == TurnState.REQUESTING else "turn_timeout"
            self._end_turn("error", f"no answer within [llm] {which} = {self.cfg['llm'][which]} s", cause="timeout")
        if self.warmth is not None and self.warmth.due(now, busy=self.machine != TurnState.IDLE):
            if self.warmth.looked(now, self.connections.warm()):
                self.opening_done.clear()
                threading.Thread(target=self._open_ahead, name="open-ahead", daemon=True).start()

    # -- the connection, ahead of turns -------------------------------------------------------
    def _open_ahead(self) -> None:
        """On a thread of its own: open a connection to the server; the outcome goes to the loop."""
        error = None
        try:
            open_ahead(self.client, warm.OPEN_TIMEOUT)
        except Exception as exc:  # the underlying cause (refused, a certificate) says more than "Connection error."
            error = describe(exc) + (f" ({redact(str(exc.__cause__))})" if exc.__cause__ else "")
        finally:
            self.opening_done.set()  # a turn waiting for it goes on, whatever happened
        self._to_loop("warm", error)

    def _warmed(self, error: str | None) -> None:
        """An opening ended (``error`` None: it answered); a connection the server closed at once
        after answering (``Connection: close``) counts as failed, so it is not asked again and again."""
        assert self.warmth is not None
        if error is None and self.machine == TurnState.IDLE and not self.connections.warm():
            error = "the server closed the connection after answering"
        line = self.warmth.opened(time.monotonic(), error)
        if line is not None:
            log.log(*line)

    def _end_turn(self, reason: str, error: str, spoken: str | None = None, cause: str = "") -> None:
        """End the running request. ``spoken``: the turn was cancelled after the user heard this;
        ``cause``: for an error, its :data:`broker.wire.CAUSES` key."""
        if self.worker is not None:
            if reason != "done":  # a finished request keeps its connection for the next turn
                self.worker.cancel()
            self.worker = None
        if self.warmth is not None:
            if reason == "done":
                self.warmth.used(time.monotonic())
            else:  # cut off (or failed): open another before the next turn needs it
                self.warmth.soon(warm.FAILED if reason == "error" else warm.CUT)
        answer = "".join(self.answer)
        if reason == "error":
            log.error("turn %d failed (%s: %s): %s", self.turn, cause, wire.CAUSES.get(cause, ""), error)
            self.errors[cause] = self.errors.get(cause, 0) + 1
            if not answer and self.cfg["llm"]["apology"]:
                self._push_token(self.cfg["llm"]["apology"], time.time())
        if self.scripted:
            pass  # words of the character's own: no exchange to remember
        elif spoken is not None:
            self.history.add(self.user_text, spoken, interrupted=True)
        elif answer:
            self.history.add(self.user_text, answer, interrupted=reason != "done")
            self.recorded = True
        if spoken is None:  # a cancelled turn's items are dropped downstream anyway
            self.push("turn_end", {"reason": reason, "segments": 0, "tokens": self.tokens_sent}, turn=self.turn)
        self.publish("turn_result", {"reason": reason, "answer": answer, "error": error, "cause": cause,
                                     "first_token": self.first_token_at}, turn=self.turn)
        self.ended = reason
        log.info("turn %d %s after %.2f s, %d characters", self.turn, reason,
                 time.monotonic() - self.turn_started, len(answer))
        self.machine.move(TurnState.IDLE, reason)
        self.summaries.ask()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
        if self.mcp is not None:
            self.mcp.close()
        self.inbox.close(linger=0)
        if self.offline_server is not None:
            self.offline_server.stop()


def character_prompt(cfg: config_mod.Config) -> str:
    """The system prompt of the ``[persona] file``'s character; "" when there is none or it
    cannot be used (said in the log: then ``[llm] system_prompt`` stands)."""
    path = persona.find(cfg["persona"]["file"])
    if path is None:
        return ""
    try:
        character = persona.load(path)
    except persona.PersonaError as exc:
        log.error("%s: [llm] system_prompt is used instead", exc)
        return ""
    log.info("the character is %s's (%s)", character.name or "unnamed", path)
    return persona.prompt(character)


def main(cfg: config_mod.Config) -> int:
    setup_logging("llm")
    return LlmStage(cfg).run()
