"""``mmdagent-llm transcript [--follow]``: the session's transcript file, readably.

Reads what ``mmdagent-llm observe transcript`` writes (see :mod:`stages.observers.transcript`
for the fields): one line of text per event. ``--follow`` keeps printing new lines as they
come, across a rotation of the file, until Ctrl-C. A line that is not a transcript record (a
file cut by a full disk) is shown as such and skipped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from broker import config as config_mod
from broker.wire import CAUSES
from stages.observers.transcript import path_of

POLL = 0.2
HEARD = {"full": "", "cut": "  [cut off]", "never": "  [never said]"}
LATENCY = (("first_token", "first token"), ("first_synth", "first SYNTH_START"), ("first_speech", "speech began"))


def describe(rec: dict[str, Any]) -> str:
    """One record as a line of text."""
    when = str(rec.get("time", ""))[11:23]
    event = rec.get("event")
    if event == "user":
        return f"{when}  user    {rec.get('text', '')}"
    if event == "greeting":
        return f"{when}  ... the avatar greets: {rec.get('text', '')}"
    if event == "tool":
        outcome = "" if rec.get("ok") else " (failed)"
        return f"{when}  tool    {rec.get('name')}{outcome} -> {' '.join(str(rec.get('result', '')).split())[:120]}"
    if event == "resumed":
        return f"{when}  ... the answer goes on (turn {rec.get('of')}, {rec.get('skip')} sentence(s) said)"
    if event == "sentence":
        return f"{when}  avatar  {rec.get('text', '')}{HEARD.get(str(rec.get('heard')), '')}"
    if event == "interrupted":
        return f"{when}  --- {rec.get('reason')} (had begun {len(rec.get('heard') or [])} sentence(s))"
    if event == "error":
        cause = str(rec.get("cause"))
        return f"{when}  !!! {cause}: {CAUSES.get(cause, '')} ({rec.get('error', '')})"
    if event == "turn":
        ms = rec.get("latency_ms") or {}
        times = ", ".join(f"{label} {ms[key]} ms" for key, label in LATENCY if ms.get(key) is not None)
        return f"{when}  === turn {rec.get('turn')} {rec.get('reason')}" + (f": {times}" if times else "")
    if event == "stage":
        return f"{when}  *** {rec.get('stage')} {rec.get('change')} (pid {rec.get('pid')})"
    if event == "broken":
        return f"{when}  *** {rec.get('stage')} could not finish turn {rec.get('turn')}: {rec.get('reason')}"
    if event == "summary":
        if rec.get("ok"):
            text = " ".join(str(rec.get("text", "")).split())
            return f"{when}  ... {rec.get('exchanges')} older exchanges folded into the summary: {text}"
        return f"{when}  ... summarizing {rec.get('exchanges')} older exchanges failed: {rec.get('error', '')}"
    if event == "notice":
        return f"{when}  ({rec.get('level')}) {rec.get('text')}"
    if event == "observer":
        return f"{when}  ... transcript observer started (pid {rec.get('pid')})"
    return f"{when}  {event}"


def _print(raw: bytes, out: IO[str]) -> None:
    try:
        rec = json.loads(raw)
        if not isinstance(rec, dict):
            raise ValueError
        text = describe(rec)
    except ValueError:
        text = f"(not a transcript record: {raw[:60]!r})"
    out.write(text + "\n")
    out.flush()


def show(path: Path, follow: bool, out: IO[str] = sys.stdout) -> int:
    if not path.exists() and not follow:
        print(f"mmdagent-llm transcript: no transcript at {path} (is `mmdagent-llm observe transcript` running?)",
              file=sys.stderr)
        return 1
    f, ino, pending = None, None, b""
    try:
        while True:
            if f is None and path.exists():
                f = open(path, "rb")
                ino = os.fstat(f.fileno()).st_ino
            chunk = f.read() if f is not None else b""
            if chunk:
                pending += chunk
                *whole, pending = pending.split(b"\n")
                for raw in whole:
                    if raw.strip():
                        _print(raw, out)
                continue
            if not follow:
                return 0
            time.sleep(POLL)
            try:  # rotated (a new file under the name) or cut: start over on the new one
                st = path.stat()
                if f is not None and (st.st_ino != ino or st.st_size < f.tell()):
                    f.close()
                    f, pending = None, b""
            except FileNotFoundError:
                pass
    except KeyboardInterrupt:
        return 0
    finally:
        if f is not None:
            f.close()


def main(cfg: config_mod.Config, follow: bool = False) -> int:
    return show(path_of(cfg), follow)
