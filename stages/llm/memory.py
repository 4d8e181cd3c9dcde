"""Long-term memory: facts the conversation should keep (names, preferences, promises), in a file
a person can read and edit, beside the content's history (``memory-<...>.txt`` where the history
is ``history-<...>.json``; see :func:`path_beside`).

The file is plain UTF-8 text, one fact a line (a leading ``- `` is allowed, ``#`` lines are
notes). It is read again whenever it changed, so an edit applies from the next turn. The LLM adds
to it with the ``remember`` tool (:mod:`stages.llm.tools`); ``mmdagent-llm memory`` shows, edits,
forgets and clears it. At most :data:`MAX_FACTS` facts of :data:`MAX_FACT` characters: past that,
the oldest are dropped (the file is a memory, not a log). The facts ride in the system prompt
(:meth:`Memory.prompt`). Writes are atomic (a temporary file renamed), the file the user's only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MAX_FACTS = 50
MAX_FACT = 200  # characters


def path_beside(history: Path) -> Path:
    """The memory file of the conversation whose history file is ``history``."""
    stem = history.stem[len("history"):] if history.stem.startswith("history") else f"-{history.stem}"
    return history.with_name(f"memory{stem}.txt")


def parse(text: str) -> list[str]:
    """The facts of a memory file's text."""
    facts = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fact = " ".join(line.removeprefix("- ").split())[:MAX_FACT]
        if fact and fact not in facts:
            facts.append(fact)
    return facts[-MAX_FACTS:]


class Memory:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._facts: list[str] = []

    def facts(self) -> list[str]:
        """The facts, read again if the file changed since."""
        try:
            stat = self.path.stat()
        except OSError:
            self._seen, self._facts = None, []
            return []
        if (stat.st_mtime_ns, stat.st_size) != self._seen:
            try:
                self._facts = parse(self.path.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                return self._facts
            self._seen = (stat.st_mtime_ns, stat.st_size)
        return list(self._facts)

    def remember(self, fact: str) -> str:
        """Keep ``fact`` (one line, cut at :data:`MAX_FACT`); what happened, for the model."""
        fact = " ".join(fact.split())[:MAX_FACT]
        if not fact:
            raise ValueError("an empty fact")
        facts = self.facts()
        if fact in facts:
            return "ok: already remembered"
        facts.append(fact)
        dropped = facts[:-MAX_FACTS]
        self._write(facts[-MAX_FACTS:])
        return "ok: remembered" + (f" (forgot the oldest: {dropped[0][:40]})" if dropped else "")

    def forget(self, text: str) -> list[str]:
        """Drop every fact containing ``text``; the facts dropped."""
        facts = self.facts()
        gone = [f for f in facts if text and text in f]
        if gone:
            self._write([f for f in facts if f not in gone])
        return gone

    def clear(self) -> int:
        """Drop every fact; how many there were."""
        count = len(self.facts())
        if count:
            self._write([])
        return count

    def create(self) -> None:
        """Make the file (with a header saying how to write it) if there is none."""
        if not self.path.exists():
            self._write([])

    def prompt(self) -> str:
        """What the system prompt says of the facts ("" with none)."""
        facts = self.facts()
        if not facts:
            return ""
        return "あなたが覚えていること（これまでの会話から）:\n" + "\n".join(f"- {f}" for f in facts)

    def _write(self, facts: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = "# facts the avatar remembers, one a line: edit freely (mmdagent-llm memory)\n"
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".memory-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(header + "".join(f"- {f}\n" for f in facts))
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._seen, self._facts = None, []
