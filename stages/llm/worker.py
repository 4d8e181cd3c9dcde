"""One chat completion request, on a worker thread of the llm stage.

A :class:`Worker` runs the request with the stage's openai client (streamed or not, per ``[llm]
stream``), reports each token to the stage loop over an inproc PUSH socket, with tool calls in
the streamed answer run and answered from a follow-up request (:mod:`stages.llm.tools`), and
ends with ``done`` (and the server's ``usage``, for the token counter) or ``error`` (its line and
cause, :mod:`stages.llm.failures`). :meth:`Worker.cancel` shuts its connection down at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Protocol

import openai
import zmq

from stages.llm import tools, warm
from stages.llm.failures import cause_of, describe
from stages.llm.llm_http import Connections

log = logging.getLogger("mmdagent_llm")


class Host(Protocol):
    """What a worker uses of the llm stage that runs it."""
    cfg: Any
    client: openai.OpenAI
    connections: Connections
    ctx: zmq.Context
    opening_done: threading.Event  # set when no connection is being opened ahead of the turn
    tools_refused: threading.Event  # the server refused a request with tools once
    worker_address: str  # the stage loop's inproc PULL

    def tools_now(self) -> dict[str, tools.Tool]: ...


#: what a request's ``usage`` tells the token counter: the prompt's tokens, its messages, its tools' specs
Usage = tuple[int, list[dict], str]


def usage_of(usage: Any, kwargs: dict[str, Any]) -> Usage:
    return usage.prompt_tokens, kwargs["messages"], json.dumps(kwargs.get("tools") or "", ensure_ascii=False)


class Worker(threading.Thread):
    """Runs one chat completion request and reports to the stage loop over an inproc PUSH."""

    def __init__(self, stage: Host, turn: int, messages: list[dict]) -> None:
        super().__init__(name=f"turn-{turn}", daemon=True)
        self.stage, self.turn, self.messages = stage, turn, messages
        self.cancelled = threading.Event()
        self.said = False  # text of the answer was sent on: no asking again
        self.tools: dict[str, tools.Tool] = {}  # those offered to this request

    def cancel(self) -> None:
        """Stop now: the request's connection is shut down, so the server sees it close."""
        self.cancelled.set()
        self.stage.connections.cut(self)

    def run(self) -> None:
        out = self.stage.ctx.socket(zmq.PUSH)
        out.linger = 1000
        out.connect(self.stage.worker_address)
        cfg = self.stage.cfg["llm"]
        kwargs: dict[str, Any] = {"model": cfg["model"], "messages": self.messages, "temperature": cfg["temperature"]}
        # a connection being opened ahead is nearer than a new one: its handshake is under way
        self.stage.opening_done.wait(warm.TURN_WAITS)
        if cfg["max_tokens"] > 0:
            kwargs["max_tokens"] = cfg["max_tokens"]
        self.tools = self.stage.tools_now()
        offered = cfg["stream"] and bool(self.tools) and not self.stage.tools_refused.is_set()
        if offered:
            kwargs["tools"] = [tool.spec() for tool in self.tools.values()]
        try:
            try:
                used = self._stream(out, kwargs) if cfg["stream"] else self._whole(out, kwargs)
            except openai.BadRequestError as exc:
                if not offered or self.said:
                    raise
                # a server (or model) without tools: once, then never offered again by this process
                self.stage.tools_refused.set()
                log.warning("the server refused a request with tools (%s): asking again without them, and not "
                            "offering tools again", describe(exc))
                kwargs.pop("tools")
                used = self._stream(out, kwargs)
            out.send_pyobj((self.turn, "done", used))
        except Exception as exc:
            if not self.cancelled.is_set():
                out.send_pyobj((self.turn, "error", (describe(exc), cause_of(exc))))
        finally:
            out.close()

    def _stream(self, out: zmq.Socket, kwargs: dict[str, Any]) -> Usage | None:
        """Stream the answer; when the model calls tools, run them and stream the rest of the
        answer from a follow-up request (at most ``[tools] max_calls`` calls in all)."""
        used, calls_made = None, 0
        while True:
            text, calls = [], {}
            stream = self.stage.client.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True})
            with stream:
                for chunk in stream:
                    if self.cancelled.is_set():
                        return used
                    if chunk.usage is not None:
                        used = usage_of(chunk.usage, kwargs)
                    if not chunk.choices:
                        continue
                    delta = chunk.choices[0].delta
                    if delta.content:
                        self.said = True
                        text.append(delta.content)
                        out.send_pyobj((self.turn, "token", (delta.content, time.time())))
                    for part in delta.tool_calls or []:  # a call comes in pieces: id and name, then arguments
                        call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                        call["id"] = part.id or call["id"]
                        if part.function is not None:
                            call["name"] += part.function.name or ""
                            call["arguments"] += part.function.arguments or ""
            limit = self.stage.cfg["tools"]["max_calls"]
            if not calls or self.cancelled.is_set() or calls_made >= limit:
                if calls and calls_made >= limit:
                    log.warning("turn %d: the model asked for more than [tools] max_calls = %d tool calls: "
                                "the answer ends here", self.turn, limit)
                return used
            calls_made += len(calls)
            kwargs = {**kwargs, "messages": [*kwargs["messages"], *self._run_calls(out, "".join(text), calls)]}
            if self.cancelled.is_set():  # barge-in during the call: no follow-up request
                return used

    def _run_calls(self, out: zmq.Socket, text: str, calls: dict[int, dict[str, str]]) -> list[dict]:
        """Run the model's calls; the messages that give it their results."""
        ordered = [calls[i] for i in sorted(calls)]
        for n, call in enumerate(ordered):
            call["id"] = call["id"] or f"call_{self.turn}_{n}"
        messages: list[dict] = [{"role": "assistant", "content": text or None, "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in ordered]}]
        for call in ordered:
            tool = self.tools.get(call["name"])
            outcome = tools.call(tool, call["name"], call["arguments"], self.stage.cfg["tools"]["timeout"],
                                 self.cancelled)
            out.send_pyobj((self.turn, "tool", {"name": call["name"][:64], "ok": outcome.ok,
                                                "seconds": round(outcome.seconds, 3), "result": outcome.result}))
            content = outcome.result
            if tool is not None and tool.tag and outcome.ok:  # the gesture goes with the next sentence
                out.send_pyobj((self.turn, "token", (outcome.result, time.time())))
                content = "ok: it plays with your next sentence"
            elif tool is not None and outcome.ok and (done := tools.effect(tool, call["arguments"])) is not None:
                out.send_pyobj((self.turn, *done))
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})
        return messages

    def _whole(self, out: zmq.Socket, kwargs: dict[str, Any]) -> Usage | None:
        completion = self.stage.client.chat.completions.create(**kwargs)
        text = completion.choices[0].message.content or "" if completion.choices else ""
        if text and not self.cancelled.is_set():
            out.send_pyobj((self.turn, "token", (text, time.time())))
        return usage_of(completion.usage, kwargs) if completion.usage else None
