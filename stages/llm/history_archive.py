"""Earlier conversations, kept: the ``conversations`` folder in the user's state folder.

A conversation is never silently deleted. A new console conversation moves the last one here
(:meth:`Archive.set_aside`), and a history file that lowered ``[llm] history_turns`` or
``history_tokens`` trim at start-up is copied here first (:meth:`Archive.copy_in`). Each is a
history file of the usual format (:mod:`stages.llm.history_store`), named ``<the history file's
name>-<UTC time>.json`` (e.g. ``history-default-console-20250601T120000Z.json``), owner-only: the
folder 0700, the files 0600.

At most ``[llm] archive_keep`` conversations are kept: when one comes in, the oldest beyond that
number are removed (oldest by their last exchange, the file's modification time, which a move
keeps and a copy is given). 0 keeps none. ``mmdagent-llm history --archive`` lists and shows them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker import config as config_mod
from broker import curve
from stages.llm.history_store import CorruptHistory, Pair, decode, encode, fsync_dir, move_aside, write_temp

log = logging.getLogger("mmdagent_llm")

FOLDER = "conversations"


@dataclass(frozen=True)
class Entry:
    """One archived conversation."""
    path: Path
    when: float  # its last exchange (the file's modification time)
    exchanges: int | None  # None: it cannot be read
    problem: str = ""  # why it cannot be read


class Archive:
    """The archived conversations in ``folder``, at most ``keep`` of them."""

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder, self.keep = folder, keep

    def __repr__(self) -> str:
        return f"Archive({str(self.folder)!r}, keep={self.keep})"

    def set_aside(self, path: Path) -> tuple[Path | None, int | None]:
        """Make room for a new conversation in ``path``: the one there is moved into the archive.
        Returns where it went (None: there was nothing to keep, or ``keep`` is 0 and it was
        removed) and its number of exchanges (None: it cannot be read; it is moved all the same).
        No file, or one without exchanges, is nothing to keep: (None, 0), the empty file removed.
        Raises OSError (or ConfigError: the folder is another user's) when it cannot be moved:
        the file is then left where it is."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None, 0
        try:
            count: int | None = len(decode(raw))
        except CorruptHistory:
            count = None
        if count == 0:
            path.unlink()
            return None, 0
        if self.keep == 0:
            path.unlink()
            return None, count
        target = move_aside(path, curve.private_dir(self.folder), *self._name(path))
        if target is None:
            raise OSError(f"no free name in {self.folder}")
        _private(target)
        fsync_dir(self.folder)
        if target in self.prune():  # older than all ``keep`` kept ones
            return None, count
        return target, count

    def copy_in(self, path: Path, pairs: list[Pair], session: str | None) -> Path | None:
        """A copy of ``pairs``, the conversation in ``path``, into the archive, dated like it.
        Never raises: a failure is logged (None)."""
        if self.keep == 0:
            return None
        tmp: str | None = None
        try:
            folder = curve.private_dir(self.folder)
            tmp = write_temp(folder, path.name, encode(pairs, session))
            try:
                spoken = os.stat(path).st_mtime_ns
                os.utime(tmp, ns=(spoken, spoken))
            except OSError:
                pass  # it is dated now
            target = move_aside(tmp, folder, *self._name(path))
            if target is None:
                raise OSError(f"no free name in {folder}")
            tmp = None
            fsync_dir(folder)
        except (OSError, config_mod.ConfigError) as exc:
            log.error("could not keep a copy of %s in %s (%s): its %d exchanges beyond the history limits will "
                      "be lost at the next save", path, self.folder, getattr(exc, "strerror", None) or exc, len(pairs))
            return None
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        if target in self.prune():  # older than all ``keep`` kept ones
            return None
        log.info("history file %s holds more than [llm] history_turns/history_tokens allow: its %d exchanges "
                 "were copied to %s first", path, len(pairs), target)
        return target

    def entries(self) -> list[Entry]:
        """The archived conversations, newest first (none if the folder does not exist)."""
        found: list[Entry] = []
        try:
            files = [p for p in self.folder.iterdir() if p.suffix == ".json" and not p.name.startswith(".")]
        except OSError:
            return []
        for p in files:
            try:
                when = p.stat().st_mtime
                raw = p.read_bytes()
            except OSError as exc:
                found.append(Entry(p, 0.0, None, exc.strerror or str(exc)))
                continue
            try:
                found.append(Entry(p, when, len(decode(raw))))
            except CorruptHistory as exc:
                found.append(Entry(p, when, None, str(exc)))
        return newest_first(found)

    def prune(self) -> list[Path]:
        """Remove the oldest conversations beyond ``keep``; the ones removed."""
        removed = []
        for entry in self.entries()[self.keep:]:
            try:
                entry.path.unlink()
                removed.append(entry.path)
            except OSError as exc:
                log.warning("could not remove the old conversation %s (%s)", entry.path, exc.strerror or exc)
        return removed

    def _name(self, path: Path) -> tuple[str, str]:
        return f"{path.stem}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}", ".json"


def newest_first(entries: list[Entry]) -> list[Entry]:
    """``entries`` by their last exchange, newest first; the same time: by name, later first."""
    return sorted(entries, key=lambda e: (e.when, e.path.name), reverse=True)


def archive_of(cfg: dict[str, dict[str, Any]]) -> Archive:
    """The user's archive, bounded by ``[llm] archive_keep`` (the folder is not created here)."""
    return Archive(config_mod.state_dir() / FOLDER, cfg["llm"]["archive_keep"])


def _private(path: Path) -> None:
    """Owner-only, whatever mode the file had where it came from."""
    if os.name == "posix":
        os.chmod(path, 0o600)
