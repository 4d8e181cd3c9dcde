"""``mmdagent-llm console``: talk to the pipeline in a terminal, without MMDAgent-EX.

It starts the pipeline's stages (their logs go to ``console-<session>.log`` in the user's log
folder, :func:`broker.config.log_dir`; ``mmdagent-llm paths`` shows where), then plays MMDAgent-EX with :class:`stages.commands.avatar_sim.SimulatedMMDAgent`: it
launches ``mmdagent-llm bridge`` as the plugin, sends ``RECOG_EVENT_START`` and
``RECOG_EVENT_STOP|<what you typed>``, shows each sentence when the avatar would start
saying it, holds it for a speaking time derived from its length, and answers with the same
``SYNTH_EVENT_*`` events MMDAgent-EX sends. A turn that fails shows its cause and what to do
about it (``turn_result``'s ``cause``). At start, ``mmdagent-llm doctor --notice`` checks the
LLM server, the key and the model in the background and its finding is printed the same way.
The terminal is :mod:`stages.commands.avatar`'s: the prompt comes back after each sentence, an
interruption is shown, a line too long for MMDAgent-EX is cut with a note, ``/quit`` or Ctrl-D
leaves (an empty line does nothing), and Ctrl-C ends everything cleanly at any moment
(:mod:`stages.commands.ctrl_c`). Every process it starts also watches its pid
(``MMDAGENTLLM_OWNER_PID``) and stops by itself should the console be killed outright.

The console's conversation is its own (``history-<session>-console.json`` in the state folder)
and starts afresh each time, unless ``--continue``: then the earlier exchanges are given to the
LLM again, and the console says how many. Starting afresh deletes nothing: the last conversation
is moved into the archive (:mod:`stages.llm.history_archive`; ``mmdagent-llm history --archive``),
and the console says where; if it cannot be moved, the console goes on with it instead.

A session has one bridge, and the console brings its own: if the session is running already
(a plugin's pipeline, say), or its ports are held, the console refuses at once, starts
nothing, and says how to run beside it (``mmdagent-llm --session <name> console``).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path


from broker import config as config_mod
from broker import curve, sessions
from broker.runtime import OWNER_ENV
from stages.commands import ctrl_c
from stages.commands.avatar import Terminal, converse, show_bus
from stages.commands.avatar_sim import SimulatedMMDAgent
from stages.commands.launcher import PIPELINE, Pipeline, start_doctor, wait_ready
from stages.commands.plugin import JOIN_WAIT
from stages.llm import history_store
from stages.llm.history_archive import archive_of


def _history(cfg: config_mod.Config, resume: bool, env: dict[str, str]) -> Path | None:
    """The console's own history file, its last conversation set aside into the archive unless
    ``resume`` (said on stdout); set for its llm in ``env``. A ``[llm] history_file`` of the
    user's own is used as it is."""
    if cfg["llm"]["history_file"]:
        return history_store.path_for(cfg)
    path = history_store.console_path(cfg["bus"]["session"])
    if not resume:
        try:
            kept, count = archive_of(cfg).set_aside(path)
        except (OSError, config_mod.ConfigError) as exc:
            print(f"mmdagent-llm console: the last conversation in {path} could not be moved to the archive "
                  f"({getattr(exc, 'strerror', None) or exc}): going on with it", flush=True)
        else:
            exchanges = "a damaged file" if count is None else f"{count} exchanges"
            if kept is not None:
                print(f"mmdagent-llm console: the last conversation ({exchanges}) is kept in {kept}; "
                      "`mmdagent-llm history --archive` lists the earlier ones", flush=True)
            elif count != 0:
                print(f"mmdagent-llm console: the last conversation ({exchanges}) was not kept "
                      f"([llm] archive_keep = {cfg['llm']['archive_keep']})", flush=True)
    env[f"{config_mod.ENV_PREFIX}LLM_HISTORY_FILE"] = str(path)
    return path


def _refusal(cfg: config_mod.Config) -> str | None:
    """Why the console must not start its pipeline here, or None."""
    session = cfg["bus"]["session"]
    on_bus = sessions.present(cfg, JOIN_WAIT)
    if "broker" not in on_bus:
        return sessions.conflict(cfg, "the console's pipeline")
    other = "console" if session != "console" else "console-2"
    return (f"session {session!r} is running already (broker pid {on_bus['broker'].get('pid')}, "
            f"{sessions.describe(cfg)}), and the console brings a pipeline and a bridge of its own, which would "
            f"cross it. To try the console beside it, on a bus of its own: mmdagent-llm --session {other} console")


def main(cfg: config_mod.Config, resume: bool = False) -> int:
    ctrl_c.install()
    for stream in (sys.stdin, sys.stdout):
        stream.reconfigure(encoding="utf-8")  # type: ignore[union-attr]
    refusal = _refusal(cfg)
    if refusal:
        print(f"mmdagent-llm console: {refusal}", file=sys.stderr)
        return 1
    log_path = curve.private_dir(config_mod.log_dir()) / f"console-{config_mod.safe_name(cfg['bus']['session'])}.log"
    log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")  # ours only
    print(f"mmdagent-llm console: starting the pipeline (logs: {log_path})", flush=True)
    term = Terminal()
    stop = threading.Event()
    # every process started here stops by itself once this one is gone, however it ends (even
    # one started in the very moment of a Ctrl-C, which this process then never knew of)
    env = dict(os.environ, **{OWNER_ENV: str(os.getpid())})
    history = _history(cfg, resume, env)
    pipeline = Pipeline(env=env, stderr=log)
    doctor = avatar = None
    try:  # Ctrl-C may come at any moment from here on: the finally stops whatever was started
        pipeline.start()
        threading.Thread(target=show_bus, args=(cfg, term, stop), name="bus", daemon=True).start()
        doctor = start_doctor(stderr=log, env=env)  # the LLM server, key and model, checked without waiting
        try:
            beats = wait_ready(cfg, PIPELINE, 30)
        except TimeoutError as exc:
            print(f"mmdagent-llm console: {exc}; see {log_path}", file=sys.stderr)
            return 1
        if beats.get("llm", {}).get("info", {}).get("offline"):
            from stages.llm.offline_responder import OFFLINE_NOTICE
            print(f"\n{OFFLINE_NOTICE}\n", flush=True)
        else:
            print(f"answering with {beats['llm']['info'].get('backend')}, model {cfg['llm']['model']}")
        carried = beats["llm"]["info"].get("history") or 0
        if carried:
            print(f"(continuing the conversation in {history}: {carried} earlier exchanges)")
        elif history is not None:
            print("(a new conversation; `mmdagent-llm console --continue` goes on with the last one)")
        command = f'"{sys.executable}" -m stages.commands.cli bridge'
        avatar = SimulatedMMDAgent(
            command, mdf_dir=Path.cwd(), stderr=log, env=env,
            voices=(cfg["speech"]["voice"],),
            on_speech=lambda model, text, started: term.show(f"  avatar> {text}") if started else None,
        ).start()
        wait_ready(cfg, ["bridge"], 20)
        return converse(avatar, term, "Type what you say to the avatar; /quit or Ctrl-D leaves.")
    finally:
        stop.set()
        if avatar is not None:
            avatar.close_stdin()
            avatar.kill()
        if doctor is not None and doctor.poll() is None:
            doctor.kill()
            doctor.wait(5)
        pipeline.stop()
        log.close()
