"""Twitch chat, read anonymously over IRC with TLS: a channel's comments, with no account.

Written to Twitch's published description (dev.twitch.tv/docs/irc: "Chat & Chatbots",
"Twitch-specific IRC Commands", "IRC Tags"): a client connects to ``irc.chat.twitch.tv:6697``
(TLS), may log in anonymously with ``NICK justinfan<digits>`` and no password, asks for
``CAP REQ :twitch.tv/tags twitch.tv/commands``, and ``JOIN #<channel>`` (lower case). Then:

- ``@<tags> :<login>!<login>@<login>.tmi.twitch.tv PRIVMSG #<channel> :<text>``: a chat
  message; tags ``display-name`` (escaped per IRCv3: ``\\s`` space, ``\\:`` ``;``, ``\\\\``
  backslash, ``\\r``, ``\\n``), ``id`` (the message's), ``user-id``. A ``/me`` message's text is
  ``\\x01ACTION <text>\\x01``.
- ``PING :tmi.twitch.tv``: answered ``PONG :tmi.twitch.tv`` (else the server closes the
  connection).
- ``RECONNECT``: the server is going away: connect again.
- ``CLEARMSG`` (tag ``target-msg-id``: one message deleted), ``CLEARCHAT #<channel> :<login>``
  (a viewer timed out or banned) and ``CLEARCHAT #<channel>`` (chat cleared): withdrawn here
  too (:class:`stages.inputs.feeds.Withdraw`).

Deadlines: the connection and TLS handshake 10 s each; with nothing read for :data:`QUIET`
seconds (the server pings about every 5 minutes) a ``PING`` of ours, and no line within
:data:`PONG_WAIT` seconds after it drops the connection. A dropped connection is tried again 1 s
later, doubling to 30 s. A line over :data:`LINE_LIMIT` bytes ends the connection (the server
never sends one).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from typing import NamedTuple

from stages.inputs.feeds import Emit, Status, Withdraw, backoff
from stages.inputs.policy import Comment
from stages.comment_prompt import NAME_CHARS, clean

log = logging.getLogger("mmdagent_llm")

CONNECT_TIMEOUT = 10.0
QUIET = 360.0
PONG_WAIT = 15.0
LINE_LIMIT = 64 * 1024
_UNESCAPE = {"s": " ", ":": ";", "\\": "\\", "r": "\r", "n": "\n"}


class Line(NamedTuple):
    tags: dict[str, str]
    prefix: str
    command: str
    params: list[str]


def unescape(value: str) -> str:
    """An IRCv3 tag value as it was meant (``\\s`` a space...); an unknown escape is its character."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            out.append(_UNESCAPE.get(value[i + 1], value[i + 1]))
            i += 2
        else:
            out.append(value[i] if value[i] != "\\" else "")
            i += 1
    return "".join(out)


def parse(raw: str) -> Line:
    """One IRC line (without its CRLF): tags, prefix, command, parameters (the last one may hold spaces)."""
    tags: dict[str, str] = {}
    rest = raw
    if rest.startswith("@"):
        head, _, rest = rest.partition(" ")
        for item in head[1:].split(";"):
            key, _, value = item.partition("=")
            tags[key] = unescape(value)
    prefix = ""
    rest = rest.lstrip(" ")
    if rest.startswith(":"):
        prefix, _, rest = rest[1:].partition(" ")
    rest = rest.lstrip(" ")
    trailing = None
    if " :" in rest:
        rest, _, trailing = rest.partition(" :")
    elif rest.startswith(":"):
        rest, trailing = "", rest[1:]
    words = rest.split()
    params = words[1:] + ([trailing] if trailing is not None else [])
    return Line(tags, prefix, words[0].upper() if words else "", params)


