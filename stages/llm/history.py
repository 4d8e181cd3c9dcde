"""Conversation history for the chat completion request.

The system prompt is always first. A turn is added only when it ends, as a user/assistant
pair, so the history is never left with a question and no answer (a failed turn that
produced nothing adds nothing). An answer the user cut off keeps only what was actually
spoken, followed by `` [interrupted]`` (just ``[interrupted]`` if nothing was). It is trimmed, oldest pair first, by both limits the
official samples use: the number of pairs, and a token budget. Tokens are estimated from
characters (a CJK character is about one token, about four Latin characters are one), and
when the server reports ``usage`` for the last request that count is used instead.

With a :class:`~stages.llm.history_store.HistoryStore`, the pairs are loaded when the history is
created and saved after every change, so a restarted llm stage goes on with the same
conversation. Nothing on disk is lost to a change of settings: when the limits were lowered and
the file holds more than they allow, its whole conversation is copied into the archive
(:mod:`stages.llm.history_archive`) before the file is trimmed. And the file is followed: if
another program changed it since the last save (``mmdagent-llm history --clear``, an edit), the
next request and the next change go on from the file as it is, instead of writing back what
this process held.
"""

from __future__ import annotations

import math
import unicodedata
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from stages.llm.history_store import HistoryStore

PER_MESSAGE_TOKENS = 4  # role and framing overhead the chat format adds to every message


def estimate_tokens(text: str) -> int:
    wide = sum(1 for ch in text if unicodedata.east_asian_width(ch) in ("W", "F"))
    return wide + math.ceil((len(text) - wide) / 4) + PER_MESSAGE_TOKENS


class History:
    def __init__(self, system_prompt: str, max_turns: int, max_tokens: int,
                 store: HistoryStore | None = None, notes: Callable[[], str] | None = None) -> None:
        self.system = {"role": "system", "content": system_prompt}
        self.notes = notes  # more of the system prompt, asked anew for each request (long-term memory)
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self.store = store
        self.pairs: list[tuple[dict, dict]] = []
        if store is not None:
            self._adopt(store.load() or [])

    def _adopt(self, pairs: list[tuple[dict, dict]]) -> None:
        """Go on from ``pairs``, the file's; if the limits leave some out, the file's whole
        conversation is copied into the archive before the trimmed one is saved."""
        self.pairs = list(pairs)
        if self._trim(None):
            assert self.store is not None
            self.store.archive_copy(pairs)
            self._save()

    def follow(self) -> None:
        """Take the file as it is if another program changed it since this history last saved it."""
        if self.store is not None:
            theirs = self.store.outside_change()
            if theirs is not None:
                self._adopt(theirs)

    def request(self, user_text: str) -> list[dict]:
        """The messages to send for a new utterance (the history is not changed, except that a
        file changed by another program is followed first)."""
        self.follow()
        return self._messages() + [{"role": "user", "content": user_text}]

    def _messages(self) -> list[dict]:
        notes = self.notes() if self.notes is not None else ""
        messages = [{**self.system, "content": f"{self.system['content']}\n{notes}"} if notes else self.system]
        for user, assistant in self.pairs:
            messages += [user, assistant]
        return messages

    def add(self, user_text: str, answer: str, *, interrupted: bool = False,
            used_tokens: int | None = None) -> None:
        """Record a finished turn. ``interrupted``: the user cut the answer off after ``answer``."""
        self.follow()
        self.pairs.append(({"role": "user", "content": user_text},
                           {"role": "assistant", "content": _content(answer, interrupted)}))
        self._trim(used_tokens)
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
        return sum(estimate_tokens(m["content"]) for m in self._messages())

    def _trim(self, used_tokens: int | None) -> bool:
        """Drop the oldest pairs over the limits; True if any were dropped."""
        # used_tokens (the server's count) covers the request and the answer just added
        total = used_tokens if used_tokens is not None else self.tokens()
        before = len(self.pairs)
        while self.pairs and (len(self.pairs) > self.max_turns or total > self.max_tokens):
            user, assistant = self.pairs.pop(0)
            total -= estimate_tokens(user["content"]) + estimate_tokens(assistant["content"])
        return len(self.pairs) != before

    def _save(self) -> None:
        if self.store is not None:
            self.store.save(self.pairs)


def _content(answer: str, interrupted: bool) -> str:
    return f"{answer} [interrupted]".lstrip() if interrupted else answer
