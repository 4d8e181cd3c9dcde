"""Conversation history on disk: one JSON file per session, so a restarted llm stage goes on
with the same conversation.

The file holds a format version, the session name (for people reading it), the summary of the
exchanges folded out of it (:mod:`stages.llm.summary`), the user/assistant pairs, and the SHA-256
of the canonical JSON of the summary and the pairs, so a truncated or altered file is noticed::

    {"format": "mmdagent-llm-history", "version": 2, "session": "default",
     "summary": {"text": "...", "exchanges": 12},
     "pairs": [[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]],
     "sha256": "..."}

Version 1 files (no summary; the checksum covers the pairs alone) are read as they are.

Writing is crash-safe: the new content goes to a temporary file in the same folder, is flushed
and fsynced, then atomically replaces the old file (``os.replace``), and the folder is fsynced
(POSIX) so the rename itself survives a power loss. A crash at any point leaves either the old
file or the new one, never a mix.

Nothing here raises for bad content or a failing disk. A corrupt file is reported with one
error line (the file and the reason), kept as ``<name>.corrupt-<timestamp>`` for the user (one
that cannot be read at all as ``<name>.unreadable-<timestamp>``), and the conversation starts
fresh. A failing save is reported once per reason (again after a save has succeeded in
between), and the conversation goes on in memory.

The store remembers the file as it last loaded or saved it (inode, size, modification time), so
a change by another program (``mmdagent-llm history --clear``, an edit) is noticed before the
next save (:meth:`HistoryStore.outside_change`) instead of being overwritten by what this process
holds in memory. With an :class:`~stages.llm.history_archive.Archive`, pairs the limits trim at
start-up are copied there first (:meth:`HistoryStore.archive_copy`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

from broker.config import safe_name, state_dir
from broker.curve import make_folders

log = logging.getLogger("mmdagent_llm")

FORMAT = "mmdagent-llm-history"
VERSION = 2
READS = (1, 2)
#: ``[llm] history_file`` value that keeps the history in memory only
MEMORY_ONLY = "none"

Pair = tuple[dict, dict]
#: copies a file's pairs into the archive before the file loses some: (path, pairs, session) -> the copy
ArchiveCopy = Callable[[Path, list[Pair], str | None], Path | None]
#: what identifies one version of the file: inode, size, modification time (ns)
Fingerprint = tuple[int, int, int]


class CorruptHistory(ValueError):
    """The file's content cannot be used; the message is the reason."""


@dataclass
class Conversation:
    """What a history file holds."""
    pairs: list[Pair] = field(default_factory=list)
    summary: str = ""  # of the exchanges folded out of ``pairs``
    folded: int = 0    # how many exchanges the summary covers


def canonical(pairs: Iterable[Pair], summary: dict | None = None) -> bytes:
    """The bytes the checksum covers: the pairs (version 1), or the summary and the pairs
    (version 2), as compact, key-sorted UTF-8 JSON."""
    data: Any = [[user, assistant] for user, assistant in pairs]
    if summary is not None:
        data = {"summary": summary, "pairs": data}
    return json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def checksum(pairs: Iterable[Pair], summary: dict | None = None) -> str:
    return hashlib.sha256(canonical(pairs, summary)).hexdigest()


def default_path(session: str) -> Path:
    """The per-session history file in the user's state folder."""
    return state_dir() / f"history-{safe_name(session)}.json"


def content_path(session: str, folder: Path) -> Path:
    """The history file of one content (its ``.mdf`` folder) in ``session``: what the plugin
    uses, so that two avatars' contents never share a conversation."""
    resolved = str(folder.expanduser().resolve())
    tag = hashlib.sha256(resolved.encode("utf-8")).hexdigest()[:12]
    return state_dir() / f"history-{safe_name(session)}-{safe_name(folder.resolve().name)[:24]}-{tag}.json"


def console_path(session: str) -> Path:
    """The console's own history file (started fresh unless ``console --continue``)."""
    return state_dir() / f"history-{safe_name(session)}-console.json"


def path_for(cfg: dict[str, dict[str, Any]]) -> Path | None:
    """The file ``[llm] history_file`` names (None: memory only)."""
    value = str(cfg["llm"].get("history_file", "")).strip()
    if value.lower() == MEMORY_ONLY:
        return None
    return Path(value).expanduser() if value else default_path(cfg["bus"]["session"])


