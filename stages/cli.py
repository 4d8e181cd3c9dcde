"""``mmdagent-llm``: one subcommand per process, plus the console and the configuration reference.

MMDAgent-EX starts ``mmdagent-llm plugin`` or ``mmdagent-llm bridge`` (no shell, the .mdf folder
as working directory); supervisord (``deploy/``) and honcho (``Procfile``) start the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from stages import config as config_mod

PROCESSES = {
    "broker": "broker.main:run",
    "bridge": "stages.bridge:main",
    "llm": "stages.llm:main",
    "segmenter": "stages.segmenter:main",
    "sequencer": "stages.sequencer:main",
    "console": "stages.console:main",
    "plugin": "stages.plugin:main",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmdagent-llm", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="configuration file (default: see `mmdagent-llm config`)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in PROCESSES:
        sub.add_parser(name, help={"console": "talk to the pipeline in this terminal, without MMDAgent-EX",
                                   "plugin": "the bridge, plus the pipeline under supervisord if none is running"
                                   }.get(name, f"run the {name}"))
    sub.add_parser("config", help="print every configuration key with its default and meaning")
    watchdog = sub.add_parser("watchdog", help="(inside the plugin's supervisord) stop it when a pid is gone")
    watchdog.add_argument("pid", type=int)
    keys = sub.add_parser("keys", help="write new CURVE keys into a folder, for a bus that spans machines")
    keys.add_argument("folder", type=Path, help="where to write them (created; existing keys are never overwritten)")
    args = parser.parse_args(argv)
    if args.command == "config":
        sys.stdout.write(config_mod.defaults_text())
        return 0
    if args.command == "keys":  # needs no configuration: it is what makes a non-loopback one valid
        return _keys(args.folder)
    if args.command == "watchdog":
        from stages.plugin import watchdog as watch
        return watch(args.pid)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"mmdagent-llm: configuration error: {exc}", file=sys.stderr)
        return 2
    module, _, func = PROCESSES[args.command].partition(":")
    return getattr(importlib.import_module(module), func)(cfg)


def _keys(folder: Path) -> int:
    """``mmdagent-llm keys <folder>``: write the key files, say where and what to configure.

    Prints file names and the public side only; secret keys stay in their 0600 files.
    """
    from stages import curve

    try:
        curve.generate(folder)
    except OSError as exc:
        print(f"mmdagent-llm keys: {exc}", file=sys.stderr)
        return 1
    where = str(folder.expanduser().resolve())
    # a TOML literal string takes a Windows path as it is; a basic string only if it holds a '
    value = f"'{where}'" if "'" not in where else '"' + where.replace("\\", "\\\\").replace('"', '\\"') + '"'
    print(f"CURVE keys written to {where}:")
    print(f"  {curve.SERVER_PUBLIC}, {curve.SERVER_SECRET}  the broker's key pair")
    print(f"  {curve.CLIENT_PUBLIC}, {curve.CLIENT_SECRET}  the key pair of every stage and observer")
    print(f"  {curve.CLIENTS_DIR}/{curve.CLIENT_PUBLIC}  the client keys the broker admits (one *.key each)")
    print("Put this in the [bus] section of the configuration on every machine (with host):")
    print(f"  curve_dir = {value}")
    print(f"Copy the folder to the other machines; those without the broker do not need {curve.SERVER_SECRET}.")
    print(f"Whoever holds {curve.CLIENT_SECRET} can talk on the bus: keep the folder private.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
