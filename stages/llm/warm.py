"""When the llm stage opens a connection to the LLM server ahead of a turn, so that no turn pays
a TCP or TLS handshake on the user's time: the decisions, without I/O (the stage carries them
out: :class:`stages.llm.llm.LlmStage`; the HTTP side is :mod:`stages.llm.llm_http`).

How: the connection is opened by a real request through the client's own pool,
``GET {base_url}/models`` (:func:`stages.llm.llm_http.open_ahead`), which leaves it open in the
pool for the next turn. That is the cheapest robust way: it takes the very path a turn takes
(proxy, TLS settings, certificate checks, ALPN), so what it opens is what a turn uses, by
construction. A spare TCP/TLS stream opened by the network backend itself, with no request,
would be invisible to the server but would have to copy what the pool does (TLS context and
ALPN, and through a proxy the CONNECT tunnel), and could hand a turn a stream made differently
from the one the pool would make. The price is one small request per opening, which a server
may answer 401 or 404 (the connection stays open all the same). Whether a connection waits
open is asked of the sockets themselves (:meth:`stages.llm.llm_http.Connections.warm`): no
request, a ``select`` of a few sockets.

When, by :class:`Warmth`:
- at start; again at once after a request was cut off (barge-in, cancel, timeout) or failed;
- whenever the user starts speaking (``mmd.RECOG_EVENT_START``): a turn is about to need it;
- every :data:`CHECK_EVERY` seconds while idle, as servers close idle connections (uvicorn
  after 5 s, nginx after 75 s);
- never while a turn's request runs (it has its connection), never two at a time; after a
  failed opening, again after 3, 6, 12 ... up to 60 s (or when the user starts speaking).
A turn whose request starts while an opening is under way waits for it, :data:`TURN_WAITS` at
most: its handshake is already under way, a second connection would start one from nothing.

Only for servers where a handshake costs something (:func:`worth_keeping_warm`). Logged, never
per look: a failed opening once, until one works again (a line then too); each opening after a
request was cut off or failed; an opening after the server closed the idle connection the first
time only (a server closing them after 5 s would otherwise write a line every few seconds).
"""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit

CHECK_EVERY = 3.0   # seconds between looks at the connection while idle
RETRY_MAX = 60.0    # the longest wait between openings that fail
OPEN_TIMEOUT = 5.0  # seconds an opening may take (connect, then the answer)
TURN_WAITS = 0.5    # seconds a turn's request waits for an opening under way rather than make its own

Line = tuple[int, str]  # a log level and message


def worth_keeping_warm(base_url: str) -> bool:
    """Whether connections to ``base_url`` are worth opening ahead of turns: TLS (two round trips
    and a certificate check before the first byte of a request) or another machine. Not plain
    HTTP on this machine's loopback (Ollama, llama.cpp, vLLM at ``http://localhost``, the offline
    responder): its handshake costs a tenth of a millisecond, and reopening what llama.cpp and
    vLLM close after 5 s idle would write a request into their logs every few seconds."""
    parts = urlsplit(base_url)
    if parts.scheme != "http":
        return True
    host = (parts.hostname or "").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: another machine
        return True


# why a connection is to be opened again, as the log line says it
CUT, FAILED, UNREACHABLE, IDLE = "cut", "failed", "unreachable", "idle"
_BECAUSE = {CUT: "the last request was cut off", FAILED: "the last request failed",
            UNREACHABLE: "it could not be opened before"}


class Warmth:
    """What to do about the connection, from what the stage tells: call :meth:`due` on each tick,
    and when it is true look (:meth:`looked`); open one when that says so and tell the outcome
    (:meth:`opened`); tell :meth:`soon` what makes a look urgent, :meth:`used` when a turn's
    request ended well. Times are ``time.monotonic()``."""

    def __init__(self, where: str) -> None:
        self.where = where            # the server as the logs name it
        self.next_look = 0.0          # at start: at once
        self.opening = False
        self.warm = False             # it was open at the last look or opening
        self.why = ""                 # why it is to be opened again ("" at start): CUT, FAILED, UNREACHABLE, IDLE
        self.failures = 0             # openings that failed in a row
        self.idle_since = 0.0         # when it last carried a request
        self.idle_for = 0.0           # how long it had been idle when found closed
        self.idle_close_told = False  # the server's closing of idle connections was logged

    def due(self, now: float, busy: bool) -> bool:
        """Whether to look now. ``busy``: a turn's request is running."""
        return not busy and not self.opening and now >= self.next_look

    def next_deadline(self) -> float | None:
        return None if self.opening else self.next_look

    def soon(self, why: str = "") -> None:
        """Look at the next tick: the user started speaking (no ``why``), or the connection was
        lost, ``why`` saying how (:data:`CUT`, :data:`FAILED`)."""
        self.next_look = 0.0
        if why:
            self.why, self.warm = why, False

    def used(self, now: float) -> None:
        """A turn's request ended well: its connection is back in the pool, idle from ``now``."""
        self.warm, self.why, self.idle_since = True, "", now
        self.next_look = now + CHECK_EVERY

    def looked(self, now: float, warm: bool) -> bool:
        """Whether to open a connection, now that one was (``warm``) or was not found open."""
        if warm:
            self.warm, self.why = True, ""
            self.next_look = now + CHECK_EVERY
            return False
        if self.warm:  # open at the last look, closed now, and nobody here closed it: the server did
            self.why, self.idle_for, self.warm = IDLE, now - self.idle_since, False
        self.opening = True
        return True

    def opened(self, now: float, error: str | None) -> Line | None:
        """The opening ended, ``error`` None if a connection is open now; the line to log, if any."""
        self.opening = False
        if error is not None:
            self.failures += 1
            self.next_look = now + min(RETRY_MAX, CHECK_EVERY * 2 ** (self.failures - 1))
            self.why = UNREACHABLE
            if self.failures > 1:
                return None
            return (logging.WARNING, f"cannot open a connection to {self.where} ahead of the next turn: {error}; "
                                     f"trying again, at longest every {RETRY_MAX:.0f} s (a line when it works)")
        why, self.why = self.why, ""
        self.failures, self.warm, self.idle_since = 0, True, now
        self.next_look = now + CHECK_EVERY
        if why == IDLE:
            if self.idle_close_told:
                return None
            self.idle_close_told = True
            return (logging.INFO, f"connection to {self.where} reopened ahead of the next turn: the server closed "
                                  f"it after {self.idle_for:.0f} s idle or less (it closes idle connections; they "
                                  "are reopened without a line from now on)")
        if why:
            return (logging.INFO, f"connection to {self.where} reopened ahead of the next turn ({_BECAUSE[why]})")
        return None  # the first, at start