def store_for(cfg: dict[str, dict[str, Any]], archive: ArchiveCopy | None = None) -> HistoryStore | None:
    """The store ``[llm] history_file`` asks for: ``"none"`` = memory only (None); ``""`` = the
    default file of ``[bus] session`` (:func:`default_path`); anything else = that path. Pairs
    trimmed at start-up go to ``archive`` first (the llm gives
    :meth:`stages.llm.history_archive.Archive.copy_in`)."""
    path = path_for(cfg)
    return None if path is None else HistoryStore(path, session=cfg["bus"]["session"], archive=archive)


class HistoryStore:
    """Load and save the user/assistant pairs of one session in ``path``."""

    def __init__(self, path: Path | str, *, session: str | None = None, archive: ArchiveCopy | None = None) -> None:
        self.path = Path(path)
        self.session = session
        self.archive = archive
        self._reported: set[str] = set()  # save failures already logged (cleared by a success)
        self._seen: Fingerprint | None = None  # the file as this store last loaded or saved it

    def __repr__(self) -> str:
        return f"HistoryStore({str(self.path)!r})"

    # -- loading -------------------------------------------------------------------------

    def load(self) -> Conversation | None:
        """The saved conversation; None if there is no file; an empty one (after one error line)
        if the file is corrupt, which is then kept renamed to ``<name>.corrupt-<timestamp>``, or cannot be
        read (a file then kept as ``<name>.unreadable-<timestamp>``)."""
        self._remove_stale_temps()
        self._seen = None
        try:
            with open(self.path, "rb") as f:
                self._seen = _fingerprint(os.fstat(f.fileno()))
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            # a file that is there but cannot be read would be replaced by the next save: kept aside
            where = f"; {self._keep_aside('unreadable')}" if os.path.isfile(self.path) else ""
            log.error("history file %s cannot be read (%s)%s: starting a fresh conversation",
                      self.path, exc.strerror or exc, where)
            return Conversation()
        try:
            return read(raw)
        except CorruptHistory as exc:
            log.error("history file %s is corrupt (%s); %s; starting a fresh conversation",
                      self.path, exc, self._keep_aside("corrupt"))
            return Conversation()

    def _keep_aside(self, why: str) -> str:
        """Rename the file to ``<name>.<why>-<timestamp>`` beside it; what became of it, for the log."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        try:
            kept = move_aside(self.path, self.path.parent, f"{self.path.name}.{why}-{stamp}")
        except OSError:
            kept = None
        if kept is None:
            return "could not be renamed"
        self._seen = None
        return f"kept as {kept.name}"

    def outside_change(self) -> Conversation | None:
        """The file's conversation now (an empty one if it is gone), if another program changed it since this
        store last loaded or saved it (``mmdagent-llm history --clear``, an edit, a copy put in
        its place); None if it did not, or if that cannot be told (the file cannot be looked at)."""
        try:
            now: Fingerprint | None = _fingerprint(os.stat(self.path))
        except FileNotFoundError:
            now = None
        except OSError:
            return None  # unknown is not a change: what is in memory is kept
        if now == self._seen:
            return None
        theirs = self.load() or Conversation()
        log.warning("history file %s was %s by another program since this process last saved it: going on "
                    "from it (%d exchanges), not overwriting it", self.path,
                    "removed" if now is None else "replaced", len(theirs.pairs))
        return theirs

    def archive_copy(self, pairs: list[Pair]) -> Path | None:
        """Copy ``pairs``, the file's conversation, into the archive before the file loses some
        (None: there is no archive, or the copy failed, which is logged)."""
        if self.archive is None:
            return None
        return self.archive(self.path, pairs, self.session)

    def _remove_stale_temps(self) -> None:
        """Temporary files a crash in the middle of :meth:`save` left behind."""
        try:
            for stale in self.path.parent.glob(f".{glob.escape(self.path.name)}.*.tmp"):
                stale.unlink(missing_ok=True)
        except OSError:
            pass

    # -- saving --------------------------------------------------------------------------

    def save(self, conversation: Conversation) -> None:
        """Replace the file's content with ``conversation``, atomically. Never raises."""
        tmp: str | None = None
        try:
            data = encode(conversation.pairs, self.session, conversation.summary, conversation.folded)
            folder = self.path.parent
            make_folders(folder)
            tmp = write_temp(folder, self.path.name, data)
            written = _fingerprint(os.stat(tmp))  # the rename keeps it; known to us alone until then
            os.replace(tmp, self.path)
            tmp = None
            self._seen = written
            fsync_dir(folder)
        except (OSError, TypeError, ValueError) as exc:
            reason = (f"{type(exc).__name__} errno {exc.errno}" if isinstance(exc, OSError) and exc.errno
                      else type(exc).__name__)
            if reason not in self._reported:
                self._reported.add(reason)
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                log.error("history file %s cannot be saved (%s): the conversation goes on in "
                          "memory only until a save succeeds", self.path, detail)
            return
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        if self._reported:
            log.info("history file %s saved again", self.path)
            self._reported.clear()


