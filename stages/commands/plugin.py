"""``mmdagent-llm plugin``: the one-line MMDAgent-EX plugin (bridge + the pipeline, if needed).

``Plugin_AnyScript_Command=mmdagent-llm plugin`` in the ``.mdf``:

- If the session's pipeline already answers (a broker heartbeat, on the session's private
  bus, within ``JOIN_WAIT`` seconds), the plugin joins it: it is just the bridge; unless that
  pipeline was started by a plugin that has ended (MMDAgent-EX closed and opened again at
  once): it is stopping, so the plugin waits for it to go and starts its own. If that
  pipeline has a bridge already (another avatar with the same session), it refuses: a
  session has one bridge.
- If the session's endpoints are held by something else (another session that met it on the
  same ports, another program), it refuses at once: the reason and the way out go to stderr
  and, shortly, onto the avatar's screen (``NOTIFY_SHOW``), and it exits with status 1.
- Otherwise it starts the pipeline, kept by a :class:`stages.commands.keeper.Keeper` in this
  process (``[plugin] pipeline = "builtin"``, the default: the fastest start) or under a
  supervisord of its own (``"supervisord"``, not on Windows) with a configuration generated in
  ``<state folder>/run-<session>/``; logs go there either way. Then it runs the bridge.
  Utterances that come before the stages are up wait for them (see :mod:`stages.bridge.turns`).
- Everything it started ends with it, within a few seconds, however it ends. MMDAgent-EX kills
  its plugin with SIGKILL, which no cleanup code survives, so: on Linux the keeper's stages (or
  supervisord) get SIGTERM from the kernel when the bridge dies (parent death signal); on
  Windows a job object ends them; everywhere, every stage started this way exits by itself
  when the bridge is gone (``MMDAGENTLLM_OWNER_PID``, see :func:`broker.runtime.watch_owner`),
  and under supervisord a ``watchdog`` program sends supervisord SIGTERM.
- The conversation's history is this content's own (``[llm] history_file`` unset: a file keyed
  by the ``.mdf`` folder, :func:`stages.llm.history_store.content_path`); ``mmdagent-llm
  history``, run in that folder, shows or clears it.
- In the background, ``DOCTOR_DELAY`` seconds in, ``mmdagent-llm doctor --notice`` checks the
  LLM server, the key and the model; what it finds wrong appears on the avatar's screen (``NOTIFY_SHOW``) and in the log.
  It ends with the plugin too (killed when the plugin exits; its own watch of the plugin's pid
  when MMDAgent-EX kills the plugin).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from broker import config as config_mod
from broker import curve, sessions
from stages import persona
from stages.bridge import mmd_line
from broker.config import safe_name, state_dir
from stages.commands.keeper import Keeper, die_with_parent
from stages.llm.history_store import content_path
from broker.liveness import PIPELINE
from broker.runtime import OWNER_ENV, alive, setup_logging

if TYPE_CHECKING:
    from stages.bridge.bridge import Bridge

log = logging.getLogger("mmdagent_llm")

JOIN_WAIT = 1.5  # seconds: the broker publishes a heartbeat every second
LEAVE_WAIT = 10.0  # seconds: an ended plugin's stages stop within a few (they watch it)
DOCTOR_DELAY = 2.0  # seconds after start-up: the start-up check waits for the pipeline's start

_PROGRAM = """
[program:{name}]
command={python} -m stages.commands.cli {args}
priority={priority}
autorestart=true
startsecs=1
startretries=1000
stopwaitsecs=3
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile={run}/{name}.log
stdout_logfile_maxbytes=10MB
"""


def supervisord_conf(run: Path, owner: int) -> str:
    """The supervisord configuration of a plugin-started pipeline, watched by ``watchdog``."""
    text = (f"[supervisord]\nnodaemon=true\nlogfile={run}/supervisord.log\nlogfile_maxbytes=10MB\n"
            f"pidfile={run}/supervisord.pid\nchildlogdir={run}\n")
    for name in (*PIPELINE, "watchdog"):
        args = f"watchdog {owner}" if name == "watchdog" else name
        text += _PROGRAM.format(name=name, python=sys.executable, args=args, run=run,
                                priority=10 if name == "broker" else 20)
    return text


def _run_folder(cfg: config_mod.Config) -> Path:
    return curve.private_dir(state_dir() / f"run-{safe_name(cfg['bus']['session'])}")  # logs: ours only


def _stage_env(cfg: config_mod.Config, content_history: bool = True) -> dict[str, str]:
    """The environment of the stages the plugin starts (they run in another folder);
    ``content_history``: the conversation is the ``.mdf`` folder's (not for a remote avatar)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[OWNER_ENV] = str(os.getpid())
    found = config_mod.user_config_path()
    if found is not None:  # the stages run elsewhere: they must not lose the .mdf folder's file
        env[config_mod.ENV_CONFIG] = str(Path(found).resolve())
    character = persona.find(cfg["persona"]["file"])  # beside the .mdf: the stages run elsewhere
    if character is not None:
        env[f"{config_mod.ENV_PREFIX}PERSONA_FILE"] = str(character)
    history_env = f"{config_mod.ENV_PREFIX}LLM_HISTORY_FILE"
    if content_history and not cfg["llm"]["history_file"] and history_env not in env:  # this content's own
        env[history_env] = str(content_path(cfg["bus"]["session"], Path.cwd()))
    return env


