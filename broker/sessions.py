"""One session, one private bus: its keys, its ports, and who is running it.

A *session* is one avatar's pipeline (``[bus] session``, default ``default``). Every session
has a bus of its own that only its owner's processes can use:

- **Keys.** Every endpoint is a ZeroMQ CURVE server (:mod:`broker.curve`). Without
  ``[bus] curve_dir``, the keys are the session's own, made on first use by whichever process
  of the session comes first, in its folder ``<state>/bus-<session>/`` (``<state>``:
  :func:`broker.config.state_dir`)::

      keys/           server.key, server.key_secret, client.key, client.key_secret,
                      clients/client.key: the session's keys, in :mod:`broker.curve`'s
                      format (secrets 0600)
      broker.json     the running broker: pid, endpoints, start time (no secret), so a
                      second instance can say who holds the ports

  The state folder and the session folder are mode 0700 and must belong to the user: another
  user can neither read the keys nor plant their own. A process without the client secret
  key (another user, or the same user's process that does not load it) gets no connection.
  Two sessions have different keys, so a stage of one can never join the other's bus.
- **Ports.** ``[bus] base_port = 0`` (the default) derives the eight ports from the session
  name (:func:`broker.config.derived_base_port`), so two sessions on one machine get two
  buses without any setting. Should two names meet on the same ports, or another program
  hold them, the second pipeline refuses to start and says what holds them (:func:`conflict`).

Windows has no POSIX modes: the state folder is in ``%LOCALAPPDATA%``, which only the user
(and administrators) can read.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from typing import Any

import zmq

from broker import wire
from broker import config as config_mod
from broker import curve
from broker.config import state_dir
from broker.runtime import alive, connect

log = logging.getLogger("mmdagent_llm")

REGISTRY = "broker.json"


# -- ports -------------------------------------------------------------------------------
def describe(cfg: config_mod.Config) -> str:
    """The session's endpoints in a few words: ``tcp://127.0.0.1:27110-27117``."""
    first, last = (config_mod.endpoint(cfg, name) for name in (config_mod.ENDPOINTS[0], config_mod.ENDPOINTS[-1]))
    if cfg["bus"]["transport"] == "tcp":
        return f"{first}-{last.rsplit(':', 1)[1]}"
    return f"{first} .. {last.rsplit('-', 1)[1]}"


def held_endpoints(cfg: config_mod.Config) -> list[str]:
    """The session's endpoints that something on this machine already listens on."""
    held = []
    for name in config_mod.ENDPOINTS:
        address = config_mod.endpoint(cfg, name)
        if not _can_bind(address):
            held.append(address)
    return held


def _can_bind(address: str) -> bool:
    scheme, _, where = address.partition("://")
    if scheme == "ipc":
        if not hasattr(socket, "AF_UNIX"):
            return True
        path = "\0" + where[1:] if where.startswith("@") else where
        if not path.startswith("\0"):
            return not os.path.exists(path)
        family, target = socket.AF_UNIX, path
    else:
        host, _, port = where.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        target = (host if host != "*" else "", int(port))
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        if family != getattr(socket, "AF_UNIX", None) and os.name == "posix":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq does
        try:
            probe.bind(target)
        except OSError:
            return False
    return True


def free_base_port(cfg: config_mod.Config) -> int | None:
    """A derived-style base port near the session's whose eight ports are free now, or None."""
    for block in range(config_mod.PORT_BLOCKS):
        base = config_mod.FIRST_PORT + 8 * block
        trial = {**cfg, "bus": {**cfg["bus"], "transport": "tcp", "base_port": base}}
        if not held_endpoints(trial):
            return base
    return None


# -- who runs what -----------------------------------------------------------------------
def record_broker(cfg: config_mod.Config) -> None:
    """Write ``broker.json`` for this broker (called once it has bound every endpoint)."""
    folder = curve.session_folder(cfg)
    entry = {"session": cfg["bus"]["session"], "pid": os.getpid(), "started": time.time(),
             "endpoints": [config_mod.endpoint(cfg, name) for name in config_mod.ENDPOINTS]}
    try:
        curve.private_dir(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".broker.", suffix=".tmp")  # mode 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f)
        os.replace(tmp, folder / REGISTRY)
    except OSError as exc:  # only the "who holds the ports" message is poorer without it
        log.warning("could not record the broker in %s: %s", folder, exc.strerror or exc)


