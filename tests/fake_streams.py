"""Fake comment sources for the tests, written from their published protocol descriptions.

- :class:`FakeOneComme`: OneComme's local WebSocket API (onecomme.com developer docs, "WebSocket
  API" and the Comment structure): ``/sub``, nothing sent without ``p`` naming ``comments``
  (version 8 on); on connecting ``{"type": "connected", "data": {"comments": [...held...],
  "config": {}}}``, then ``{"type": "comments", "data": {"comments": [...new...]}}``; a Comment is
  ``{"id", "service", "name", "url", "color", "data": {"id", "userId", "liveId", "name",
  "displayName", "comment" (HTML: escaped, emoji as <img alt>), "isOwner", "hasGift", ...}}``.
- :class:`FakeTwitch`: Twitch chat over IRC with TLS (dev.twitch.tv/docs/irc): anonymous logins
  only (``NICK justinfan<digits>``), ``CAP REQ`` acknowledged, ``JOIN #channel`` echoed, each
  chat message a ``PRIVMSG`` with IRCv3 tags (``display-name`` escaped), ``PING :tmi.twitch.tv``
  expecting ``PONG``, ``CLEARMSG``/``CLEARCHAT``.

Each runs its own asyncio loop on a thread, on a free port of 127.0.0.1; :meth:`stop` ends it
and every connection. Both can drop their clients (:meth:`drop`) to test reconnection.
"""

from __future__ import annotations

import asyncio
import html
import json
import ssl
import threading
import time
from typing import Any, Callable

from aiohttp import WSMsgType, web

from tests.harness import free_base_port


class _LoopThread:
    """An asyncio loop on a thread of its own; ``call`` runs a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def onecomme_comment(n: int, user: str, name: str, text: str, service: str = "youtube") -> dict:
    """A Comment as OneComme sends it: ``text`` becomes the HTML OneComme makes of a chat line."""
    return {"id": "frame-1", "service": service, "name": "テスト配信", "url": "https://example.invalid/live",
            "color": {"r": 0, "g": 0, "b": 0},
            "data": {"id": f"oc-{n}", "liveId": "live-1", "userId": user, "name": name, "displayName": name,
                     "comment": html.escape(text, quote=False), "isOwner": False, "hasGift": False,
                     "isFirstTime": False, "profileImage": "", "originalProfileImage": "",
                     "timestamp": str(int(time.time() * 1000))}}


class FakeOneComme:
    def __init__(self, held: list[dict] | None = None) -> None:
        self.held = list(held or [])  # what a "connected" carries
        self.port = free_base_port(1)
        self.url = f"ws://127.0.0.1:{self.port}/sub"
        self.clients: set[web.WebSocketResponse] = set()
        self.connections = 0
        self.refused = 0
        self._lt = _LoopThread()
        self._lt.call(self._start())

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/sub", self._sub)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _sub(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        if "comments" not in request.query.get("p", "").split(","):
            self.refused += 1  # version 8 on: nothing is sent to a client that asks for nothing
        else:
            self.connections += 1
            await ws.send_str(json.dumps({"type": "connected", "data": {"comments": self.held, "config": {}}}))
            self.clients.add(ws)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.clients.discard(ws)
        return ws

    def wait_clients(self, n: int, timeout: float = 15.0) -> bool:
        return _wait(lambda: len(self.clients) >= n, timeout)

    def send(self, comments: list[dict]) -> None:
        async def go() -> None:
            text = json.dumps({"type": "comments", "data": {"comments": comments}}, ensure_ascii=False)
            for ws in list(self.clients):
                try:
                    await ws.send_str(text)
                except ConnectionError:
                    self.clients.discard(ws)
        self._lt.call(go())

    def drop(self) -> None:
        async def go() -> None:
            for ws in list(self.clients):
                await ws.close()
        self._lt.call(go())

    def stop(self) -> None:
        try:
            self.drop()
            self._lt.call(self._runner.cleanup())
        finally:
            self._lt.close()


def _escape_tag(value: str) -> str:
    return (value.replace("\\", "\\\\").replace(";", "\\:").replace(" ", "\\s")
            .replace("\r", "\\r").replace("\n", "\\n"))


class FakeTwitch:
    def __init__(self, context: ssl.SSLContext, channel: str) -> None:
        self.channel = channel
        self.port = free_base_port(1)
        self.address = f"127.0.0.1:{self.port}"
        self.joined: list[asyncio.StreamWriter] = []
        self.logins: list[str] = []
        self.pongs = 0
        self.refused = 0
        self._lt = _LoopThread()
        self._server = self._lt.call(asyncio.start_server(self._client, "127.0.0.1", self.port, ssl=context))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nick = ""
        try:
            while line := await reader.readline():
                text = line.decode("utf-8").rstrip("\r\n")
                command, _, rest = text.partition(" ")
                if command == "CAP":
                    writer.write(f":tmi.twitch.tv CAP * ACK :{rest.partition(':')[2]}\r\n".encode())
                elif command == "NICK":
                    nick = rest.strip()
                    if not (nick.startswith("justinfan") and nick[9:].isdigit()):
                        self.refused += 1  # only anonymous logins here: no PASS, no account
                        writer.write(b":tmi.twitch.tv NOTICE * :Login unsuccessful\r\n")
                        break
                    self.logins.append(nick)
                    writer.write(f":tmi.twitch.tv 001 {nick} :Welcome, GLHF!\r\n".encode())
                elif command == "JOIN" and nick and rest.strip() == f"#{self.channel}":
                    writer.write(f":{nick}!{nick}@{nick}.tmi.twitch.tv JOIN #{self.channel}\r\n".encode())
                    self.joined.append(writer)
                elif command == "PONG":
                    self.pongs += 1
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            if writer in self.joined:
                self.joined.remove(writer)
            writer.close()

    def wait_joined(self, n: int, timeout: float = 15.0) -> bool:
        return _wait(lambda: len(self.joined) >= n, timeout)

    def _broadcast(self, lines: list[str]) -> None:
        async def go() -> None:
            data = "".join(f"{line}\r\n" for line in lines).encode("utf-8")
            for writer in list(self.joined):
                try:
                    writer.write(data)
                    await writer.drain()
                except ConnectionError:
                    pass
        self._lt.call(go())

    def privmsg_line(self, msg_id: str, login: str, display: str, text: str, user_id: str = "1") -> str:
        tags = {"badge-info": "", "badges": "", "color": "#1E90FF", "display-name": display, "emotes": "",
                "first-msg": "0", "id": msg_id, "mod": "0", "room-id": "1000", "subscriber": "0",
                "tmi-sent-ts": str(int(time.time() * 1000)), "turbo": "0", "user-id": user_id, "user-type": ""}
        head = ";".join(f"{k}={_escape_tag(v)}" for k, v in tags.items())
        return f"@{head} :{login}!{login}@{login}.tmi.twitch.tv PRIVMSG #{self.channel} :{text}"

    def send(self, lines: list[str]) -> None:
        self._broadcast(lines)

    def ping(self) -> None:
        self._broadcast(["PING :tmi.twitch.tv"])

    def drop(self) -> None:
        async def go() -> None:
            for writer in list(self.joined):
                writer.close()
        self._lt.call(go())

    def stop(self) -> None:
        try:
            self.drop()
            self._server.close()
            self._lt.call(self._server.wait_closed())
        finally:
            self._lt.close()
