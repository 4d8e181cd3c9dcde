"""``mmdagent-llm history [--console] [--clear | --archive [N]]``: the conversation the LLM will be
given, and the earlier ones kept.

Which history, as the pipeline would choose it:
- ``[llm] history_file`` if it is set (``"none"``: there is none on disk);
- else, run in a content's ``.mdf`` folder, the one the plugin keeps for that content
  (:func:`stages.llm.history_store.content_path`);
- ``--console``: the console's (a new console conversation moves the last one into the archive,
  unless ``console --continue``).

It prints each exchange, or with ``--clear`` deletes the file, which is not archived, and says how
many exchanges it deleted. A running llm stage notices and goes on from the cleared file at its
next turn (it does not write back what it held).

``--archive`` lists the earlier conversations kept in the archive
(:mod:`stages.llm.history_archive`), newest first, each with the time of its last exchange and its
number of exchanges; ``--archive N`` prints the N-th of that list (or ``--archive <file name>``)
the way the current one is printed.
"""

from __future__ import annotations

import time
from pathlib import Path

from broker import config as config_mod
from stages.llm.history_archive import Archive, archive_of
from stages.llm.history_store import CorruptHistory, console_path, content_path, decode, path_for, read


def chosen(cfg: config_mod.Config, console: bool) -> Path | None:
    session = cfg["bus"]["session"]
    if console:
        return console_path(session)
    if cfg["llm"]["history_file"]:
        return path_for(cfg)
    return content_path(session, Path.cwd())


def main(cfg: config_mod.Config, console: bool = False, clear: bool = False, archive: str | None = None) -> int:
    if archive is not None:
        return _archived(archive_of(cfg), archive)
    path = chosen(cfg, console)
    if path is None:
        print("[llm] history_file = \"none\": the history is kept in memory only")
        return 0
    if clear:
        return _clear(path)
    if not path.exists():
        hint = " (earlier conversations: mmdagent-llm history --archive)" if archive_of(cfg).entries() else ""
        print(f"no history yet: {path}{hint}")
        return 0
    return show(path)


def show(path: Path) -> int:
    """Print the conversation in ``path``, one exchange after the other; 1 if it cannot be read."""
    try:  # read only: not HistoryStore.load, which sets a corrupt file aside
        conversation = read(path.read_bytes())
    except (CorruptHistory, OSError) as exc:
        print(f"{path} cannot be read: {exc}")
        return 1
    print(f"{path}: {len(conversation.pairs)} exchanges")
    if conversation.summary:
        print(f"  summary of the {conversation.folded} exchanges before them: {conversation.summary}")
    for user, assistant in conversation.pairs:
        print(f"  you:    {user.get('content', '')}")
        print(f"  avatar: {assistant.get('content', '')}")
    return 0


def _clear(path: Path) -> int:
    try:
        what = f"its {len(decode(path.read_bytes()))} exchanges"
    except FileNotFoundError:
        print(f"nothing to clear: {path} does not exist")
        return 0
    except (CorruptHistory, OSError) as exc:
        what = f"a file that could not be read ({exc})"
    try:
        path.unlink()
    except FileNotFoundError:
        print(f"nothing to clear: {path} does not exist")
        return 0
    except OSError as exc:
        print(f"{path} cannot be cleared: {exc.strerror or exc}")
        return 1
    print(f"cleared {path}: deleted {what}, not archived; a running llm stage goes on from the cleared "
          "history at its next turn")
    return 0


def _archived(archive: Archive, which: str) -> int:
    """``--archive``: the list (``which`` empty), or one conversation in it (its number or name)."""
    entries = archive.entries()
    if not which:
        if not entries:
            print(f"no earlier conversations kept yet (in {archive.folder})")
            return 0
        print(f"earlier conversations in {archive.folder}, newest first (the last {archive.keep} are kept: "
              "[llm] archive_keep):")
        for n, entry in enumerate(entries, 1):
            what = f"{entry.exchanges} exchanges" if entry.exchanges is not None else f"cannot be read: {entry.problem}"
            print(f"  {n:>3}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(entry.when))}  {what}  {entry.path.name}")
        print("print one: mmdagent-llm history --archive <number>")
        return 0
    if which.isdigit():
        if not 1 <= int(which) <= len(entries):
            print(f"there is no conversation {which} in the archive ({len(entries)} kept in {archive.folder}): "
                  "mmdagent-llm history --archive lists them")
            return 1
        return show(entries[int(which) - 1].path)
    path = archive.folder / Path(which).name
    if not path.is_file():
        print(f"there is no {Path(which).name} in {archive.folder}: mmdagent-llm history --archive lists them")
        return 1
    return show(path)
