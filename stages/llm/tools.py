"""Tools the LLM may call during an answer (OpenAI function calling), ``[tools]`` in the configuration.

A tool is a name, a description, the JSON schema of its arguments, and a function from the
arguments to a short text result, which goes back to the model as a ``tool`` message and nowhere
else: a result is data for the model, never a line for MMDAgent-EX (what the model then says is
an answer like any other, cleaned and filtered by the bridge). The built-in ones (``[tools]
builtin``):

- ``current_time``: the local date, time and weekday.
- ``gesture``: play one gesture of the expression vocabulary (``[expression.names]`` with a
  motion): the tool puts the name's tag into the answer, so the sentence that follows carries
  it, exactly as if the model had written ``[name]``.
- ``remember``: keep a fact in the long-term memory file (:mod:`stages.llm.memory`).
- ``set_timer``: a reminder: the llm publishes a ``timer`` event, the bridge starts
  MMDAgent-EX's timer (``TIMER_START``; only the number of seconds and an alias of its own go
  out) and, at its ``TIMER_EVENT_STOP``, has the avatar say the reminder, even if nobody spoke.

:func:`effect` says what a successful call does besides its result: a tag into the answer, or
a timer.

:func:`call` runs one call with a deadline (``[tools] timeout``) on a thread of its own, and
gives up at once when the turn is cancelled (barge-in): a tool that hangs never holds a turn.
Arguments that are not JSON, an unknown tool, a failure or a timeout become an error result the
model is told (and the log, once per tool and kind).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from broker.wire import TIMER_MAX_SECONDS, TIMER_MAX_TEXT

if TYPE_CHECKING:
    from stages.llm.memory import Memory

log = logging.getLogger("mmdagent_llm")

MAX_RESULT = 4000  # characters of a result given back to the model
WEEKDAYS = ("月", "火", "水", "木", "金", "土", "日")


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any]], str]
    tag: bool = False  # its result is a tag to put into the answer (gesture)

    def spec(self) -> dict[str, Any]:
        """The tool as the request's ``tools`` list gives it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def current_time(_args: dict[str, Any]) -> str:
    now = time.localtime()
    return time.strftime(f"%Y-%m-%d %H:%M ({WEEKDAYS[now.tm_wday]}曜日, %Z)", now)


def builtin(names: list[str], gestures: list[str], memory: "Memory | None" = None) -> dict[str, Tool]:
    """The built-in tools ``names`` turns on; ``gestures``: the vocabulary's names with a motion
    (no gesture tool without any); ``memory``: where ``remember`` writes (none without it)."""
    tools = {"current_time": Tool("current_time", "The local date, time and weekday now.",
                                  {"type": "object", "properties": {}}, current_time)}
    if gestures:
        def gesture(args: dict[str, Any]) -> str:
            name = str(args.get("name", ""))
            if name not in gestures:
                raise ValueError(f"unknown gesture {name[:40]!r}; known: {', '.join(gestures)}")
            return f"[{name}]"
        tools["gesture"] = Tool("gesture", "Play a gesture with the next sentence you say.",
                                {"type": "object", "properties": {"name": {"type": "string", "enum": gestures}},
                                 "required": ["name"]}, gesture, tag=True)
    if memory is not None:
        tools["remember"] = Tool("remember", "Keep a fact about the user or the conversation for later "
                                 "conversations (a name, a preference, a promise): one short sentence.",
                                 {"type": "object", "properties": {"fact": {"type": "string"}}, "required": ["fact"]},
                                 lambda args: memory.remember(str(args.get("fact", ""))))
    tools["set_timer"] = Tool("set_timer", "Set a reminder: after the given seconds you will say the text aloud.",
                              {"type": "object", "properties": {
                                  "seconds": {"type": "integer", "minimum": 1, "maximum": TIMER_MAX_SECONDS},
                                  "text": {"type": "string", "description": "what to say then, one short sentence"}},
                               "required": ["seconds", "text"]}, set_timer)
    return {name: tools[name] for name in names if name in tools}




def set_timer(args: dict[str, Any]) -> str:
    seconds, text = timer_of(args)
    return f"ok: in {seconds} s you will say: {text}"


def timer_of(args: dict[str, Any]) -> tuple[int, str]:
    """(seconds, text) of a ``set_timer`` call; ``ValueError`` if they are not usable."""
    seconds, text = args.get("seconds"), str(args.get("text", "")).strip()
    if isinstance(seconds, float) and seconds.is_integer():
        seconds = int(seconds)
    if type(seconds) is not int or not 1 <= seconds <= TIMER_MAX_SECONDS or not text:
        raise ValueError(f"seconds must be a whole number from 1 to {TIMER_MAX_SECONDS}, and text must not be empty")
    return seconds, text[:TIMER_MAX_TEXT]


def effect(tool: Tool, arguments: str) -> tuple[str, Any] | None:
    """What a successful call of ``tool`` does besides its result: ``("token", "[name]")`` (a
    tag into the answer), ``("timer", {"seconds": n, "text": ...})``, or None."""
    if tool.name == "set_timer":
        seconds, text = timer_of(json.loads(arguments or "{}"))
        return "timer", {"seconds": seconds, "text": text}
    return None


@dataclass
class Outcome:
    """What one call gave: the text for the model, and whether it succeeded."""
    result: str
    ok: bool
    seconds: float


def call(tool: Tool | None, name: str, arguments: str, timeout: float, cancelled: threading.Event) -> Outcome:
    """Run the call ``name(arguments)``; at most ``timeout`` seconds, less if ``cancelled`` is set."""
    start = time.monotonic()
    if tool is None:
        return Outcome(f"error: there is no tool {name[:40]!r}", False, 0.0)
    try:
        args = json.loads(arguments or "{}")
        if not isinstance(args, dict):
            raise ValueError("the arguments are not a JSON object")
    except ValueError as exc:
        return Outcome(f"error: bad arguments: {str(exc)[:200]}", False, 0.0)
    box: list[Outcome] = []

    def work() -> None:
        try:
            box.append(Outcome(str(tool.run(args))[:MAX_RESULT], True, 0.0))
        except Exception as exc:  # a tool's failure is the model's to hear about, not the turn's end
            box.append(Outcome(f"error: {type(exc).__name__}: {str(exc)[:200]}", False, 0.0))
    worker = threading.Thread(target=work, name=f"tool-{name}", daemon=True)
    worker.start()
    deadline = start + timeout
    while worker.is_alive() and not cancelled.is_set() and time.monotonic() < deadline:
        worker.join(min(0.05, max(0.0, deadline - time.monotonic())))
    took = time.monotonic() - start
    if box:
        return Outcome(box[0].result, box[0].ok, took)
    if cancelled.is_set():
        return Outcome("error: cancelled", False, took)
    return Outcome(f"error: no result within {timeout:g} s", False, took)
