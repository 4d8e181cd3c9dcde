"""``mmdagent-llm input api``: an HTTP control API: the avatar says or answers what a program asks,
stops; its status and its conversation as it happens.

It listens on ``[api] host`` and ``port`` (loopback by default; ``mmdagent-llm input api --url``
prints the address) and every request needs the session's access key, the subtitles page's
(``?key=`` or ``Authorization: Bearer``; :mod:`stages.observers.web`): 403 otherwise. JSON in
and out; the OpenAPI description is ``GET /api/v1/openapi.json``.

=========================== ======================================================================
``POST /api/v1/say``        ``{"text", "voice"?, "tags"?}``: the avatar says ``text`` (no LLM, no
                            history), cut into sentences and spoken like an answer, cutting off
                            what it was saying; the user's voice cuts it off in turn. ``tags``:
                            names of ``[expression.names]``, put before the text as ``[name] ``;
                            ``voice``: a voice alias of the configuration (``[speech] voice`` or
                            a name's), put first as the tag of the name that sets it (one without
                            a motion if there is one: the tags' gesture is played, not its); a
                            tag that sets another voice is refused with it.
``POST /api/v1/ask``        ``{"text", "from"?}``: a turn as if the user had said ``text``
                            (``from``: on whose behalf, shown to observers).
``POST /api/v1/stop``       stop speaking now (no body, or ``{}``).
``GET /api/v1/status``      what ``mmdagent-llm status`` shows (:func:`stages.commands.status.health`).
``GET /api/v1/events``      the conversation as Server-Sent Events (:func:`conversation_event`).
=========================== ======================================================================

say, ask and stop publish an ``input`` (``when`` ``now``, ``source`` ``api``) and answer with
the bridge's ``input_result``: 200 ``{"id", "ok": true, "turn"}``, or 409 ``{"id", "ok": false,
"reason", "error"}`` when the bridge refused (e.g. ``away``: recognition is paused). No answer
within ``[api] answer_timeout`` seconds: 504 (the pipeline or the bridge is down). A request
that is not what the address takes gets a 4xx with ``{"error"}`` and nothing reaches the
avatar: a body that is not a JSON object, a missing, unknown or mistyped field, an empty text
or one over :data:`broker.wire.INPUT_MAX_TEXT` characters, an unknown tag or voice (400, naming
it), a body that is not ``application/json`` (415), one over :data:`MAX_BODY` bytes (413).
Text with ``|`` or line breaks is taken: the bridge makes it one line and cleans every field it
writes to MMDAgent-EX. The log says what was asked and what came of it, never the text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from typing import Any

from aiohttp import web as aioweb

from broker import config as config_mod
from broker import wire
from broker.runtime import Stage
from stages.commands import status
from stages.observers import web
from stages.observers.web import Refused
from stages.segmenter.tags import strip_tags

log = logging.getLogger("mmdagent_llm")

MAX_BODY = 64 * 1024
BASE = "/api/v1"
SPEECH = {"started": "started", "finished": "finished", "interrupted": "cut", "timeout": "timeout"}
REFUSED = {"busy": "the avatar is busy", "away": "recognition is paused (the user is away): nothing is said",
           "empty": "the text is empty", "invalid": "the bridge does not know this request"}


def voice_tags(cfg: config_mod.Config) -> dict[str, str]:
    """Voice alias -> the name whose tag sets it ("" for ``[speech] voice`` if no name sets it:
    every answer starts with it). A name without a motion first: a voice asked for should not
    bring a gesture with it."""
    names = cfg["expression"]["names"]
    out: dict[str, str] = {}
    for name, entry in sorted(names.items(), key=lambda item: bool(item[1].get("motion"))):
        if "voice" in entry:
            out.setdefault(entry["voice"], name)
    out.setdefault(cfg["speech"]["voice"], "")
    return out


def fields_of(raw: bytes, fields: dict[str, type], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object in ``raw``, checked: only ``fields``, each of its type (``list``: of
    strings), the ``required`` ones present. Raises :class:`Refused` (400) saying what is wrong."""
    try:
        body = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except UnicodeDecodeError:
        raise Refused(400, "the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise Refused(400, f"the body is not JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(body, dict):
        raise Refused(400, "the body must be a JSON object")
    for name in body:
        if name not in fields:
            raise Refused(400, f"unknown field {name[:40]!r} (this address takes {', '.join(fields) or 'none'})")
    for name in required:
        if name not in body:
            raise Refused(400, f"missing field {name!r}")
    for name, value in body.items():
        kind = fields[name]
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
            raise Refused(400, f"field {name!r} must be {'a list of strings' if kind is list else 'a string'}")
    return body


def one_line(text: str) -> str:
    """``text`` as the bridge will take it: one line, spaces collapsed; refused empty or too long."""
    line = " ".join(text.split())
    if not line:
        raise Refused(400, "text is empty")
    if len(line) > wire.INPUT_MAX_TEXT:
        raise Refused(400, f"text is longer than {wire.INPUT_MAX_TEXT} characters")
    return line


def conversation_event(env: wire.Envelope) -> tuple[str, dict[str, Any]] | None:
    """The SSE event (name, data) of a bus event, or None. Every one has ``turn``:

    - ``user``: ``text``, ``source``, ``from``: a turn opened by the user's words (or an input's
      ``ask``: ``source`` says which input, "" for the user's voice);
    - ``say``: ``text`` (its tags taken out), ``source``, ``from``: a turn of fixed words (an
      input's ``say``, the greeting, a reminder);
    - ``sentence``: ``index``, ``text``, ``state``: ``started``, ``finished``, ``cut`` (cut off),
      ``timeout`` (no speech event came);
    - ``interrupted``: ``reason``, ``heard`` (the sentences that had begun);
    - ``error``: ``cause``, ``error``: the turn failed;
    - ``done``: ``reason``, ``answer``: the llm closed the turn.
    """
    body, turn = env.body, env.turn
    if env.kind == "turn_start" and "resume" not in body:  # resumed: the same turn goes on
        said = body.get("say")
        return ("say" if isinstance(said, str) else "user",
                {"turn": turn, "text": strip_tags(said).strip() if isinstance(said, str) else str(body.get("text", "")),
                 "source": str(body.get("source", "")), "from": str(body.get("from", ""))})
    if env.kind == "speech" and body.get("state") in SPEECH:
        return "sentence", {"turn": turn, "index": body.get("index"), "text": str(body.get("text", "")),
                            "state": SPEECH[body["state"]]}
    if env.kind == "cancel" and body.get("reason") != "lost":  # lost: the answer goes on, resumed
        heard = body.get("spoken")
        return "interrupted", {"turn": turn, "reason": str(body.get("reason", "")),
                               "heard": [str(s) for s in heard] if isinstance(heard, list) else []}
    if env.kind == "turn_result":
        if body.get("reason") == "error":
            return "error", {"turn": turn, "cause": str(body.get("cause") or "other"),
                             "error": str(body.get("error", ""))}
        return "done", {"turn": turn, "reason": str(body.get("reason", "")),
                        "answer": strip_tags(str(body.get("answer", ""))).strip()}
    return None


class Api(Stage):
    name = "api"
    topics = ("input_result", "turn_start", "speech", "cancel", "turn_result")

    def __init__(self, cfg: config_mod.Config) -> None:
        super().__init__(cfg)
        self.timeout = cfg["api"]["answer_timeout"]
        self.voices = voice_tags(cfg)
        self.expression: dict[str, dict[str, Any]] = cfg["expression"]["names"]
        self.names = tuple(self.expression)
        self.beats: dict[str, tuple[float, dict[str, Any]]] = {}  # stage -> (when heard, heartbeat body)
        self.beats_lock = threading.Lock()
        # the server's loop hands inputs to this thread, the one that may use the bus sockets
        self.outbox: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.bell, self._ring = socket.socketpair()
        self.bell.setblocking(False)
        self._ring.setblocking(False)
        self.extra[self.bell.fileno()] = self._send_inputs
        self.pending: dict[str, asyncio.Future] = {}  # input id -> its answer; the server's loop only
        self.server = web.Server(cfg, "api", [
            ("POST", f"{BASE}/say", self._say), ("POST", f"{BASE}/ask", self._ask),
            ("POST", f"{BASE}/stop", self._stop),
            ("GET", f"{BASE}/status", self._status), ("GET", f"{BASE}/events", self._events),
            ("GET", f"{BASE}/openapi.json", self._openapi)], json_errors=True, max_body=MAX_BODY)
        self.events = web.Hub(self.server)
        self.server.on_stop.append(self._stopping)
        self.server.start()

    # -- the bus (this thread) -------------------------------------------------------------
    def on_event(self, env: wire.Envelope) -> None:
        if env.kind == "input_result":
            ident = str(env.body.get("id", ""))
            if ident.startswith("api-"):
                try:
                    self.server.loop.call_soon_threadsafe(self._answered, ident, dict(env.body))
                except RuntimeError:
                    pass  # the server has stopped: nobody waits
            return
        event = conversation_event(env)
        if event is not None:
            self.events.publish(event[1], event=event[0])

    def on_heartbeat(self, env: wire.Envelope) -> None:
        with self.beats_lock:
            self.beats[str(env.body.get("stage"))] = (time.monotonic(), env.body)

    def _send_inputs(self) -> None:
        try:
            while self.bell.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                body = self.outbox.get_nowait()
            except queue.Empty:
                return
            self.publish("input", body)

    def close(self) -> None:
        self.server.close()
        self.bell.close()
        self._ring.close()

    # -- the server (its loop's thread) ----------------------------------------------------
    def _stopping(self) -> None:
        for future in self.pending.values():  # a clear answer rather than a connection cut
            if not future.done():
                future.set_exception(Refused(503, "the API is stopping: ask again when it is back"))

    def _answered(self, ident: str, body: dict[str, Any]) -> None:
        future = self.pending.pop(ident, None)
        if future is not None and not future.done():
            future.set_result(body)

    async def _ask_bridge(self, action: str, text: str = "", who: str = "") -> aioweb.Response:
        if not self.ready:
            raise Refused(503, "the API is not on the session's bus yet: try again in a moment")
        ident = f"api-{uuid.uuid4().hex[:16]}"
        future = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        self.outbox.put({"action": action, "text": text, "when": "now", "id": ident, "source": "api", "from": who})
        try:
            self._ring.send(b"\0")
        except BlockingIOError:
            pass  # the bell is ringing already
        try:
            result = await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise Refused(504, f"the bridge did not answer within {self.timeout:g} s: the pipeline or the bridge "
                               f"is down (mmdagent-llm status)") from None
        finally:
            self.pending.pop(ident, None)
        if result.get("ok") is True:
            log.info("%s: done, turn %s", action, result.get("turn"))
            return aioweb.json_response({"id": ident, "ok": True, "turn": result.get("turn", 0)})
        reason = str(result.get("reason", ""))[:40]
        log.info("%s: refused by the bridge: %s", action, reason)
        return aioweb.json_response({"id": ident, "ok": False, "reason": reason,
                                     "error": REFUSED.get(reason, f"refused: {reason}")}, status=409)

    async def _read(self, request: aioweb.Request, fields: dict[str, type],
                    required: tuple[str, ...] = ()) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise Refused(413, f"the body is larger than {MAX_BODY} bytes")  # not even read
        raw = await request.read()  # aiohttp refuses (413) a longer body sent without a length
        if raw.strip() and request.content_type != "application/json":
            raise Refused(415, "the body must be JSON, sent as Content-Type: application/json")
        return fields_of(raw, fields, required)

    async def _say(self, request: aioweb.Request) -> aioweb.Response:
        body = await self._read(request, {"text": str, "voice": str, "tags": list}, ("text",))
        text = one_line(body["text"])
        tags = list(body.get("tags", []))
        for tag in tags:
            if tag not in self.names:
                raise Refused(400, f"unknown tag {tag[:40]!r} (the names of [expression.names]: "
                                   f"{', '.join(self.names)})")
        if "voice" in body:
            voice = body["voice"]
            if voice not in self.voices:
                raise Refused(400, f"unknown voice {voice[:40]!r} (the voices of the configuration: "
                                   f"{', '.join(self.voices)})")
            other = next((t for t in tags if self.expression[t].get("voice", voice) != voice), None)
            if other is not None:
                raise Refused(400, f"tag {other!r} sets voice {self.expression[other]['voice']!r}, not {voice!r}")
            # first: a gesture of the tags comes after, and is the one played
            tags = [self.voices[voice]] * bool(self.voices[voice]) + tags
        return await self._ask_bridge("say", one_line("".join(f"[{t}] " for t in tags) + text))

    async def _ask(self, request: aioweb.Request) -> aioweb.Response:
        body = await self._read(request, {"text": str, "from": str}, ("text",))
        who = " ".join(body.get("from", "").split())
        if len(who) > 64:
            raise Refused(400, "from is longer than 64 characters")
        return await self._ask_bridge("ask", one_line(body["text"]), who)

    async def _stop(self, request: aioweb.Request) -> aioweb.Response:
        await self._read(request, {})
        return await self._ask_bridge("stop")

    async def _status(self, request: aioweb.Request) -> aioweb.Response:
        now = time.monotonic()
        with self.beats_lock:  # what beat within the time a process may take to be declared gone
            beats = {name: body for name, (heard, body) in self.beats.items()
                     if now - heard <= self.cfg["bus"]["peer_timeout"]}
        beats[self.name] = {"pid": os.getpid(), "ready": self.ready, "info": {}, "bad_frames": dict(self.bad_frames)}
        data = status.health(beats, self.sender.session)
        return aioweb.Response(text=json.dumps(data, ensure_ascii=False, default=str), content_type="application/json")

    async def _events(self, request: aioweb.Request) -> aioweb.StreamResponse:
        return await self.events.stream(request)

    async def _openapi(self, request: aioweb.Request) -> aioweb.Response:
        return aioweb.json_response(openapi(self.names, list(self.voices)))


def openapi(names: tuple[str, ...], voices: list[str]) -> dict[str, Any]:
    """The OpenAPI 3.1 description of this API, with this configuration's tags and voices."""
    error = {"description": "refused: {\"error\": why}", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "string"}}}}}}
    answer = {"type": "object", "properties": {"id": {"type": "string"}, "ok": {"type": "boolean"},
                                               "turn": {"type": "integer"}, "reason": {"type": "string"},
                                               "error": {"type": "string"}}}
    answers = {"200": {"description": "done: the turn it opened or stopped",
                       "content": {"application/json": {"schema": answer}}},
               "409": {"description": "the bridge refused (reason: busy, away, empty, invalid)",
                       "content": {"application/json": {"schema": answer}}},
               **{code: error for code in ("400", "403", "413", "415", "503")},
               "504": {**error, "description": "the bridge did not answer: the pipeline or the bridge is down"}}

    def action(summary: str, properties: dict[str, Any] | None, required: list[str]) -> dict[str, Any]:
        operation: dict[str, Any] = {"summary": summary, "responses": answers}
        if properties is not None:
            operation["requestBody"] = {"required": bool(required), "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False, "required": required, "properties": properties}}}}
        return {"post": operation}

    text = {"type": "string", "minLength": 1, "maxLength": wire.INPUT_MAX_TEXT}
    return {
        "openapi": "3.1.0",
        "info": {"title": "mmdagent-llm control API", "version": "1",
                 "description": "Make the MMDAgent-EX avatar say, answer or stop; its status and conversation."},
        "servers": [{"url": BASE}],
        "security": [{"key": []}, {"bearer": []}],
        "components": {"securitySchemes": {"key": {"type": "apiKey", "in": "query", "name": "key"},
                                           "bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/say": action("say this text (no LLM), cutting off what the avatar says", {
                "text": text, "voice": {"type": "string", "enum": voices},
                "tags": {"type": "array", "items": {"type": "string", "enum": list(names)}}}, ["text"]),
            "/ask": action("a turn as if the user had said this", {
                "text": text, "from": {"type": "string", "maxLength": 64}}, ["text"]),
            "/stop": action("stop speaking now", {}, []),
            "/status": {"get": {"summary": "what `mmdagent-llm status` shows", "responses": {
                "200": {"description": "processes, LLM, last turns, problems, healthy",
                        "content": {"application/json": {"schema": {"type": "object"}}}}, "403": error}}},
            "/events": {"get": {"summary": "the conversation: user, say, sentence, interrupted, error, done",
                                "responses": {"200": {"description": "Server-Sent Events, data in JSON",
                                                      "content": {"text/event-stream": {}}}, "403": error}}},
        },
    }


def main(cfg: config_mod.Config) -> int:
    return web.run(Api, cfg, "api")