def encode(pairs: Iterable[Pair], session: str | None = None, summary: str = "", folded: int = 0) -> bytes:
    """The file's bytes for ``pairs`` and the ``summary`` of ``folded`` exchanges before them."""
    pairs = [(user, assistant) for user, assistant in pairs]
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    if session is not None:
        doc["session"] = session
    doc["summary"] = {"text": summary, "exchanges": folded}
    doc["pairs"] = [[user, assistant] for user, assistant in pairs]
    doc["sha256"] = checksum(pairs, doc["summary"])
    return (json.dumps(doc, ensure_ascii=False, indent=1) + "\n").encode("utf-8")


def decode(raw: bytes) -> list[Pair]:
    """The pairs in the file's bytes; :class:`CorruptHistory` says why they cannot be used."""
    return read(raw).pairs


def read(raw: bytes) -> Conversation:
    """The conversation in the file's bytes; :class:`CorruptHistory` says why it cannot be used."""
    if not raw.strip():
        raise CorruptHistory("empty file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptHistory(f"not valid UTF-8 at byte {exc.start}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip()):
            raise CorruptHistory("truncated JSON (the file ends too early)") from None
        raise CorruptHistory(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CorruptHistory("not an mmdagent-llm history file")
    version = doc.get("version")
    if type(version) is not int or version not in READS:
        raise CorruptHistory(f"format version {version!r}, this program reads versions {READS[0]}-{READS[-1]}")
    summary = doc.get("summary") if version >= 2 else None
    if version >= 2 and not (isinstance(summary, dict) and isinstance(summary.get("text"), str)
                             and type(summary.get("exchanges")) is int and summary["exchanges"] >= 0):
        raise CorruptHistory("wrong structure: 'summary' is not a text and a number of exchanges")
    items = doc.get("pairs")
    if not isinstance(items, list):
        raise CorruptHistory("wrong structure: 'pairs' is not a list")
    pairs: list[Pair] = []
    for i, item in enumerate(items):
        if not (isinstance(item, list) and len(item) == 2
                and _is_message(item[0], "user") and _is_message(item[1], "assistant")):
            raise CorruptHistory(f"wrong structure: pair {i} is not a user and an assistant message")
        pairs.append((item[0], item[1]))
    if doc.get("sha256") != checksum(pairs, summary):
        raise CorruptHistory("checksum mismatch: the content was changed or damaged")
    if summary is None:
        return Conversation(pairs)
    return Conversation(pairs, summary["text"], summary["exchanges"])


def _is_message(m: Any, role: str) -> bool:
    return isinstance(m, dict) and m.get("role") == role and isinstance(m.get("content"), str)


def write_temp(folder: Path, name: str, data: bytes) -> str:
    """A new owner-only temporary file ``.<name>.*.tmp`` in ``folder`` holding ``data``, flushed
    to the disk: what is then renamed into place. Removed again if writing fails."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def move_aside(src: Path | str, folder: Path, stem: str, suffix: str = "") -> Path | None:
    """Rename ``src`` to ``folder/<stem><suffix>``, or ``<stem>-<n><suffix>`` when that is taken:
    never over an existing file. OSError if it cannot be renamed; None if every name is taken."""
    for n in range(100):
        target = folder / (f"{stem}-{n}{suffix}" if n else f"{stem}{suffix}")
        if target.exists():
            continue
        try:
            os.rename(src, target)  # not replace: never over an older copy (Windows refuses; POSIX: checked above)
            return target
        except FileExistsError:
            continue
    return None


def _fingerprint(st: os.stat_result) -> Fingerprint:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
