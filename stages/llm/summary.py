"""Folding the oldest exchanges of the history into a summary, by the LLM, in the background.

- **When** (:class:`Summaries`, the llm stage's part): after a turn ended and when the llm stage starts, if
  :meth:`~stages.llm.history.History.fold_due` names pairs to fold and :class:`Folding` allows
  it: one request at a time; after a failure, again :data:`RETRY` seconds later (whether or not
  a turn ends meanwhile), doubling up to :data:`RETRY_MAX`.
- **How**: :class:`Summarizer`, a thread with a client (and connections) of its own, so the next
  turn's request neither waits for it nor finds the connection kept open for it taken. One
  request, not streamed, the model of ``[llm] model``, at most ``[llm] turn_timeout`` seconds:
  :data:`PROMPT` as the system message, the summary so far and the exchanges to fold as the
  user's (:func:`messages`). An answer cut off by the user is in them as it is in the history,
  only what was heard and ``[interrupted]``, and the prompt says what that means.
- **The result** goes to the stage loop, which hands it to
  :meth:`~stages.llm.history.History.fold` (saved with the history, in the system prompt of the
  next requests) and publishes a ``summary`` event.
- **Failure** (an error, the deadline, an empty answer) leaves the history as it was, with one
  log line and a ``summary`` event saying so: the pairs wait, outside the request if need be,
  for the next attempt. An llm stage that ends (or is killed) in the middle loses nothing either: its file
  still holds them, and the next process folds them when it starts.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import openai

from broker import wire
from stages.llm.history import History
from stages.llm.history_store import Pair

log = logging.getLogger("mmdagent_llm")

RETRY = 5.0        # seconds after a failure before the next attempt (doubling)
RETRY_MAX = 300.0  # at most this long between attempts

PROMPT = (
    "You keep the memory of a spoken conversation between a user and an avatar. Rewrite the summary "
    "so far and the exchanges below into one new summary, in the language of the conversation, at "
    "most {limit} characters. Keep what matters later: names, facts about the user, preferences, "
    "what was promised or planned, questions left open. Leave out greetings and small talk. An "
    "answer ending in [interrupted] was cut off by the user: only the words before it were said. "
    "Write plain sentences: no lists, no headings, nothing else.")


def messages(summary: str, pairs: list[Pair], limit: int) -> list[dict]:
    """The summarizer's request: the summary so far and ``pairs`` into one of at most ``limit`` characters."""
    lines = [f"{'User' if m['role'] == 'user' else 'Avatar'}: {m['content']}" for pair in pairs for m in pair]
    return [{"role": "system", "content": PROMPT.format(limit=limit)},
            {"role": "user", "content": f"Summary so far:\n{summary or '(none)'}\n\nExchanges to add:\n"
                                        + "\n".join(lines)}]


class Folding:
    """Whether a fold may start now: one at a time, and a pause after failures."""

    def __init__(self) -> None:
        self.running = False
        self.failures = 0  # in a row
        self.not_before = 0.0  # time.monotonic()

    def may_start(self, now: float) -> bool:
        return not self.running and now >= self.not_before

    def started(self) -> None:
        self.running = True

    def retry_at(self) -> float | None:
        """When a failed summary is to be asked again (``time.monotonic()``); None: none failed."""
        return self.not_before if self.failures and not self.running else None

    def settled(self) -> None:
        """Nothing is left to fold: no retry is owed."""
        if not self.running:
            self.failures, self.not_before = 0, 0.0

    def ended(self, now: float, ok: bool) -> None:
        self.running = False
        self.failures = 0 if ok else self.failures + 1
        self.not_before = now + min(RETRY * 2 ** (self.failures - 1), RETRY_MAX) if self.failures else 0.0


