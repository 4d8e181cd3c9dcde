"""The comment sources' asyncio loop, on a thread of the comments process, and its inbox.

The stage's own loop (:class:`broker.runtime.Stage`) polls ZeroMQ sockets; the sources
(:mod:`stages.inputs.onecomme`, :mod:`stages.inputs.twitch`) are asyncio clients. So the sources
run on one thread with their own event loop, and hand what they bring (a
:class:`stages.inputs.policy.Comment`, or a :class:`Withdraw` when a moderator removed something)
to the stage through :class:`Feeds`: a bounded inbox (past :data:`INBOX` items the oldest are
dropped and counted: a flood cannot grow the process) and a socket pair whose read end the
stage polls, woken with one byte when the inbox stops being empty. Only the stage's thread
touches the policy and the bus.

Each source is a coroutine ``run(emit, status)`` that never returns by itself: it connects,
reads, and after a drop connects again with backoff (:func:`backoff`); ``status`` tells the
heartbeat how it is (``connecting``, ``connected``, ``down``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Awaitable, Callable

from stages.inputs.policy import Comment

log = logging.getLogger("mmdagent_llm")

INBOX = 1000
FIRST_RETRY, LAST_RETRY = 1.0, 30.0  # seconds between connection attempts: doubling, capped


@dataclass(frozen=True)
class Withdraw:
    """A moderator removed a comment (its id), a viewer's comments, or all of them."""
    comment_id: str = ""
    viewer: str = ""
    everything: bool = False


Item = Comment | Withdraw
Emit = Callable[[Item], None]
Status = Callable[[str], None]
Source = Callable[[Emit, Status], Awaitable[None]]


def backoff() -> Callable[[bool], float]:
    """Seconds to wait before the next attempt: 1 s doubling to 30 s; a connection that worked
    (``worked``) starts over at 1 s."""
    delay = FIRST_RETRY / 2

    def next_delay(worked: bool) -> float:
        nonlocal delay
        delay = FIRST_RETRY if worked else min(LAST_RETRY, delay * 2)
        return delay
    return next_delay


class Feeds:
    def __init__(self, sources: dict[str, Source]) -> None:
        self.sources = sources
        self.status = {name: "connecting" for name in sources}
        self.inbox: collections.deque[Item] = collections.deque()
        self.overflow = 0
        self._lock = threading.Lock()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sources", daemon=True)

    def fileno(self) -> int:
        """The read end to poll: readable when the inbox has something."""
        return self._wake_read.fileno()

    def start(self) -> None:
        self._thread.start()

    def _emit(self, item: Item) -> None:
        with self._lock:
            was_empty = not self.inbox
            self.inbox.append(item)
            if len(self.inbox) > INBOX:
                self.inbox.popleft()
                self.overflow += 1
        if was_empty:
            try:
                self._wake_write.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # a wake-up is pending already

    def take(self) -> list[Item]:
        """Everything the sources brought since the last call (from the stage's thread)."""
        try:
            while self._wake_read.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._lock:
            items = list(self.inbox)
            self.inbox.clear()
        return items

    def _run(self) -> None:
        asyncio.run(self._all())

    async def _all(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        if self._stopping:  # stop() came before the loop ran
            return
        tasks = [asyncio.create_task(self._one(name, source)) for name, source in self.sources.items()]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, name: str, source: Source) -> None:
        def status(state: str) -> None:
            self.status[name] = state
        while True:
            try:
                await source(self._emit, status)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in a source must not end the others: logged, started again
                log.exception("%s: the source failed; starting it again in %.0f s", name, LAST_RETRY)
                status("down")
                await asyncio.sleep(LAST_RETRY)

    def stop(self, timeout: float = 5.0) -> None:
        """End the sources (their connections closed) and the thread, within ``timeout``."""
        self._stopping = True
        if self._loop is not None and self._main is not None:
            try:
                self._loop.call_soon_threadsafe(self._main.cancel)
            except RuntimeError:
                pass  # the loop has ended already
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._wake_read.close()
        self._wake_write.close()
