"""An intruder on the same machine, for the security tests: ``python -m tests.probe [options]``.

It does what the attack in issue 7 did, as another Unix user (``--user nobody``: started as
root, it imports all it needs, then drops to that user for good) or as the same user without
the session's secret (``--curve none``, or ``--curve wrong`` with the broker's real public key
and a key pair of its own); ``--curve right`` (the session's keys) is the owner's observer,
the control that shows the probe would see and send what the others cannot:

1. finds listening sockets the way any user can, in ``/proc/net/tcp``, ``tcp6`` and ``unix``;
2. of those, takes the ones named by ``--target`` (the test names the pipeline's endpoints, so
   the probe leaves the machine's other services alone) and connects to each as PUSH, PUB and
   SUB (subscribed to everything);
3. sends forged ``command`` envelopes (``EXECUTE`` and a ``SYNTH_START`` with
   :data:`FORGED_TEXT`, both from "sequencer") on every PUSH and PUB, and a forged
   ``turn_start`` on every PUB;
4. prints ``ready``, listens until a line arrives on stdin (the test has run a turn meanwhile)
   or ``--listen`` seconds pass, and prints one JSON line: what it found, could read, heard.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from broker import wire

FORGED_TEXT = "forged-by-the-probe"
SOCKET_TYPES = {"PUSH": zmq.PUSH, "PUB": zmq.PUB, "SUB": zmq.SUB}


def listening() -> list[str]:
    """ZeroMQ-style addresses of every listening tcp and unix socket this user can see."""
    found = []
    for table, fmt in (("/proc/net/tcp", "tcp://{}:{}"), ("/proc/net/tcp6", "tcp://[{}]:{}")):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] != "0A":  # LISTEN
                continue
            host_hex, port_hex = fields[1].split(":")
            found.append(fmt.format(_host(host_hex), int(port_hex, 16)))
    try:
        rows = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        rows = []
    for row in rows:
        fields = row.split()
        if len(fields) >= 8 and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
            found.append(f"ipc://{fields[7]}")
    return found


def _host(hex_text: str) -> str:
    raw = bytes.fromhex(hex_text)
    if len(raw) == 4:
        return ".".join(str(b) for b in reversed(raw))
    words = [raw[i:i + 4][::-1].hex() for i in range(0, 16, 4)]
    return ":".join(w[i:i + 4] for w in words for i in (0, 4)).replace("0000:0000:0000:0000:0000:0000:0000:0001", "::1")


def forged(turn_start: bool = True) -> list[list[bytes]]:
    """The forgeries: two commands and (a turn id far ahead, so every later turn would be taken
    as old and dropped) a turn_start."""
    sender = wire.Sender("sequencer")
    frames = [wire.encode(sender.make("command", {"type": "EXECUTE", "args": ["/usr/bin/xcalc"]})),
              wire.encode(sender.make("command", {"type": "SYNTH_START", "args": ["0", "mei_voice_normal", FORGED_TEXT]}))]
    if turn_start:
        frames.append(wire.encode(wire.Sender("bridge").make("turn_start", {"text": FORGED_TEXT}, turn=2 ** 50)))
    return frames


HANDSHAKE_OVER = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_DISCONNECTED)


def settle(monitors: list[zmq.Socket], timeout: float = 5.0) -> dict[str, int]:
    """Wait until every connection's first handshake is over (done or failed), at most ``timeout``
    seconds; count the outcomes. So "heard nothing" never means "was not connected yet"."""
    outcome = {"succeeded": 0, "failed": 0, "unsettled": 0}
    deadline = time.monotonic() + timeout
    for monitor in monitors:
        if monitor.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            event = recv_monitor_message(monitor)["event"]
            outcome["succeeded" if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else "failed"] += 1
        else:
            outcome["unsettled"] += 1
    return outcome


def drop_to(user: str) -> None:
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.getuid() != entry.pw_uid or os.geteuid() != entry.pw_uid:
        raise SystemExit("could not become " + user)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--user", help="drop to this user first (needs root)")
    parser.add_argument("--curve", choices=("none", "wrong", "right"), default="none",
                        help="right: the session's own keys from --key-folder (the owner's observer, a control)")
    parser.add_argument("--server-key", type=Path, help="the broker's public key file (for --curve wrong)")
    parser.add_argument("--target", action="append", default=[], help="an endpoint to attack if found")
    parser.add_argument("--key-folder", type=Path, help="try to read the secret key files here")
    parser.add_argument("--commands-only", action="store_true", help="forge no turn_start")
    parser.add_argument("--listen", type=float, default=20.0, help="listen at most this many seconds")
    args = parser.parse_args(argv)
    server_key = zmq.auth.load_certificate(args.server_key)[0] if args.server_key else None
    if args.curve == "right":
        server_key = zmq.auth.load_certificate(args.key_folder / "server.key")[0]
        own = zmq.auth.load_certificate(args.key_folder / "client.key_secret")
    if args.user:
        drop_to(args.user)
    readable = []
    if args.key_folder:
        for name in ("client.key_secret", "server.key_secret"):
            try:
                (args.key_folder / name).read_bytes()
                readable.append(name)
            except OSError:
                pass
    found = listening()
    targets = [t for t in args.target if t in found]
    ctx = zmq.Context()
    subs, sent, queued, monitors, kept = [], 0, 0, [], []
    for address in targets:
        for name, kind in SOCKET_TYPES.items():
            sock = ctx.socket(kind)
            sock.linger = 0
            kept.append(sock)  # open until the end: queued forgeries go out if a handshake ever succeeds
            if args.curve != "none":
                public, secret = own if args.curve == "right" else zmq.curve_keypair()
                sock.curve_serverkey = server_key
                sock.curve_publickey, sock.curve_secretkey = public, secret
            monitors.append(sock.get_monitor_socket(HANDSHAKE_OVER))
            sock.connect(address)
            if kind == zmq.SUB:
                sock.setsockopt(zmq.SUBSCRIBE, b"")
                subs.append(sock)
                continue
            for frames in forged(not args.commands_only):
                try:
                    sock.send_multipart(frames, zmq.NOBLOCK)
                    queued += 1
                except zmq.Again:
                    pass
                sent += 1
    handshakes = settle(monitors)
    print("ready", flush=True)
    heard: list[str] = []
    poller = zmq.Poller()
    for sock in subs:
        poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + args.listen
    stdin = sys.stdin.fileno()
    poller.register(stdin, zmq.POLLIN)
    while (left := deadline - time.monotonic()) > 0:
        events = dict(poller.poll(int(left * 1000) + 1))
        if stdin in events:
            break
        for sock in subs:
            if sock in events:
                heard.append(bytes(sock.recv_multipart()[0]).decode("utf-8", "replace"))
    print(json.dumps({"uid": os.getuid(), "found": found, "targets": targets, "sent": sent, "queued": queued,
                      "heard": heard, "keys_readable": readable, "handshakes": handshakes}), flush=True)
    ctx.destroy(linger=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