def start_pipeline(cfg: config_mod.Config, content_history: bool = True) -> subprocess.Popen:
    run = _run_folder(cfg)
    conf = run / "supervisord.conf"
    conf.write_text(supervisord_conf(run, os.getpid()), encoding="utf-8")
    log.info("no pipeline running: starting one under supervisord (logs in %s)", run)
    return subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)], cwd=run,
                            env=_stage_env(cfg, content_history), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            umask=0o077,  # its logs and files: the user's only
                            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)


def start_keeper(cfg: config_mod.Config, content_history: bool = True) -> Keeper:
    run = _run_folder(cfg)
    log.info("no pipeline running: starting one, kept by this process (logs in %s)", run)
    return Keeper(_stage_env(cfg, content_history), run).start()


def main(cfg: config_mod.Config) -> int:
    setup_logging("bridge")
    from stages.bridge.bridge import Bridge
    return serve(cfg, lambda: Bridge(cfg), _notify)


def serve(cfg: config_mod.Config, make_bridge: Callable[[], "Bridge"], notify: Callable[[str], None],
          content_history: bool = True) -> int:
    """Join the session's pipeline or start one (see the module's docstring), run the bridge
    ``make_bridge`` makes, and end everything started here when it ends (the process too).
    ``notify`` shows a refusal on the avatar's screen, if it can."""
    session = cfg["bus"]["session"]
    on_bus = sessions.present(cfg, JOIN_WAIT)
    gone = sessions.leaving(on_bus)
    if gone:
        log.info("the running pipeline was started by a plugin that has ended (pid %d) and is stopping: "
                 "waiting for it to go", gone)
        if not sessions.wait_free(cfg, LEAVE_WAIT):
            log.warning("the ended plugin's pipeline still holds %s after %.0f s", sessions.describe(cfg), LEAVE_WAIT)
        on_bus = sessions.present(cfg, JOIN_WAIT)
    supervisor = keeper = None
    if "bridge" in on_bus:  # a session has one bridge: a second would take half of its commands
        log.error("session %r has a bridge already (pid %s): each avatar needs a session of its own. Set "
                  "[bus] session = \"<name>\" in this content's mmdagent-llm.toml to run beside it",
                  session, on_bus["bridge"].get("pid"))
        notify(f"mmdagent-llm: session {session!r} is in use by another avatar (see the log)")
        return 1
    if "broker" in on_bus:
        log.info("a pipeline is running: joining it")
    else:
        clash = sessions.conflict(cfg, "the plugin's pipeline")
        if clash is not None:
            log.error("%s", clash)
            notify(f"mmdagent-llm: session {session!r} cannot start: its ports are taken (see the log)")
            return 1
        if cfg["plugin"]["pipeline"] == "builtin" or sys.platform == "win32":  # no supervisord on Windows
            keeper = start_keeper(cfg, content_history)
        else:
            supervisor = start_pipeline(cfg, content_history)
    from stages.bridge.bridge import exit_now
    from stages.commands.launcher import start_doctor
    # its finding reaches the screen through the bridge (a notice); it starts a little later, so
    # that its own start (an LLM client to import) does not slow the pipeline's on 2 cores
    doctor: list[subprocess.Popen] = []
    # it watches this process's pid like the stages (MMDAgent-EX's SIGKILL skips the finally
    # below); not a parent death signal, which would come as soon as the timer's thread ends
    doctor_env = _stage_env(cfg, content_history)
    timer = threading.Timer(DOCTOR_DELAY, lambda: doctor.append(start_doctor(env=doctor_env)))
    timer.daemon = True
    timer.start()
    code = 1
    try:
        code = make_bridge().run()
    finally:
        timer.cancel()
        timer.join(5)
        for proc in doctor:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        if keeper is not None:
            keeper.stop()
        if supervisor is not None:
            supervisor.terminate()
            try:
                supervisor.wait(8)
            except subprocess.TimeoutExpired:
                supervisor.kill()
    exit_now(code)


def _notify(text: str) -> None:
    """One ``NOTIFY_SHOW`` on stdout (MMDAgent-EX shows it for a few seconds)."""
    try:
        sys.stdout.buffer.write(mmd_line.format_line("NOTIFY_SHOW", [text]))
        sys.stdout.buffer.flush()
    except (OSError, ValueError):
        pass


def watchdog(owner: int) -> int:
    """Inside the plugin's supervisord: when ``owner`` (the bridge) is gone, stop supervisord."""
    setup_logging("watchdog")
    log.info("watching pid %d", owner)
    while alive(owner):
        time.sleep(0.5)
    log.info("pid %d is gone: stopping the pipeline", owner)
    os.kill(os.getppid(), signal.SIGTERM)
    return 0
