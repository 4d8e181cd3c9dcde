"""``mmdagent-llm paths``: where everything of this session lives on this machine.

Nothing of ours is written into the current folder or the checkout: state (keys, histories and
the earlier conversations kept, transcripts, the plugin's run folder) goes to the user's state
folder, logs to the user's log folder (:func:`broker.config.state_dir`,
:func:`broker.config.log_dir`), deploy/supervisord.conf's files to
``~/.local/state/mmdagent-llm/supervisor``. Prints paths only, never a key.
"""

from __future__ import annotations

from pathlib import Path

from broker import config as config_mod
from broker import curve
from stages.llm import history_store
from stages.llm.history_archive import archive_of
from stages.observers import transcript, web


def rows(cfg: config_mod.Config, config_file: Path | None) -> list[tuple[str, str]]:
    session = cfg["bus"]["session"]
    safe = config_mod.safe_name(session)
    history = history_store.path_for(cfg)
    return [
        ("configuration file", str(config_file) if config_file else
         f"none (looked for ${config_mod.ENV_CONFIG}, ./{config_mod.LOCAL_NAME}, the user's config.toml)"),
        ("state folder", str(config_mod.state_dir())),
        ("bus keys", str(curve.explicit_folder(cfg) or curve.session_folder(cfg) / "keys")),
        ("web access key", str(web.key_path(cfg))),
        ("history of this content", str(history_store.content_path(session, Path.cwd()))
         if not cfg["llm"]["history_file"] else str(history)),
        ("history of the console", str(history_store.console_path(session))),
        ("history of a pipeline", str(history) if history else "in memory only ([llm] history_file = \"none\")"),
        ("earlier conversations", f"{archive_of(cfg).folder} (the last {cfg['llm']['archive_keep']})"),
        ("transcript", str(transcript.path_of(cfg))),
        ("plugin's run folder", str(config_mod.state_dir() / f"run-{safe}")),
        ("logs (console)", str(config_mod.log_dir() / f"console-{safe}.log")),
        ("supervisord (deploy/)", str(Path.home() / ".local" / "state" / "mmdagent-llm" / "supervisor")),
    ]


def main(cfg: config_mod.Config, config_file: Path | None = None) -> int:
    found = config_file or config_mod.user_config_path()
    print(f"session {cfg['bus']['session']!r}")
    for name, where in rows(cfg, found):
        print(f"  {name:<24} {where}")
    return 0
