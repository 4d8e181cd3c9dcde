"""Conversation history for the chat completion request.

The system prompt is always first, followed by the long-term memory's facts (``notes``) and the
summary of the exchanges folded out of the history (:mod:`stages.llm.summary`). A turn is added
only when it ends, as a user/assistant pair, so the history is never left with a question and no
answer (a failed turn that produced nothing adds nothing). An answer the user cut off keeps only
what was actually spoken, followed by `` [interrupted]`` (just ``[interrupted]`` if nothing was).

Two limits, counted the model's way (:mod:`stages.llm.tokens`): a request holds at most
``max_turns`` pairs and about ``max_tokens`` tokens in all (the system prompt, the facts, the
summary, the pairs and the new utterance): the newest pairs that fit (:meth:`History.request`).

What happens to the older pairs:
- With ``summarize``: they stay in the history until the LLM folded them into the summary
  (:meth:`History.fold_due` says how many, once the pairs pass ``max_turns`` or
  :data:`FOLD_AT` of the budget, enough that what is left fills about half of each;
  :meth:`History.fold` takes the result). A summarizer that keeps failing costs nothing of the
  conversation: the pairs wait, outside the request, up to :data:`UNFOLDED` times the limits;
  past that the whole conversation is copied into the archive before the oldest leave.
- Without: the oldest leave the history as soon as they are outside the limits (the official
  samples' way).

With a :class:`~stages.llm.history_store.HistoryStore`, the conversation is loaded when the
history is created and saved after every change, so a restarted llm stage goes on with the same
conversation. Nothing on disk is lost to a change of settings: when the limits were lowered and
the file holds more than they allow, its whole conversation is copied into the archive
(:mod:`stages.llm.history_archive`) before the file is trimmed. And the file is followed: if
another program changed it since the last save (``mmdagent-llm history --clear``, an edit), the
next request and the next change go on from the file as it is, instead of writing back what
this process held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from stages.llm.history_store import Conversation, Pair
from stages.llm.tokens import TokenCounter

if TYPE_CHECKING:
    from stages.llm.history_store import HistoryStore

FOLD_AT = 0.75  # share of the token budget the history may fill before its oldest pairs are folded
KEEP = 1        # newest pairs never folded: the last one may still be cut short by a late cancel
UNFOLDED = 4    # times the limits the pairs may reach while the summarizer fails, before any leave
SUMMARY_SHARE = 0.25  # of the token budget, at most, for the summary


class History:
    def __init__(self, system_prompt: str, max_turns: int, max_tokens: int,
                 store: HistoryStore | None = None, notes: Callable[[], str] | None = None,
                 counter: TokenCounter | None = None, summarize: bool = False) -> None:
        self.system = {"role": "system", "content": system_prompt}
        self.notes = notes  # more of the system prompt, asked anew for each request (long-term memory)
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self.counter = counter or TokenCounter("")
        self.summarize = summarize
        self.store = store
        self.pairs: list[Pair] = []
        self.summary = ""
        self.folded = 0  # exchanges the summary covers
        if store is not None:
            self._adopt(store.load() or Conversation())

    @property
    def summary_tokens(self) -> int:
        """The most the summary may take of the request."""
        return max(16, int(self.max_tokens * SUMMARY_SHARE))

    def _adopt(self, conversation: Conversation) -> None:
        """Go on from the file's ``conversation``; if the limits leave some of it out, its whole
        conversation is copied into the archive before the trimmed one is saved."""
        self.pairs, self.summary, self.folded = list(conversation.pairs), conversation.summary, conversation.folded
        if self._trim():
            assert self.store is not None
            self.store.archive_copy(conversation.pairs)
            self._save()

    def follow(self) -> None:
        """Take the file as it is if another program changed it since this history last saved it."""
        if self.store is not None:
            theirs = self.store.outside_change()
            if theirs is not None:
                self._adopt(theirs)

    def request(self, user_text: str) -> list[dict]:
        """The messages to send for a new utterance: the head, the newest pairs within both limits,
        the utterance (the history is not changed, except that a file changed by another program
        is followed first)."""
        self.follow()
        head, ask = self._head(), {"role": "user", "content": user_text}
        room = self.max_tokens - self.counter.messages([head, ask])
        kept: list[dict] = []
        for user, assistant in reversed(self.pairs[max(0, len(self.pairs) - self.max_turns):]):
            room -= self.counter.message(user) + self.counter.message(assistant)
            if room < 0:
                break
            kept[:0] = [user, assistant]
        return [head, *kept, ask]

    def _head(self) -> dict:
        parts = [self.system["content"], self.notes() if self.notes is not None else ""]
        if self.summary:
            parts.append(f"これまでの会話の要約（古い{self.folded}回のやりとり）:\n{self.summary}")
        return {**self.system, "content": "\n".join(p for p in parts if p)}

    def add(self, user_text: str, answer: str, *, interrupted: bool = False) -> None:
        """Record a finished turn. ``interrupted``: the user cut the answer off after ``answer``."""
        self.follow()
        self.pairs.append(({"role": "user", "content": user_text},
                           {"role": "assistant", "content": _content(answer, interrupted)}))
        before = list(self.pairs)
        if self._trim() and self.summarize and self.store is not None:
            self.store.archive_copy(before)  # the summarizer has failed for long: nothing leaves unkept
        self._save()

    def revise_last(self, user_text: str, answer: str) -> bool:
        """The last turn was cut off after all: keep only ``answer``, marked interrupted.

        False (and nothing changed) if the last pair is not the one for ``user_text``: it was
        trimmed away, never added, or cleared by another program since."""
        self.follow()
        if not self.pairs or self.pairs[-1][0]["content"] != user_text:
            return False
        self.pairs[-1][1]["content"] = _content(answer, True)
        self._save()
        return True

    def tokens(self) -> int:
        """The size of the head and every pair held."""
        return self.counter.messages([self._head(), *(m for pair in self.pairs for m in pair)])

    def _pair_tokens(self) -> list[int]:
        return [self.counter.message(user) + self.counter.message(assistant) for user, assistant in self.pairs]

    def _trim(self) -> bool:
        """Drop the oldest pairs over the limits (with ``summarize``: over :data:`UNFOLDED` times
        them, and then down to twice them); True if any were dropped."""
        scale = UNFOLDED if self.summarize else 1
        costs = self._pair_tokens()
        total = self.counter.message(self._head()) + sum(costs)
        if len(costs) <= self.max_turns * scale and total <= self.max_tokens * scale:
            return False
        scale = 2 if self.summarize else 1  # what the summarizer could not fold leaves in one go, not turn by turn
        n = 0
        while n < len(costs) and (len(costs) - n > self.max_turns * scale or total > self.max_tokens * scale):
            total -= costs[n]
            n += 1
        del self.pairs[:n]
        return n > 0

    def fold_due(self) -> int:
        """How many of the oldest pairs to fold into the summary now; 0: none (no ``summarize``,
        or the pairs fill less than :data:`FOLD_AT` of the budget and at most ``max_turns``)."""
        if not self.summarize or len(self.pairs) <= KEEP:
            return 0
        costs = self._pair_tokens()
        head = self.counter.message(self._head())
        rest = sum(costs)
        if len(costs) <= self.max_turns and head + rest <= self.max_tokens * FOLD_AT:
            return 0
        n = 0
        while n < len(costs) - KEEP and (len(costs) - n > self.max_turns // 2 or head + rest > self.max_tokens // 2):
            rest -= costs[n]
            n += 1
        return n

    def fold(self, asked: list[Pair], summary: str) -> bool:
        """The summarizer's ``summary`` of the summary so far and ``asked``, the oldest pairs when it
        was asked: they leave the history, the summary takes their place. False (nothing changed)
        if the history no longer begins with them (cleared or replaced meanwhile)."""
        self.follow()
        if not asked or self.pairs[:len(asked)] != asked:
            return False
        del self.pairs[:len(asked)]
        self.summary = self._within(summary.strip())
        self.folded += len(asked)
        self._save()
        return True

    def _within(self, text: str) -> str:
        """``text`` cut to :attr:`summary_tokens` (a summarizer may write more than asked)."""
        while text and self.counter.text(text) > self.summary_tokens:
            text = text[:max(1, len(text) * 9 // 10)]
        return text

    def _save(self) -> None:
        if self.store is not None:
            self.store.save(Conversation(self.pairs, self.summary, self.folded))


def _content(answer: str, interrupted: bool) -> str:
    return f"{answer} [interrupted]".lstrip() if interrupted else answer
