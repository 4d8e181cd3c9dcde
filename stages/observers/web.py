"""The private web server of the subtitles and metrics observers.

Like the bus, it is the owner's only. It listens on loopback unless configured otherwise, and
every request must carry the session's access key (``?key=<key>`` in the address, or an
``Authorization: Bearer <key>`` header, as Prometheus sends it); anything else gets 403 and
nothing of the page. The key is made once per session, in a file only the owner can read
(``<state>/bus-<session>/web.key``, mode 0600): another user of the machine can connect to the
port but cannot know the key. It stays the same across restarts, so an OBS browser source or a
Prometheus job keeps working. It is never logged: ``--url`` prints it on request.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from broker import config as config_mod
from broker import curve
from broker.runtime import Stage, setup_logging

log = logging.getLogger("mmdagent_llm")

KEY_FILE = "web.key"
FIRST_PORT = 25000  # below the bus ports (27110 ...) and the ephemeral ports
PORT_BLOCKS = 256


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
    """``[section] port``, or the session's derived one (subtitles even, metrics odd)."""
    port = cfg[section]["port"]
    if port:
        return port
    block = zlib.crc32(cfg["bus"]["session"].encode("utf-8")) % PORT_BLOCKS
    return FIRST_PORT + 2 * block + (1 if section == "metrics" else 0)


def url_of(cfg: config_mod.Config, section: str, path: str = "/") -> str:
    host = cfg[section]["host"]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port_of(cfg, section)}{path}?key={access_key(cfg)}"


Route = Callable[[BaseHTTPRequestHandler], None]


def serve(cfg: config_mod.Config, section: str, routes: dict[str, Route]) -> ThreadingHTTPServer:
    """Start serving ``routes`` (path -> handler) on a daemon thread; only with the key."""
    key = access_key(cfg).encode("ascii")

    class Handler(BaseHTTPRequestHandler):
        server_version = "mmdagent-llm"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            parts = urlsplit(self.path)
            given = (parse_qs(parts.query).get("key") or [""])[0]
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                given = auth[7:].strip()
            route = routes.get(parts.path)
            if not hmac.compare_digest(given.encode("utf-8", "replace"), key):
                self.send_error(403, "this page needs the access key: mmdagent-llm observe <name> --url")
            elif route is None:
                self.send_error(404)
            else:
                route(self)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the request line holds the key: never logged

    server = ThreadingHTTPServer((cfg[section]["host"], port_of(cfg, section)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"{section}-http", daemon=True).start()
    log.info("serving on http://%s:%d/ (the address with its key: mmdagent-llm observe %s --url)",
             cfg[section]["host"], port_of(cfg, section), section)
    return server


def run(observer: Callable[[config_mod.Config], Stage], cfg: config_mod.Config, section: str) -> int:
    """Run a web observer's process; a port it cannot have is one clear line and status 1."""
    setup_logging(section)
    try:
        stage = observer(cfg)
    except OSError as exc:  # the port is taken, or the host is not this machine's
        log.error("cannot serve on %s port %d: %s (set [%s] host/port)", cfg[section]["host"],
                  port_of(cfg, section), exc, section)
        return 1
    return stage.run()
