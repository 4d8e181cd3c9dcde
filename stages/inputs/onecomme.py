"""OneComme (わんコメ): the comments of every stream it follows, from its local WebSocket API.

OneComme runs on the streamer's PC and gathers the chats of YouTube, Twitch, niconico and others.
Written to its published description (onecomme.com, developer docs: "WebSocket API" and
"コメント保持ファイルの仕様", the Comment structure):

- connect to ``ws://127.0.0.1:11180/sub``; from version 8 the ``p`` parameter names the data
  wanted (``?p=comments``), without it nothing comes: :func:`with_comments` adds it when the
  configured URL has none;
- every message is JSON ``{"type": <event>, "data": {...}}``; ``connected`` (on connecting)
  carries ``data.comments``, the comments held so far, and ``comments`` the new ones;
- a Comment is ``{"id": <the stream's id in OneComme>, "service": "youtube" | "twitch" | ...,
  "name": <the stream's name>, "url": ..., "data": {"id", "userId", "liveId", "name",
  "displayName"?, "comment", "isOwner", "hasGift", ...}}``, ``data.comment`` being HTML (escaped,
  emoji and stamps as ``<img>``).

What this client does with it: the comments of ``connected`` were there before (and on a
reconnection, partly answered already): none is offered, each is only remembered as seen; a
comment of ``comments`` whose id was seen is skipped; ``deleted`` (its data not described in the
docs: any comment id found in it) withdraws those comments. The HTML becomes plain text (an
``<img>`` its ``alt``), cleaned and cut (:func:`stages.comment_prompt.clean`). Any other event is
ignored. A dropped connection (OneComme closed, restarted) is tried again 1 s later, doubling to
30 s; each attempt has a 10 s deadline, and a connection that answers no ping for 10 s is taken
as dropped (aiohttp's heartbeat every 20 s).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp

from stages.inputs.feeds import Emit, Status, Withdraw, backoff
from stages.inputs.policy import Comment
from stages.comment_prompt import NAME_CHARS, clean

log = logging.getLogger("mmdagent_llm")

CONNECT_TIMEOUT = 10.0
HEARTBEAT = 20.0
MAX_MESSAGE = 8 << 20  # bytes: a "connected" carries up to a thousand comments
MAX_HTML = 20_000      # characters of a comment's HTML looked at (the rest is cut anyway)
SEEN = 5000            # comment ids remembered, to skip what was seen already


def with_comments(url: str) -> str:
    """``url`` with ``p=comments`` unless it names what it wants already."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "p" for key, _ in query):
        return url
    return urlunsplit(parts._replace(query=urlencode([*query, ("p", "comments")], safe=",")))


class _Text(HTMLParser):
    """The text of a comment's HTML: character data, and an image's ``alt`` (an emoji)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.parts.append(next((v or "" for k, v in attrs if k == "alt"), ""))


def html_text(html: str) -> str:
    parser = _Text()
    parser.feed(html[:MAX_HTML])
    parser.close()
    return "".join(parser.parts)


def comment_of(item: Any, max_chars: int, now: float) -> Comment | None:
    """A :class:`Comment` from one OneComme Comment object, or None if it is not one."""
    if not isinstance(item, dict) or not isinstance(item.get("data"), dict):
        return None
    data, service = item["data"], str(item.get("service") or "onecomme")[:20]
    name = data.get("displayName") or data.get("name")
    text = data.get("comment")
    if not isinstance(name, str) or not isinstance(text, str):
        return None
    user = str(data.get("userId") or name)[:128]
    return Comment(source=f"onecomme:{service}", viewer=f"{service}:{user}", name=clean(name, NAME_CHARS),
                   text=clean(html_text(text), max_chars), id=str(data.get("id", ""))[:128], at=now)


def _ids(data: Any) -> list[str]:
    """Comment ids in a ``deleted`` event's data, whatever its shape (a list of comments or of
    ids, or ``{"comments": [...]}``)."""
    items = data.get("comments", []) if isinstance(data, dict) else data
    found = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            inner = item.get("data") if isinstance(item.get("data"), dict) else item
            if inner.get("id"):
                found.append(str(inner["id"]))
    return found


class Reader:
    """What one connection's messages mean (the seen ids outlive the connection)."""

    def __init__(self, max_chars: int, emit: Emit) -> None:
        self.max_chars, self.emit = max_chars, emit
        self.seen: collections.OrderedDict[str, None] = collections.OrderedDict()

    def _saw(self, comment_id: str) -> bool:
        if not comment_id:
            return False
        known = comment_id in self.seen
        self.seen[comment_id] = None
        self.seen.move_to_end(comment_id)
        while len(self.seen) > SEEN:
            self.seen.popitem(last=False)
        return known

    def message(self, text: str, now: float) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        kind, data = event.get("type"), event.get("data")
        if kind == "deleted":
            for comment_id in _ids(data):
                self.emit(Withdraw(comment_id=comment_id))
            return
        if kind not in ("connected", "comments") or not isinstance(data, dict):
            return
        items = data.get("comments")
        for item in items[:SEEN] if isinstance(items, list) else []:
            comment = comment_of(item, self.max_chars, now)
            if comment is not None and not self._saw(comment.id) and kind == "comments":
                self.emit(comment)


def follow(url: str, max_chars: int):
    """The OneComme source for :class:`stages.inputs.feeds.Feeds`."""
    url = with_comments(url)

    async def run(emit: Emit, status: Status) -> None:
        reader, retry = Reader(max_chars, emit), backoff()
        timeout = aiohttp.ClientTimeout(total=CONNECT_TIMEOUT, connect=CONNECT_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                worked = False
                status("connecting")
                try:
                    async with session.ws_connect(url, heartbeat=HEARTBEAT, max_msg_size=MAX_MESSAGE) as ws:
                        worked = True
                        status("connected")
                        log.info("onecomme: connected to %s", url)
                        async for msg in ws:
                            if msg.type == aiohttp.WSMsgType.TEXT:
                                reader.message(msg.data, time.monotonic())
                            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                              aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                                break
                        why = f"closed ({ws.close_code})"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                    why = f"{type(exc).__name__}: {str(exc)[:120]}"
                delay = retry(worked)
                status("down")
                log.warning("onecomme: no connection to %s: %s; again in %.0f s", url, why, delay)
                await asyncio.sleep(delay)

    return run