def running_brokers() -> list[dict[str, Any]]:
    """Every ``broker.json`` under the state folder whose process still runs (newest first)."""
    found = []
    for path in state_dir().glob(f"bus-*/{REGISTRY}"):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(entry, dict) or type(entry.get("pid")) is not int or not alive(entry["pid"]):
                continue
        except (OSError, ValueError):
            continue
        found.append(entry)
    return sorted(found, key=lambda e: e.get("started", 0), reverse=True)


def holder_of(addresses: list[str]) -> dict[str, Any] | None:
    """The running broker of this user that listens on any of ``addresses``, if one is recorded."""
    for entry in running_brokers():
        if set(addresses) & set(entry.get("endpoints", [])):
            return entry
    return None


def conflict(cfg: config_mod.Config, what: str, held: list[str] | None = None) -> str | None:
    """Why ``what`` (e.g. ``the broker``) cannot bind the session's endpoints, or None if it can.

    ``held``: the endpoints known to be taken (default: probe them all). The message says
    what holds them and how to run beside it.
    """
    held = held_endpoints(cfg) if held is None else held
    if not held:
        return None
    session = cfg["bus"]["session"]
    holder = holder_of(held)
    text = f"{what} of session {session!r} cannot listen on {describe(cfg)}: {', '.join(held)} held by "
    if holder is None:
        text += "another program (no session of yours records it). "
    else:
        since = time.strftime("%H:%M:%S", time.localtime(holder.get("started", 0)))
        text += f"the broker of session {holder['session']!r} (pid {holder['pid']}, since {since}). "
        if holder["session"] == session:
            return text + ("This session is running already: join it (`mmdagent-llm plugin` joins by "
                           "itself), do not start a second broker")
        text += f"To join that pipeline instead, use `mmdagent-llm --session {holder['session']} ...`. "
    if cfg["bus"]["transport"] == "tcp" and config_mod.is_loopback(cfg["bus"]["host"]):
        free = free_base_port(cfg)
        hint = f" (e.g. {free}, free now)" if free else ""
        text += (f"To run beside it, give this session its own ports: [bus] base_port = <port>{hint} in "
                 f"the configuration, or another session name (`mmdagent-llm --session <name> ...`)")
    else:
        text += "To run beside it, give this session other endpoints ([bus] base_port or ipc_prefix)"
    return text


def present(cfg: config_mod.Config, wait: float) -> dict[str, dict[str, Any]]:
    """Who is on the session's bus: the last heartbeat body of each process name heard.

    Returns as soon as the broker and a bridge were heard, else after ``wait`` seconds (every
    process beats once a second). Empty when the session is not running; at once when its bus
    is on this machine (loopback tcp, ipc) and nothing listens where its broker would: a cold
    start does not wait for heartbeats that cannot come.
    """
    bus = cfg["bus"]
    local = bus["transport"] == "ipc" or config_mod.is_loopback(bus["host"])
    if local and _can_bind(config_mod.endpoint(cfg, "events_out")):
        return {}
    heard: dict[str, dict[str, Any]] = {}
    sub = connect(cfg, zmq.SUB, "events_out", ("heartbeat.",))
    deadline = time.monotonic() + wait
    try:
        while not {"broker", "bridge"} <= heard.keys() and (left := deadline - time.monotonic()) > 0:
            if sub.poll(int(left * 1000) + 1):
                try:
                    env = wire.decode(sub.recv_multipart())
                except wire.WireError:
                    continue
                if env.session == cfg["bus"]["session"] and env.body.get("ready"):
                    heard[str(env.body.get("stage"))] = env.body
    finally:
        sub.close(linger=0)
    return heard


def leaving(on_bus: dict[str, dict[str, Any]]) -> int:
    """The pid of the plugin that started the running pipeline, if that plugin has ended (0 if
    not): its stages stop by themselves (they watch it), so the pipeline is on its way out and
    must not be joined. MMDAgent-EX closed and opened again starts a new plugin at once."""
    owner = on_bus.get("broker", {}).get("owner")
    return owner if type(owner) is int and owner > 0 and owner != os.getpid() and not alive(owner) else 0


def wait_free(cfg: config_mod.Config, timeout: float) -> bool:
    """Wait (at most ``timeout`` seconds) until no endpoint of the session is held any more."""
    deadline = time.monotonic() + timeout
    while held_endpoints(cfg):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
