"""``mmdagent-llm memory [show | edit | forget TEXT | clear]``: the facts the avatar remembers.

The memory file is the one beside the history the pipeline would use (see
:mod:`stages.commands.history`: ``[llm] history_file``, else, run in a content's ``.mdf``
folder, that content's): :func:`stages.llm.memory.path_beside`. ``show`` prints the facts (the
default), ``edit`` opens the file in ``$EDITOR`` (``notepad`` on Windows, else ``nano`` or
``vi``), ``forget TEXT`` drops every fact containing TEXT, ``clear`` drops them all. A running llm
stage reads the file again at its next turn.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from broker import config as config_mod
from stages.commands.history import chosen
from stages.llm.history_store import default_path
from stages.llm.memory import Memory, path_beside


def main(cfg: config_mod.Config, action: str = "show", text: str = "") -> int:
    history = chosen(cfg, console=False) or default_path(cfg["bus"]["session"])
    memory = Memory(path_beside(history))
    if action == "forget":
        if not text:
            print("mmdagent-llm memory forget: say what to forget (a word of the fact)", file=sys.stderr)
            return 2
        gone = memory.forget(text)
        print(f"forgot {len(gone)} fact(s)" + "".join(f"\n- {fact}" for fact in gone))
        return 0
    if action == "clear":
        print(f"forgot all {memory.clear()} fact(s) in {memory.path}")
        return 0
    if action == "edit":
        memory.create()  # with the header that says how to write it
        editor = os.environ.get("EDITOR") or ("notepad" if sys.platform == "win32" else
                                              shutil.which("nano") or "vi")
        return subprocess.call([*editor.split(), str(memory.path)])
    facts = memory.facts()
    if not facts:
        print(f"nothing remembered yet: {memory.path}")
        return 0
    print(f"# {memory.path}")
    for fact in facts:
        print(f"- {fact}")
    return 0
