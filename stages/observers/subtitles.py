"""``mmdagent-llm observe subtitles``: a web page of what the avatar says, for an OBS browser source.

``mmdagent-llm observe subtitles --url`` prints the page's address with its access key (see
:mod:`stages.observers.web`): paste it into OBS as a Browser source. The page has a
transparent background and large outlined text (``[subtitles]`` sets font, size and colors;
OBS's own "Custom CSS" can override ``#avatar``, ``#user`` and ``.line``).

Updates are pushed by the server (Server-Sent Events on ``/events``), never polled: the
sentence appears on its ``SYNTH_EVENT_START`` (the sequencer's ``speech`` ``started``) and goes
on its end or cut-off; the user's utterance, with ``show_user``, for ``user_seconds`` (a
live-stream comment as ``<viewer>: <comment>``: :func:`stages.comment_prompt.user_line`). Each
message is the whole state, ``{"avatar": str, "user": str}``, so a page that (re)connects is
in step at once. The page reconnects by itself when this observer or the browser restarts.
Text is set as text, never as HTML. Lines wrap by the Japanese line-breaking rules, like the
captions' (CSS ``line-break: strict``: no closing mark, small kana or ``ー`` starts a line, no
opening bracket ends one); a word too long for a line is broken rather than cut off.
"""

from __future__ import annotations

import html
import time

from aiohttp import web as aioweb

from broker import config as config_mod
from broker import wire
from broker.runtime import Stage
from stages.comment_prompt import user_line
from stages.observers import web

# lang="ja": Chromium applies line-break: strict's Japanese rules only to text in Japanese
PAGE = """<!doctype html>
<html lang="ja"><head><meta charset="utf-8"><title>mmdagent-llm subtitles</title>
<style>
html, body { background: transparent; margin: 0; overflow: hidden; }
body { font-family: %(font_family)s; font-size: %(font_size)s; color: %(color)s; font-weight: bold;
       position: absolute; inset: 0; display: flex; flex-direction: column; justify-content: flex-end; }
.line { text-align: center; padding: 0 0.5em 0.4em; line-height: 1.25; white-space: pre-wrap;
        line-break: strict; overflow-wrap: anywhere;
        paint-order: stroke fill; -webkit-text-stroke: 0.16em %(outline)s;
        text-shadow: 0 0 0.12em %(outline)s; }
#user { font-size: 70%%; opacity: 0.9; }
</style></head>
<body><div id="user" class="line"></div><div id="avatar" class="line"></div>
<script>
const key = new URLSearchParams(location.search).get("key") || "";
function show(id, text) { const el = document.getElementById(id); if (el.textContent !== text) el.textContent = text; }
function connect() {
  const events = new EventSource("/events?key=" + encodeURIComponent(key));
  events.onopen = () => { document.body.dataset.connected = "yes"; };
  events.onmessage = (e) => { const s = JSON.parse(e.data); show("avatar", s.avatar || ""); show("user", s.user || ""); };
  // EventSource retries a dropped connection itself; after a refusal it gives up: start again
  events.onerror = () => {
    document.body.dataset.connected = "no";
    show("avatar", ""); show("user", "");  // nothing stale on the stream while the observer is away
    if (events.readyState === EventSource.CLOSED) setTimeout(connect, 1000);
  };
}
connect();
</script></body></html>
"""


def page_html(section: dict) -> str:
    """The page, with ``[subtitles]``'s font and colors (escaped; no ``;`` to end a CSS value)."""
    return PAGE % {k: html.escape(str(section[k])).replace(";", "")
                   for k in ("font_family", "font_size", "color", "outline")}


class Board:
    """What the page shows now; each change goes to every connected page (a :class:`web.Hub` of
    whole states)."""

    def __init__(self, hub: web.Hub) -> None:
        self.state = {"avatar": "", "user": ""}
        self.hub = hub
        hub.publish(self.state)

    def set(self, **fields: str) -> None:
        if all(self.state[k] == v for k, v in fields.items()):
            return
        self.state = {**self.state, **fields}
        self.hub.publish(self.state)


class Subtitles(Stage):
    name = "subtitles"
    topics = ("speech", "turn_start", "cancel")

    def __init__(self, cfg: config_mod.Config) -> None:
        super().__init__(cfg)
        self.s = cfg["subtitles"]
        self.model = cfg["speech"]["model"]
        self.showing: tuple[int, int] | None = None
        self.user_until: float | None = None
        self.page = page_html(self.s).encode("utf-8")
        self.server = web.Server(cfg, "subtitles", [("GET", "/", self._page), ("GET", "/events", self._events)])
        self.board = Board(web.Hub(self.server, latest=True))
        self.server.start()

    async def _page(self, request: aioweb.Request) -> aioweb.Response:
        return aioweb.Response(body=self.page, content_type="text/html", charset="utf-8")

    async def _events(self, request: aioweb.Request) -> aioweb.StreamResponse:
        return await self.board.hub.stream(request)

    def on_event(self, env: wire.Envelope) -> None:
        if env.kind == "turn_start":
            if self.s["show_user"] and "resume" not in env.body:  # a resumed answer: the same utterance
                self.board.set(user=user_line(env.body))  # a comment turn: "<viewer>: <comment>"
                self.user_until = time.monotonic() + self.s["user_seconds"]
            return
        if env.kind == "cancel":
            if env.body.get("reason") != "lost":  # lost: the sentence plays on, and the answer with it
                self.showing = None
                self.board.set(avatar="")
            return
        if env.body.get("model") != self.model:
            return
        state, index = env.body.get("state"), env.body.get("index")
        if state == "started":
            self.showing = (env.turn, index)
            self.board.set(avatar=str(env.body.get("text", "")))
        elif state in ("finished", "interrupted", "stopped", "timeout") and self.showing == (env.turn, index):
            self.showing = None
            self.board.set(avatar="")

    def next_deadline(self) -> float | None:
        return self.user_until

    def on_tick(self, now: float) -> None:
        if self.user_until is not None and now >= self.user_until:
            self.user_until = None
            self.board.set(user="")

    def close(self) -> None:
        self.server.close()


def main(cfg: config_mod.Config) -> int:
    return web.run(Subtitles, cfg, "subtitles")
