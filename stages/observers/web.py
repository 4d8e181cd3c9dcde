"""The private web server of the subtitles and metrics observers and of the control API.

Like the bus, it is the owner's only. It listens on loopback unless configured otherwise, and
every request must carry the session's access key (``?key=<key>`` in the address, or an
``Authorization: Bearer <key>`` header, as Prometheus sends it); anything else gets 403 and
nothing of the page. The key is made once per session, in a file only the owner can read
(``<state>/bus-<session>/web.key``, mode 0600): another user of the machine can connect to the
port but cannot know the key. It stays the same across restarts, so an OBS browser source or a
Prometheus job keeps working. It is never logged: ``--url`` prints it on request.

The server is aiohttp's, on a thread of its own with its own asyncio loop, beside the stage's
ZeroMQ loop: nothing the stage does waits for a page, and nothing a page does waits for the bus.
The stage hands it messages through a :class:`Hub` (any thread to the loop's thread, never
blocking). :meth:`Server.close` ends every open event stream and stops the server within a
few seconds whatever the clients do; no request line is ever logged (it may hold the key).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import os
import secrets
import threading
import zlib
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from broker import config as config_mod
from broker import curve
from broker.runtime import Stage, setup_logging

log = logging.getLogger("mmdagent_llm")

KEY_FILE = "web.key"
FIRST_PORT = 25000  # below the bus ports (27110 ...) and the ephemeral ports
PORT_BLOCKS = 256
PING = 15.0  # an SSE comment this often: proxies and OBS keep the connection, a dead one is noticed
START_TIMEOUT = 10.0  # seconds for the server to be listening, or to fail
STOP_TIMEOUT = 3.0  # seconds for the server to stop: open streams are ended, not waited for

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def key_path(cfg: config_mod.Config) -> Path:
    return curve.session_folder(cfg) / KEY_FILE


def access_key(cfg: config_mod.Config) -> str:
    """The session's web access key, made (atomically, mode 0600) on first use."""
    path = key_path(cfg)
    curve.private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
    for _ in range(50):  # another process may be writing it right now
        key = path.read_text(encoding="ascii").strip()
        if key:
            return key
        threading.Event().wait(0.01)
    raise config_mod.ConfigError(f"{path} is empty: remove it to get a new key")


def port_of(cfg: config_mod.Config, section: str) -> int:
    """``[section] port``, or the session's derived one: subtitles 25000 + 2n, metrics 25001 + 2n,
    api 25512 + n (n from the session's name, below :data:`PORT_BLOCKS`)."""
    port = cfg[section]["port"]
    if port:
        return port
    block = zlib.crc32(cfg["bus"]["session"].encode("utf-8")) % PORT_BLOCKS
    if section == "api":
        return FIRST_PORT + 2 * PORT_BLOCKS + block
    return FIRST_PORT + 2 * block + (1 if section == "metrics" else 0)


def url_of(cfg: config_mod.Config, section: str, path: str = "/") -> str:
    host = cfg[section]["host"]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port_of(cfg, section)}{path}?key={access_key(cfg)}"