class Summarizer(threading.Thread):
    """Asks for one summary; ``report(text, None)`` with it, or ``report(None, exc)``, on this thread."""

    def __init__(self, client: openai.OpenAI, model: str, temperature: float, request: list[dict],
                 timeout: float, report: Callable[[str | None, Exception | None], None]) -> None:
        super().__init__(name="summarizer", daemon=True)
        self.client, self.model, self.temperature = client, model, temperature
        self.request, self.timeout, self.report = request, timeout, report

    def run(self) -> None:
        try:
            completion = self.client.chat.completions.create(
                model=self.model, messages=self.request, temperature=self.temperature, timeout=self.timeout)
            text = (completion.choices[0].message.content or "") if completion.choices else ""
            if not text.strip():
                raise ValueError("the server answered with an empty summary")
        except Exception as exc:
            self.report(None, exc)
            return
        self.report(text, None)


class Summaries:
    """The llm stage's part: asks when the history and :class:`Folding` allow it, and takes the
    outcome on the stage's loop. ``client()`` makes the summarizer's own client (when first
    needed), ``send(data)`` hands ``data`` from the summarizer's thread to the loop, which gives it
    to :meth:`took`; ``publish(body)`` publishes a ``summary`` event; ``describe(exc)`` is a
    failure's line (without secrets)."""

    def __init__(self, llm_cfg: dict[str, Any], history: History, client: Callable[[], openai.OpenAI],
                 send: Callable[[Any], None], publish: Callable[[dict], None],
                 describe: Callable[[BaseException], str]) -> None:
        self.cfg, self.history, self.make_client = llm_cfg, history, client
        self.send, self.publish, self.describe = send, publish, describe
        self.folding = Folding()
        self.client: openai.OpenAI | None = None
        self.outcomes = {True: 0, False: 0}  # since start

    def retry_at(self) -> float | None:
        return self.folding.retry_at()

    def info(self) -> dict[str, int]:
        """For the heartbeat."""
        return {"exchanges": self.history.folded, "characters": len(self.history.summary),
                "ok": self.outcomes[True], "failed": self.outcomes[False]}

    def ask(self) -> None:
        """Ask for a summary of the oldest exchanges, if the history needs one and none is running."""
        n = self.history.fold_due()
        if not n:
            self.folding.settled()  # (the history was cleared meanwhile): no retry is owed
            return
        if not self.folding.may_start(time.monotonic()):
            return
        if self.client is None:
            self.client = self.make_client()
        asked = [(dict(user), dict(assistant)) for user, assistant in self.history.pairs[:n]]
        request = messages(self.history.summary, asked, self.history.summary_tokens)
        log.info("summarizing the %d oldest exchanges in the background", n)
        self.folding.started()

        def report(text: str | None, exc: Exception | None) -> None:  # on the summarizer's thread
            self.send((asked, text, None if exc is None else self.describe(exc)))

        Summarizer(self.client, self.cfg["model"], self.cfg["temperature"], request, self.cfg["turn_timeout"],
                   report).start()

    def took(self, asked: list[Pair], text: str | None, error: str | None) -> None:
        """The summarizer's outcome for ``asked``: ``text``, or the ``error`` that stopped it."""
        self.folding.ended(time.monotonic(), text is not None)
        self.outcomes[text is not None] += 1
        if text is None:
            log.warning("summarizing %d exchanges failed (%s): the history keeps them, and asks again in %.0f s",
                        len(asked), error, max(0.0, self.folding.not_before - time.monotonic()))
            self.publish({"ok": False, "exchanges": len(asked), "text": "", "error": str(error)[:300]})
            return
        if not self.history.fold(asked, text):
            log.info("the history changed while it was summarized (cleared or replaced): the summary is dropped")
            return
        log.info("folded %d exchanges into the summary (%d characters; %d exchanges in all so far)",
                 len(asked), len(self.history.summary), self.history.folded)
        self.publish({"ok": True, "exchanges": len(asked), "text": self.history.summary[:wire.SUMMARY_MAX],
                      "error": ""})
        self.ask()  # a history far over its limits (a long outage) may need more than one
