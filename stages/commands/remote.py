"""``mmdagent-llm remote``: the avatar's PC runs MMDAgent-EX and nothing of ours.

- ``remote --connect [HOST:PORT]``: one avatar (default: ``[remote] connect``). Connects to MMDAgent-EX's Plugin_Remote server
  (``Plugin_Remote_EnableServer=true``, ``Plugin_Remote_ListenPort=PORT`` in its ``.mdf``) and
  is that avatar's bridge (:class:`stages.bridge.remote.RemoteBridge`), joining the session's
  pipeline or starting one as ``plugin`` does (:func:`stages.commands.plugin.serve`), for as
  long as it runs: the app may come and go meanwhile, it is connected to again.
- ``remote --listen [HOST:PORT]`` (default: ``[remote] listen``): the avatars connect to us (``Plugin_Remote_EnableClient=true``,
  ``Plugin_Remote_Hostname``, ``Plugin_Remote_Port``: no port opens on the avatar's PC). This
  process, the listener, runs one avatar process per avatar of ``[remote.avatars]`` (or one,
  for this configuration's session, if none are listed), each ``remote --handoff``: a bridge
  with its session's own pipeline, history and settings. It admits a connection only from an
  allowed address that is an avatar's (:mod:`stages.bridge.door`), and passes it to that
  avatar's process (the file descriptor, over a Unix socket: Linux and macOS). An avatar process
  that ends is started again (after 1 s, doubling to 10 s); a connection that comes meanwhile
  waits for it, and one it held stays open meanwhile: the listener keeps a copy of each connection
  it passed on until the avatar's process says it is done with it, and hands it to the next
  process. ``HOST`` is loopback unless you say otherwise (``0.0.0.0`` for every interface).

The avatar's name is its session; its ``config`` file, if given, is its configuration
(``MMDAGENT_LLM_CONFIG``), else the listener's is. Its bus (tcp) takes the eight ports after
the previous avatar's, the first avatar's right after the listener's session's, so no two
collide. Logs name the avatar: ``mmdagent-llm[bridge/<name>]``.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker import config as config_mod
from broker.runtime import install_signal_handlers, setup_logging, stop_requested
from stages.bridge.door import Door, networks
from stages.commands.keeper import die_with_parent

log = logging.getLogger("mmdagent_llm")

MAX_BACKOFF = 10.0
STEADY = 10.0  # an avatar process that ran this long before it ended is restarted after 1 s again


def address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a pair; ``ValueError`` says what is wrong."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:60001")
    return host.strip("[]"), int(port)


def main(cfg: config_mod.Config, connect: str | None = None, listen: str | None = None,
         handoff: int | None = None) -> int:
    from stages.bridge.remote import Dialer, Handoff, RemoteBridge
    from stages.commands.plugin import serve
    if handoff is not None:  # an avatar of a listener
        setup_logging(f"bridge/{cfg['bus']['session']}")
        channel = socket.socket(fileno=handoff)
        return serve(cfg, lambda: RemoteBridge(cfg, Handoff(channel)), log.error, content_history=False)
    try:
        where = address(connect or cfg["remote"]["connect"]) if connect is not None else \
            address(listen or cfg["remote"]["listen"])
    except ValueError as exc:
        print(f"mmdagent-llm remote: {exc}", file=sys.stderr)
        return 2
    if connect is None:
        setup_logging("remote")
        if not hasattr(socket, "send_fds"):
            log.error("remote --listen passes each connection to its avatar's process, which needs Linux or macOS: "
                      "run the pipeline in WSL2, or let it connect to MMDAgent-EX (remote --connect)")
            return 2
        try:
            listener = Listener(cfg, *where)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", *where, exc)
            return 1
        return listener.run()
    setup_logging(f"bridge/{cfg['bus']['session']}")
    return serve(cfg, lambda: RemoteBridge(cfg, Dialer(*where)), log.error, content_history=False)


@dataclass
class Avatar:
    """One avatar of the listener: its process, and the connections it holds or waits for."""
    name: str
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    channel: socket.socket | None = None
    started: float = 0.0
    due: float = 0.0                   # when to start it again (after it ended)
    backoff: float = 1.0
    # connections handed to its process and not reported ended, by id: the listener keeps its own
    # copy open, so the process dying does not close them (MMDAgent-EX may die when a client goes)
    held: dict[int, tuple[socket.socket, str]] = field(default_factory=dict)
    waiting: list[tuple[int, socket.socket, str]] = field(default_factory=list)  # to hand over


class Listener:
    def __init__(self, cfg: config_mod.Config, host: str, port: int) -> None:
        remote = cfg["remote"]
        entries = remote["avatars"] or {cfg["bus"]["session"]: {}}
        self.door = Door(networks(remote["allow"]), {n: e.get("address", "") for n, e in entries.items()},
                         remote["max_connections"])
        base = cfg["bus"]["base_port"] or config_mod.derived_base_port(cfg["bus"]["session"])
        self.avatars = {name: Avatar(name, self._env(name, entry, base + 8 * (i + 1) if remote["avatars"] else 0))
                        for i, (name, entry) in enumerate(entries.items())}
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.server = socket.create_server((host, port), family=family, backlog=64)
        self.next_id = 0  # of the connections admitted
        self.port = self.server.getsockname()[1]

    @staticmethod
    def _env(name: str, entry: dict[str, str], base_port: int) -> dict[str, str]:
        """An avatar's process environment; ``base_port`` 0: this configuration's own session."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if base_port:  # its own bus: ports after the listener's, in the table's order (no two alike)
            env[f"{config_mod.ENV_PREFIX}BUS_SESSION"] = name
            env[f"{config_mod.ENV_PREFIX}BUS_BASE_PORT"] = str(base_port)
        if entry.get("config"):
            path = Path(entry["config"]).expanduser().resolve()
            if not path.is_file():
                raise config_mod.ConfigError(f"[remote.avatars] {name}: config = {entry['config']!r}: no such file")
            env[config_mod.ENV_CONFIG] = str(path)
        return env

    def run(self) -> int:
        install_signal_handlers()
        log.info("listening on port %d for %d avatar(s): %s", self.port, len(self.avatars), ", ".join(self.avatars))
        for avatar in self.avatars.values():
            self._start(avatar)
        try:
            while not stop_requested():
                channels = {a.channel: a for a in self.avatars.values() if a.channel is not None}
                try:
                    readable, _, _ = select.select([self.server, *channels], [], [], 0.2)
                except InterruptedError:
                    continue
                if self.server in readable:
                    self._accept()
                for sock in readable:
                    if sock in channels:
                        self._report(channels[sock])
                self._keep()
        finally:
            self.server.close()
            self._stop_all()
        return 0

    def _accept(self) -> None:
        try:
            conn, peer = self.server.accept()
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            return
        host = peer[0]
        name, why = self.door.admit(host, sum(len(a.held) + len(a.waiting) for a in self.avatars.values()))
        if name is None:
            if self.door.refuse(host):
                log.warning("refused a connection from %s: %s (further ones from it are only counted)", host, why)
            conn.close()
            return
        avatar = self.avatars[name]
        log.info("avatar %s connected from %s", name, host)
        self.next_id += 1
        avatar.waiting.append((self.next_id, conn, host))
        self._hand_over(avatar)

    def _hand_over(self, avatar: Avatar) -> None:
        """Pass the waiting connections to the avatar's process: ``<id> <peer>\n`` with each."""
        while avatar.waiting and avatar.channel is not None:
            number, conn, host = avatar.waiting.pop(0)
            try:
                socket.send_fds(avatar.channel, [f"{number} {host}\n".encode("utf-8")], [conn.fileno()])
                avatar.held[number] = (conn, host)
            except OSError as exc:
                log.warning("could not pass %s's connection to its process: %s", avatar.name, exc)
                conn.close()

    def _report(self, avatar: Avatar) -> None:
        try:
            data = avatar.channel.recv(4096) if avatar.channel is not None else b""
        except OSError:
            data = b""
        for word in data.split():  # "-<id>": the process is done with that connection
            entry = avatar.held.pop(int(word[1:]), None) if word[1:].isdigit() else None
            if entry is not None:
                entry[0].close()
        if not data:
            self._ended(avatar)

    def _start(self, avatar: Avatar) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX)
        cmd = [sys.executable, "-m", "stages.commands.cli", "remote", "--handoff", str(theirs.fileno())]
        avatar.proc = subprocess.Popen(cmd, env=avatar.env, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                                       preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
        theirs.close()
        avatar.channel, avatar.started = ours, time.monotonic()
        log.info("started avatar %s's process (pid %d)", avatar.name, avatar.proc.pid)
        if avatar.held:  # those its last process had, still open: handed to this one first
            log.info("avatar %s: its %d open connection(s) handed to the new process", avatar.name, len(avatar.held))
            avatar.waiting[:0] = [(n, conn, host) for n, (conn, host) in avatar.held.items()]
            avatar.held.clear()
        self._hand_over(avatar)

    def _ended(self, avatar: Avatar) -> None:
        if avatar.channel is not None:
            avatar.channel.close()
        avatar.channel = None
        code = avatar.proc.wait(5) if avatar.proc is not None else None
        ran = time.monotonic() - avatar.started
        avatar.backoff = 1.0 if ran >= STEADY else min(avatar.backoff * 2, MAX_BACKOFF)
        avatar.due = time.monotonic() + avatar.backoff
        log.warning("avatar %s's process ended (status %s) after %.0f s: starting it again in %.0f s",
                    avatar.name, code, ran, avatar.backoff)

    def _keep(self) -> None:
        now = time.monotonic()
        for avatar in self.avatars.values():
            if avatar.channel is not None and avatar.proc is not None and avatar.proc.poll() is not None:
                self._ended(avatar)
            if avatar.channel is None and now >= avatar.due and not stop_requested():
                self._start(avatar)

    def _stop_all(self) -> None:
        for avatar in self.avatars.values():
            if avatar.channel is not None:
                avatar.channel.close()
            for conn in [c for _, c, _ in avatar.waiting] + [c for c, _ in avatar.held.values()]:
                conn.close()
            if avatar.proc is not None and avatar.proc.poll() is None:
                avatar.proc.send_signal(signal.SIGTERM)
        for avatar in self.avatars.values():
            if avatar.proc is None:
                continue
            try:
                avatar.proc.wait(8)
            except subprocess.TimeoutExpired:
                avatar.proc.kill()
                avatar.proc.wait(5)