class Refused(Exception):
    """Raised by a handler for a request it does not take: answered ``status`` with ``message``
    (``{"error": message}`` on a server with ``json_errors``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def json_error(status: int, message: str, **fields: Any) -> web.Response:
    """A JSON error answer: ``{"error": message, ...}``."""
    return web.json_response({"error": message, **fields}, status=status)


class Server:
    """aiohttp serving ``routes`` (``(method, path, handler)``) on its own thread and loop, only
    with the key, from :meth:`start` on. ``json_errors``: refusals and errors (403, 404, 405,
    413...) as JSON bodies. ``max_body``: larger request bodies get 413."""

    def __init__(self, cfg: config_mod.Config, section: str, routes: list[tuple[str, str, Handler]],
                 *, json_errors: bool = False, max_body: int = 1 << 20) -> None:
        self.section, self.host, self.port = section, cfg[section]["host"], port_of(cfg, section)
        self.key = access_key(cfg).encode("ascii")
        self.json_errors, self.max_body = json_errors, max_body
        self.on_stop: list[Callable[[], None]] = []  # run on the loop as it stops: end what waits
        self.closed = False
        self.loop = asyncio.new_event_loop()
        self.app = web.Application(middlewares=[self._guard], client_max_size=max_body)
        for method, path, handler in routes:
            self.app.router.add_route(method, path, handler)
        self.app.on_response_prepare.append(self._headers)
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name=f"{section}-http", daemon=True)

    def start(self) -> "Server":
        """Listen (once its hubs are in place); raises ``OSError`` when the port cannot be had."""
        self.thread.start()
        if not self._started.wait(START_TIMEOUT):
            raise OSError(f"the web server did not start within {START_TIMEOUT:g} s")
        if self._error is not None:
            raise self._error
        log.info("serving on http://%s:%d/ (the address with its key: mmdagent-llm %s %s --url)", self.host,
                 self.port, "input" if self.section == "api" else "observe", self.section)
        if not config_mod.is_loopback(self.host):
            log.warning("[%s] host = %r is reachable from other machines, over plain HTTP: the access key "
                        "travels unencrypted on the network", self.section, self.host)
        return self

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # the port is taken, the host is not ours: said by the caller
            self._error = exc
            self._started.set()
            self.loop.close()
            return
        self._started.set()
        try:
            self.loop.run_forever()
        finally:  # what the clean-up left (a connection still sending a refused body) ends here
            left = asyncio.all_tasks(self.loop)
            for task in left:
                task.cancel()
            if left:
                self.loop.run_until_complete(asyncio.wait(left, timeout=1.0))
            self.loop.close()

    async def _start(self) -> None:
        # access_log=None: the request line holds the key, so it is never logged
        # shutdown_timeout: a handler still running a second after the stop is cancelled
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.query.get("key", "")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self.key):
            what = "this address" if self.json_errors else "this page"
            how = "input api" if self.section == "api" else f"observe {self.section}"
            return self._refuse(403, f"{what} needs the access key: mmdagent-llm {how} --url")
        try:
            return await handler(request)
        except Refused as exc:
            log.log(logging.WARNING if exc.status >= 500 else logging.INFO, "%s %s refused: %d %s", request.method,
                    request.path, exc.status, exc)  # the path only (the query may hold the key); no request text
            return self._refuse(exc.status, str(exc))
        except web.HTTPException as exc:  # 404, 405, 413 ...: said plainly, in JSON for the API
            if exc.status < 400:
                raise
            return self._refuse(exc.status, exc.reason if exc.status != 413 else
                                f"the body is larger than {self.max_body} bytes")

    def _refuse(self, status: int, message: str) -> web.Response:
        if self.json_errors:
            return json_error(status, message)
        return web.Response(status=status, text=f"{status}: {message}\n")

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = "mmdagent-llm"  # not aiohttp's and Python's versions
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["Referrer-Policy"] = "no-referrer"  # a page's address holds the key

    def close(self) -> None:
        """Stop serving: open event streams end, the port is released; never waits longer than
        about :data:`STOP_TIMEOUT` seconds."""
        if self.closed:
            return
        self.closed = True
        if not self.thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(STOP_TIMEOUT)
        except Exception as exc:  # a client that would not let go: the process ends anyway
            log.warning("the web server did not stop cleanly: %s", type(exc).__name__)
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            pass  # the loop has closed already
        self.thread.join(STOP_TIMEOUT)

    async def _stop(self) -> None:
        for hook in self.on_stop:
            hook()
        if self._runner is not None:
            await self._runner.cleanup()


class Hub:
    """Messages from the stage's thread to every open Server-Sent Events stream.

    ``latest``: each message is the whole state (the subtitles): a stream starts with the last
    one, and a slow reader skips to the newest. Otherwise each message is an event: a stream
    gets every one from its start on, and one that falls :data:`BACKLOG` behind is ended (the
    client reconnects) rather than kept growing.
    """

    BACKLOG = 1000

    def __init__(self, server: Server, latest: bool = False) -> None:
        self.server, self.latest = server, latest
        self.last: str | None = None
        self.streams: set[_Stream] = set()
        server.on_stop.append(self.end_all)

    def publish(self, data: Any, event: str = "") -> None:
        """Send ``data`` (JSON-encoded) to every stream, as SSE ``event`` if given; any thread."""
        text = (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
        try:
            self.server.loop.call_soon_threadsafe(self._deliver, text)
        except RuntimeError:
            pass  # the server has stopped

    def _deliver(self, text: str) -> None:
        if self.latest:
            self.last = text
        for stream in self.streams:
            if self.latest:
                stream.items.clear()
            if len(stream.items) >= self.BACKLOG:
                stream.lost = True
            else:
                stream.items.append(text)
            stream.wake.set()

    def end_all(self) -> None:
        for stream in self.streams:
            stream.lost = True
            stream.wake.set()

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """The handler of an SSE address: ``retry: 1000``, then the messages, a ping when idle."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        mine = _Stream()
        if self.latest and self.last is not None:
            mine.items.append(self.last)
        self.streams.add(mine)
        try:
            await response.write(b"retry: 1000\n\n")
            while not mine.lost and not self.server.closed:
                if not mine.items:
                    mine.wake.clear()
                    try:
                        await asyncio.wait_for(mine.wake.wait(), PING)
                    except TimeoutError:
                        await response.write(b": ping\n\n")
                        continue
                while mine.items and not mine.lost:
                    await response.write(mine.items.popleft().encode("utf-8"))
        except (ConnectionError, OSError):
            pass  # the client went away
        finally:
            self.streams.discard(mine)
        return response


class _Stream:
    def __init__(self) -> None:
        self.items: collections.deque[str] = collections.deque()
        self.wake = asyncio.Event()
        self.lost = False


def run(observer: Callable[[config_mod.Config], Stage], cfg: config_mod.Config, section: str) -> int:
    """Run a web observer's or input's process; a port it cannot have is one clear line and status 1."""
    setup_logging(section)
    try:
        stage = observer(cfg)
    except OSError as exc:  # the port is taken, or the host is not this machine's
        log.error("cannot serve on %s port %d: %s (set [%s] host/port)", cfg[section]["host"],
                  port_of(cfg, section), exc, section)
        return 1
    return stage.run()
