"""``mmdagent-llm console``: talk to the pipeline in a terminal, without MMDAgent-EX.

It starts the pipeline's stages (logs go to ``mmdagent-llm-console.log`` in the current
folder), then plays MMDAgent-EX with :class:`stages.avatar_sim.SimulatedMMDAgent`: it
launches ``mmdagent-llm bridge`` as the plugin, sends ``RECOG_EVENT_START`` and
``RECOG_EVENT_STOP|<what you typed>``, shows each sentence when the avatar would start
saying it, holds it for a speaking time derived from its length, and answers with the same
``SYNTH_EVENT_*`` events MMDAgent-EX sends. An empty line or Ctrl-D quits.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages import config as config_mod
from stages.avatar_sim import SimulatedMMDAgent
from stages.launcher import PIPELINE, Pipeline, wait_ready

LOG_NAME = "mmdagent-llm-console.log"


def _say(text: str) -> None:
    sys.stdout.write(f"\r  avatar> {text}\n")
    sys.stdout.flush()


def main(cfg: config_mod.Config) -> int:
    for stream in (sys.stdin, sys.stdout):
        stream.reconfigure(encoding="utf-8")  # type: ignore[union-attr]
    log_path = Path.cwd() / LOG_NAME
    log = open(log_path, "ab")
    print(f"mmdagent-llm console: starting the pipeline (logs: {log_path})", flush=True)
    pipeline = Pipeline(stderr=log).start()
    avatar = None
    try:
        try:
            beats = wait_ready(cfg, PIPELINE, 30)
        except TimeoutError as exc:
            print(f"mmdagent-llm console: {exc}; see {log_path}", file=sys.stderr)
            return 1
        if beats.get("llm", {}).get("info", {}).get("offline"):
            from stages.offline_responder import OFFLINE_NOTICE
            print(f"\n{OFFLINE_NOTICE}\n", flush=True)
        else:
            print(f"answering with {beats['llm']['info'].get('backend')}, model {cfg['llm']['model']}")
        command = f'"{sys.executable}" -m stages.cli bridge'
        avatar = SimulatedMMDAgent(
            command, mdf_dir=Path.cwd(), stderr=log,
            voices=(cfg["speech"]["voice"],),
            on_speech=lambda model, text, started: _say(text) if started else None,
        ).start()
        wait_ready(cfg, ["bridge"], 20)
        print("Type what you say to the avatar; an empty line quits.", flush=True)
        while True:
            try:
                text = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                break
            if not text:
                break
            avatar.send("RECOG_EVENT_START")
            avatar.send(f"RECOG_EVENT_STOP|{text}")
        return 0
    finally:
        if avatar is not None:
            avatar.close_stdin()
            avatar.kill()
        pipeline.stop()
        log.close()
