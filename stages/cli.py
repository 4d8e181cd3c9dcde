"""``mmdagent-llm``: one subcommand per process, plus the console and the configuration reference.

MMDAgent-EX starts ``mmdagent-llm bridge`` (no shell, the .mdf folder as working directory);
supervisord (``deploy/``) and honcho (``Procfile``) start the others.
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
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmdagent-llm", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="configuration file (default: see `mmdagent-llm config`)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in PROCESSES:
        sub.add_parser(name, help=f"run the {name}" if name != "console" else
                       "talk to the pipeline in this terminal, without MMDAgent-EX")
    sub.add_parser("config", help="print every configuration key with its default and meaning")
    args = parser.parse_args(argv)
    if args.command == "config":
        sys.stdout.write(config_mod.defaults_text())
        return 0
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"mmdagent-llm: configuration error: {exc}", file=sys.stderr)
        return 2
    module, _, func = PROCESSES[args.command].partition(":")
    return getattr(importlib.import_module(module), func)(cfg)


if __name__ == "__main__":
    sys.exit(main())
