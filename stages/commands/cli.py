"""``mmdagent-llm``: one subcommand per process, plus the console and the configuration reference.

MMDAgent-EX starts ``mmdagent-llm plugin`` or ``mmdagent-llm bridge`` (no shell, the .mdf folder
as working directory); supervisord (``deploy/``) and honcho (``Procfile``) start the others.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from broker import config as config_mod

PROCESSES = {
    "broker": "broker.main:run",
    "bridge": "stages.bridge.bridge:main",
    "llm": "stages.llm.llm:main",
    "segmenter": "stages.segmenter.segmenter:main",
    "sequencer": "stages.sequencer.sequencer:main",
    "console": "stages.commands.console:main",
    "plugin": "stages.commands.plugin:main",
    "remote": "stages.commands.remote:main",
    "doctor": "stages.commands.doctor:main",
    "status": "stages.commands.status:main",
    "avatar": "stages.commands.avatar:main",
    "history": "stages.commands.history:main",
    "memory": "stages.commands.memory:main",
    "paths": "stages.commands.paths:main",
}
OBSERVERS = {
    "transcript": "stages.observers.transcript:main",
    "captions": "stages.observers.captions:main",
    "subtitles": "stages.observers.subtitles:main",
    "metrics": "stages.observers.metrics:main",
}
INPUTS = {
    "api": "stages.inputs.api:main",
    "comments": "stages.inputs.comments:main",
    "idle": "stages.inputs.idle:main",
}
WEB = {"subtitles": "/", "metrics": "/metrics", "api": "/api/v1/status"}  # private web addresses (--url)


def _plugin_help() -> str:
    """What ``plugin`` does, with how it keeps the pipeline by default, read from defaults.toml."""
    how = {"builtin": "kept by the plugin itself", "supervisord": "under a supervisord of its own"}
    default = config_mod.defaults()["plugin"]["pipeline"]
    others = ", ".join(f'"{word}"' for word in config_mod.CHOICES[("plugin", "pipeline")] if word != default)
    return (f'the bridge, plus the pipeline if none is running, {how[default]} ([plugin] pipeline = "{default}", '
            f"the default; also {others})")


HELP = {
    "broker": "run the broker: it binds the session's bus (the pipeline's first process)",
    "bridge": "run the bridge: MMDAgent-EX's plugin process (Plugin_AnyScript_Command=mmdagent-llm bridge)",
    "llm": "run the llm stage: it streams each answer from the LLM",
    "segmenter": "run the segmenter: it cuts the answer into speakable sentences",
    "sequencer": "run the sequencer: one SYNTH_START at a time, each after the last was spoken",
    "console": "talk to the pipeline in this terminal, without MMDAgent-EX",
    "plugin": _plugin_help(),
    "remote": "the bridge over TCP (MMDAgent-EX's Plugin_Remote), plus the pipeline if none is running: "
              "--connect HOST:PORT to MMDAgent-EX's server, or --listen HOST:PORT for MMDAgent-EX to connect to",
    "doctor": "check the LLM server, the key and the model with one cheap request",
    "status": "one screen: each process up or down, the LLM, the last turns; exit 1 when unhealthy",
    "avatar": "a simulated MMDAgent-EX in this terminal, running a plugin command (default: attach to the "
              "running pipeline)",
    "history": "show (or --clear) the conversation the LLM is given: this content's, or --console's; "
               "--archive: the earlier ones kept",
    "memory": "the facts the avatar remembers across conversations: show, edit, forget TEXT, clear",
    "paths": "where everything of the session lives: configuration, keys, histories, transcripts, logs",
    "observe": "run an observer: transcript, captions, subtitles (OBS) or metrics",
    "input": "run an input: api (HTTP control API), comments (live-stream comments) or idle (talk first)",
    "transcript": "print the session's transcript readably",
    "config": "print the configuration in effect and where each value comes from (--defaults: every key, "
              "its default and meaning)",
    "bus": "where the session's bus is and how an observer of yours gets onto it",
    "watchdog": "(inside the plugin's supervisord) stop it when a pid is gone",
    "keys": "write new CURVE keys into a folder, for a bus that spans machines",
}


def _version() -> str:
    import importlib.metadata  # here, not at the top: every stage process starts through this module

    try:
        return importlib.metadata.version("mmdagent-llm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C at any moment: what was started is ended by its own finally
        print("mmdagent-llm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mmdagent-llm config | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    # --config and --session are taken before or after the subcommand: the same option on both
    # levels, with SUPPRESS so that an absent one does not overwrite the other
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="configuration file (default: see `mmdagent-llm config`)")
    common.add_argument("--session", default=argparse.SUPPRESS,
                        help="the session (one avatar's private bus); inherited by what the command starts "
                             "(default: [bus] session)")
    parser = argparse.ArgumentParser(prog="mmdagent-llm", description=__doc__.splitlines()[0], parents=[common])
    parser.add_argument("--version", action="version", version=f"mmdagent-llm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    commands = {name: sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                                     parents=[common]) for name, text in HELP.items()}
    commands["avatar"].add_argument("--plugin", default="", help="the plugin command line, as in a .mdf "
                                    "(default: mmdagent-llm bridge, which attaches to the running pipeline)")
    commands["avatar"].add_argument("--mdf-dir", type=Path, help="the plugin's working folder (default: here)")
    commands["avatar"].add_argument("--quiet", action="store_true", help="show only what the avatar says")
    door = commands["remote"].add_mutually_exclusive_group(required=True)
    door.add_argument("--connect", metavar="HOST:PORT", nargs="?", const="",
                      help="connect to MMDAgent-EX (Plugin_Remote_EnableServer; default: [remote] connect)")
    door.add_argument("--listen", metavar="HOST:PORT", nargs="?", const="",
                      help="wait for MMDAgent-EX (Plugin_Remote_EnableClient; default: [remote] listen); "
                           "[remote] allow says who may connect")
    door.add_argument("--handoff", type=int, help=argparse.SUPPRESS)  # --listen's avatar process: its channel fd
    commands["history"].add_argument("--console", action="store_true", help="the console's history")
    what = commands["history"].add_mutually_exclusive_group()
    what.add_argument("--clear", action="store_true",
                      help="delete it (not archived): the next turn starts afresh")
    what.add_argument("--archive", nargs="?", const="", metavar="N",
                      help="list the earlier conversations kept, newest first; with N (a number in that list, "
                           "or a file name), print that one")
    commands["memory"].add_argument("action", nargs="?", default="show", choices=("show", "edit", "forget", "clear"))
    commands["memory"].add_argument("text", nargs="?", default="", help="forget: a word of the facts to drop")
    commands["console"].add_argument("--continue", dest="resume", action="store_true",
                                     help="go on with the last console conversation (default: start afresh)")
    commands["doctor"].add_argument("--notice", action="store_true",
                                    help="(plugin and console start-up) log the result; publish a failure on the bus")
    commands["observe"].add_argument("observer", choices=OBSERVERS)
    commands["observe"].add_argument("--url", action="store_true",
                                     help="subtitles, metrics: print the private address (with its access key) "
                                          "and exit")
    commands["input"].add_argument("input", choices=INPUTS)
    commands["input"].add_argument("--url", action="store_true",
                                   help="api: print the private address (with its access key) and exit")
    commands["transcript"].add_argument("--follow", "-f", action="store_true",
                                        help="keep printing new lines as they come")
    commands["config"].add_argument("--defaults", action="store_true",
                                    help="print every key with its default and meaning instead")
    commands["watchdog"].add_argument("pid", type=int)
    commands["keys"].add_argument("folder", type=Path,
                                  help="where to write them (created; existing keys are never overwritten)")
    args = parser.parse_args(argv)
    if args.command == "config" and args.defaults:
        sys.stdout.write(config_mod.defaults_text())
        return 0
    if args.command == "keys":  # needs no configuration: it is what makes a non-loopback one valid
        return _keys(args.folder)
    if args.command == "watchdog":
        from stages.commands.plugin import watchdog as watch
        return watch(args.pid)
    if getattr(args, "session", None) is not None:  # through the environment: what it starts has it too
        os.environ[f"{config_mod.ENV_PREFIX}BUS_SESSION"] = args.session
    sources: dict[tuple[str, str], str] = {}
    try:
        cfg = config_mod.load(getattr(args, "config", None), sources)
    except config_mod.ConfigError as exc:
        print(f"mmdagent-llm: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        return _config(cfg, sources, getattr(args, "config", None))
    if args.command == "bus":
        return _bus(cfg)
    if args.command in ("observe", "input") and args.url:
        return _url(cfg, args.observer if args.command == "observe" else args.input, args.command)
    target, extra = PROCESSES.get(args.command, ""), {}
    if args.command == "observe":
        target = OBSERVERS[args.observer]
    elif args.command == "input":
        target = INPUTS[args.input]
    elif args.command == "transcript":
        target, extra = "stages.commands.transcript:main", {"follow": args.follow}
    elif args.command == "doctor" and args.notice:
        extra = {"notice": True}
    elif args.command == "paths":
        extra = {"config_file": getattr(args, "config", None)}
    elif args.command == "history":
        extra = {"console": args.console, "clear": args.clear, "archive": args.archive}
    elif args.command == "console":
        extra = {"resume": args.resume}
    elif args.command == "memory":
        extra = {"action": args.action, "text": args.text}
    elif args.command == "remote":
        extra = {"connect": args.connect, "listen": args.listen, "handoff": args.handoff}
    elif args.command == "avatar":
        extra = {"plugin": args.plugin, "mdf_dir": args.mdf_dir, "quiet": args.quiet}
    module, _, func = target.partition(":")
    try:
        return getattr(importlib.import_module(module), func)(cfg, **extra)
    except config_mod.ConfigError as exc:  # e.g. a key file missing from [bus] curve_dir
        print(f"mmdagent-llm {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2


def _keys(folder: Path) -> int:
    """``mmdagent-llm keys <folder>``: write the key files, say where and what to configure.

    Prints file names and the public side only; secret keys stay in their 0600 files.
    """
    from broker import curve

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


def _config(cfg: config_mod.Config, sources: dict[tuple[str, str], str], path: Path | None) -> int:
    """``mmdagent-llm config``: the configuration in effect, as TOML, each value not a default
    followed by where it came from."""
    used = path or config_mod.user_config_path()
    print(f"# mmdagent-llm configuration in effect; file: {used or 'none (defaults and environment only)'}")
    print("# every key with its meaning: mmdagent-llm config --defaults")
    for section, values in cfg.items():
        print(f"\n[{section}]")
        for key, value in values.items():
            source = sources.get((section, key))
            print(f"{key} = {_toml(value)}" + (f"  # from {source}" if source else ""))
    from stages import persona
    character = persona.find(cfg["persona"]["file"])
    print(f"\n# the character (the LLM's system prompt): "
          f"{character or 'no ' + repr(cfg['persona']['file']) + ' here: [llm] system_prompt'}")
    return 0


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):  # [expression] names: inline tables
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def _url(cfg: config_mod.Config, observer: str, command: str = "observe") -> int:
    """``mmdagent-llm observe subtitles|metrics --url``, ``mmdagent-llm input api --url``: the
    address with its access key (a secret: printed on request only, never logged)."""
    from stages.observers import web

    if observer not in WEB:
        print(f"mmdagent-llm {command} {observer}: has no web address", file=sys.stderr)
        return 2
    print(web.url_of(cfg, observer, WEB[observer]))
    use = "an Authorization: Bearer header" if observer == "api" else "Prometheus's credentials_file"
    print(f"(the key alone, e.g. for {use}: {web.key_path(cfg)})", file=sys.stderr)
    return 0


def _bus(cfg: config_mod.Config) -> int:
    """``mmdagent-llm bus``: the session's endpoints and key files, and whether it runs.

    Prints paths and public facts only: an observer of yours loads the secret key from its file.
    """
    from broker import curve, sessions

    try:
        keys = curve.folder_of(cfg)
    except (config_mod.ConfigError, OSError) as exc:
        print(f"mmdagent-llm bus: {exc}", file=sys.stderr)
        return 1
    session = cfg["bus"]["session"]
    holder = sessions.holder_of([config_mod.endpoint(cfg, "events_out")])
    state = (f"running (broker pid {holder['pid']})" if holder and holder["session"] == session
             else "not running on this machine")
    print(f"session {session!r}: {state}")
    for name in config_mod.ENDPOINTS:
        print(f"  {name:<13} {config_mod.endpoint(cfg, name)}")
    print(f"keys (ZeroMQ CURVE certificates) in {keys}:")
    print(f"  {curve.SERVER_PUBLIC:<18} the broker's public key: your socket's CURVE_SERVERKEY")
    print(f"  {curve.CLIENT_SECRET:<18} public-key and secret-key: your CURVE_PUBLICKEY and CURVE_SECRETKEY "
          f"(secret: never copy it elsewhere)")
    print("An observer subscribes (SUB) to events_out; see the README, \"Watching the bus\".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
