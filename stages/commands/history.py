"""``mmdagent-llm history [--console] [--clear]``: the conversation the LLM will be given.

Which history, as the pipeline would choose it:
- ``[llm] history_file`` if it is set (``"none"``: there is none on disk);
- else, run in a content's ``.mdf`` folder, the one the plugin keeps for that content
  (:func:`stages.llm.history_store.content_path`);
- ``--console``: the console's (started fresh unless ``console --continue``).

It prints each exchange, or with ``--clear`` removes the file. A running llm stage keeps its
copy in memory until it restarts; clear before starting, or restart it.
"""

from __future__ import annotations

from pathlib import Path

from broker import config as config_mod
from stages.llm.history_store import CorruptHistory, console_path, content_path, decode, path_for


def chosen(cfg: config_mod.Config, console: bool) -> Path | None:
    session = cfg["bus"]["session"]
    if console:
        return console_path(session)
    if cfg["llm"]["history_file"]:
        return path_for(cfg)
    return content_path(session, Path.cwd())


def main(cfg: config_mod.Config, console: bool = False, clear: bool = False) -> int:
    path = chosen(cfg, console)
    if path is None:
        print("[llm] history_file = \"none\": the history is kept in memory only")
        return 0
    if clear:
        try:
            path.unlink()
            print(f"cleared: {path} (a running llm stage keeps its copy until it restarts)")
        except FileNotFoundError:
            print(f"nothing to clear: {path} does not exist")
        return 0
    if not path.exists():
        print(f"no history yet: {path}")
        return 0
    try:  # read only: not HistoryStore.load, which sets a corrupt file aside
        pairs = decode(path.read_bytes())
    except (CorruptHistory, OSError) as exc:
        print(f"{path} cannot be read: {exc}")
        return 1
    print(f"{path}: {len(pairs)} exchanges")
    for user, assistant in pairs:
        print(f"  you:    {user.get('content', '')}")
        print(f"  avatar: {assistant.get('content', '')}")
    return 0