def comment_of(line: Line, max_chars: int, now: float) -> Comment | None:
    """The chat message in a ``PRIVMSG`` line, or None."""
    if line.command != "PRIVMSG" or len(line.params) < 2:
        return None
    login = line.prefix.partition("!")[0].lower()
    text = line.params[-1]
    if text.startswith("\x01ACTION ") and text.endswith("\x01"):
        text = text[8:-1]
    name = line.tags.get("display-name") or login
    return Comment(source="twitch", viewer=f"twitch:{login}", name=clean(name, NAME_CHARS),
                   text=clean(text, max_chars), id=line.tags.get("id", "")[:128], at=now)


def withdrawal(line: Line) -> Withdraw | None:
    if line.command == "CLEARMSG" and line.tags.get("target-msg-id"):
        return Withdraw(comment_id=line.tags["target-msg-id"])
    if line.command == "CLEARCHAT":
        if len(line.params) >= 2:
            return Withdraw(viewer=f"twitch:{line.params[-1].lower()}")
        return Withdraw(everything=True)
    return None


def address(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    return host.strip("[]"), int(port)


def follow(channel: str, server: str, max_chars: int):
    """The Twitch chat source for :class:`stages.inputs.feeds.Feeds`."""
    channel = channel.lstrip("#").lower()
    host, port = address(server)

    async def session(emit: Emit, status: Status) -> str:
        """One connection, until it drops: why it did."""
        context = ssl.create_default_context()
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=context, server_hostname=host, limit=LINE_LIMIT,
            ssl_handshake_timeout=CONNECT_TIMEOUT), CONNECT_TIMEOUT * 2)
        try:
            nick = f"justinfan{random.randint(10000, 99999)}"
            writer.write(f"CAP REQ :twitch.tv/tags twitch.tv/commands\r\nNICK {nick}\r\nJOIN #{channel}\r\n"
                         .encode("ascii"))
            await asyncio.wait_for(writer.drain(), CONNECT_TIMEOUT)
            pinged = False
            while True:
                try:
                    raw = await asyncio.wait_for(reader.readuntil(b"\n"), PONG_WAIT if pinged else QUIET)
                except asyncio.TimeoutError:
                    if pinged:
                        return f"no answer to a PING in {PONG_WAIT:.0f} s"
                    writer.write(b"PING :tmi.twitch.tv\r\n")
                    await asyncio.wait_for(writer.drain(), CONNECT_TIMEOUT)
                    pinged = True
                    continue
                except asyncio.LimitOverrunError:
                    return f"a line over {LINE_LIMIT} bytes"
                except asyncio.IncompleteReadError:
                    return "closed by the server"
                pinged = False
                line = parse(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                if line.command == "PING":
                    writer.write(f"PONG :{line.params[-1] if line.params else 'tmi.twitch.tv'}\r\n"
                                 .encode("utf-8", errors="replace"))
                    await asyncio.wait_for(writer.drain(), CONNECT_TIMEOUT)
                elif line.command == "PRIVMSG":
                    comment = comment_of(line, max_chars, time.monotonic())
                    if comment is not None:
                        emit(comment)
                elif line.command == "JOIN" and line.prefix.startswith(nick):
                    status("connected")
                    log.info("twitch: joined #%s at %s:%d", channel, host, port)
                elif line.command == "RECONNECT":
                    return "the server asked to reconnect"
                elif line.command == "NOTICE" and "unsuccessful" in (line.params[-1] if line.params else ""):
                    return f"refused: {line.params[-1][:120]}"
                elif (gone := withdrawal(line)) is not None:
                    emit(gone)
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                pass

    async def run(emit: Emit, status: Status) -> None:
        retry = backoff()
        while True:
            status("connecting")
            joined = False

            def seen(state: str) -> None:
                nonlocal joined
                joined = joined or state == "connected"
                status(state)
            try:
                why = await session(emit, seen)
            except (OSError, asyncio.TimeoutError, ssl.SSLError, UnicodeError) as exc:
                why = f"{type(exc).__name__}: {str(exc)[:120]}"
            delay = retry(joined)  # a server that takes the connection and drops it at once is not hammered
            status("down")
            log.warning("twitch: no connection to #%s at %s:%d: %s; again in %.0f s", channel, host, port, why, delay)
            await asyncio.sleep(delay)

    return run
