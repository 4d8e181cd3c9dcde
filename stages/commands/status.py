"""``mmdagent-llm status``: is the session's pipeline healthy? One screen, from the bus alone.

It listens to the session's heartbeats for :data:`LISTEN` seconds (every process beats each
second, so a live one is heard and a dead one is not) and prints:

- each process: up or down, pid, ready, restarts (as the bridge counted them since it
  started), and every observer and input heard;
- the LLM backend and model, its tools and MCP servers (a failed server's reason), the
  history's summary (the llm's heartbeat);
- the last turns' latencies (the bridge's heartbeat, see :mod:`stages.latency`), failed
  turns by cause (the llm's), and bad input: the bridge's stdin problems and refused
  commands, every process's refused frames.

Exit status: 0 when every pipeline process and the bridge are up and ready, with no two
processes under one name; 1 otherwise (the reasons are the last line), so scripts and
supervisors can use it. :func:`health` is the same as data (``GET /api/v1/status`` of
:mod:`stages.inputs.api`).
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from broker import config as config_mod
from broker import wire
from broker.liveness import PIPELINE
from broker.runtime import connect
from stages.commands.cli import INPUTS

LISTEN = 1.3  # a little over the heartbeat period
REQUIRED = (*PIPELINE, "bridge")
LATENCY = (("first_token", "first token"), ("first_synth", "SYNTH_START"), ("first_speech", "speech began"))


def listen(cfg: config_mod.Config, seconds: float = LISTEN) -> dict[str, dict[str, Any]]:
    """The last heartbeat body of each process heard within ``seconds``."""
    heard: dict[str, dict[str, Any]] = {}
    sub = connect(cfg, zmq.SUB, "events_out", ("heartbeat.",))
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            if sub.poll(int(left * 1000) + 1):
                try:
                    env = wire.decode(sub.recv_multipart())
                except wire.WireError:
                    continue
                if env.session == cfg["bus"]["session"]:
                    heard[str(env.body.get("stage"))] = env.body
    finally:
        sub.close(linger=0)
    return heard


def _counts(table: Any) -> str:
    if not isinstance(table, dict) or not table:
        return "none"
    return ", ".join(f"{k} {v}" for k, v in sorted(table.items(), key=lambda kv: str(kv[0])))


def _table(value: Any) -> dict[str, Any]:
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def health(beats: dict[str, dict[str, Any]], session: str) -> dict[str, Any]:
    """What ``status`` shows, as data (the control API serves it as JSON): ``session``,
    ``processes`` (each ``name``, ``kind``: pipeline, observer or input, ``up``, ``pid``,
    ``ready``, ``restarts``: None when unknown), ``llm`` (the llm's heartbeat info, {} if
    none heard), ``turns`` (the last turns' latencies, ms), ``failed_turns`` (by cause),
    ``bad_input`` and ``refused_commands`` (the bridge's), ``refused_frames`` (``"name:
    reason"``: n), ``problems`` (what is wrong, in words) and ``healthy``."""
    bridge = beats.get("bridge", {}).get("info") or {}
    restarts = _table(bridge.get("restarts"))
    processes, problems = [], []
    for name in [*REQUIRED, *sorted(set(beats) - set(REQUIRED))]:
        beat = beats.get(name)
        kind = "pipeline" if name in REQUIRED else "input" if name in INPUTS else "observer"
        if beat is None:
            processes.append({"name": name, "kind": kind, "up": False, "pid": None, "ready": False,
                              "restarts": restarts.get(name)})
            problems.append(f"{name} is down")
            continue
        ready = beat.get("ready") is True
        processes.append({"name": name, "kind": kind, "up": True, "pid": beat.get("pid"), "ready": ready,
                          "restarts": restarts.get(name, 0 if kind == "pipeline" else None)})
        if kind == "pipeline" and not ready:
            problems.append(f"{name} is not ready")
        for other, pids in (beat.get("duplicates") or {}).items():
            problems.append(f"two {other} processes: pids {pids}")
    dupes = {p for p in problems if p.startswith("two ")}
    problems = [p for p in problems if not p.startswith("two ")] + sorted(dupes)
    turns = bridge.get("turns") if isinstance(bridge.get("turns"), list) else []
    llm = beats.get("llm", {}).get("info") or {}
    return {
        "session": session, "processes": processes, "llm": llm if isinstance(llm, dict) else {},
        "turns": [t for t in turns if isinstance(t, dict)],
        "failed_turns": _table(llm.get("errors")) if isinstance(llm, dict) else {},
        "bad_input": _table(bridge.get("bad_input")), "refused_commands": _table(bridge.get("refused")),
        "refused_frames": {f"{name}: {reason}": n for name, beat in beats.items()
                           for reason, n in (beat.get("bad_frames") or {}).items()},
        "problems": problems, "healthy": not problems,
    }


def report(beats: dict[str, dict[str, Any]], session: str) -> tuple[list[str], list[str]]:
    """The screen's lines, and what is wrong (empty when healthy): :func:`health`, printed."""
    data = health(beats, session)
    lines = [f"session {session!r}", f"  {'process':<12} {'state':<6} {'pid':>8}  {'ready':<5}  restarts"]
    for p in data["processes"]:
        restarts = "-" if p["restarts"] is None else p["restarts"]
        if not p["up"]:
            lines.append(f"  {p['name']:<12} {'DOWN':<6} {'-':>8}  {'-':<5}  {restarts}")
            continue
        kind = "" if p["kind"] == "pipeline" else f"  ({p['kind']})"
        pid = "?" if p["pid"] is None else p["pid"]
        lines.append(f"  {p['name']:<12} {'up':<6} {pid:>8}  {'yes' if p['ready'] else 'NO':<5}  {restarts}{kind}")
    llm = data["llm"]
    if llm:
        offline = " (the embedded offline responder)" if llm.get("offline") else ""
        lines.append(f"LLM: {llm.get('backend')}, model {llm.get('model')}{offline}")
        tools = llm.get("tools") if isinstance(llm.get("tools"), list) else []
        lines.append(f"tools: {', '.join(str(t) for t in tools) or 'none'}; calls: {_counts(llm.get('tool_calls'))}")
        for server, state in sorted((llm.get("mcp") or {}).items()):  # a failed one is said, not "unhealthy":
            lines.append(f"  MCP server {server}: {state}")          # restarting the pipeline would not mend it
        folded = llm.get("summary") if isinstance(llm.get("summary"), dict) else {}
        if folded:
            lines.append(f"summary: {folded.get('exchanges')} older exchanges in {folded.get('characters')} characters; "
                         f"summaries since start: {folded.get('ok')} ok, {folded.get('failed')} failed")
    lines.append("last turns:" if data["turns"] else "last turns: none yet")
    for t in data["turns"]:
        parts = [f"{label} {t[key]} ms" for key, label in LATENCY if isinstance(t.get(key), int)]
        lines.append(f"  turn {t.get('turn')}: " + (", ".join(parts) or "no milestone reached"))
    lines.append(f"failed turns by cause: {_counts(data['failed_turns'])}")
    lines.append(f"bad input from MMDAgent-EX: {_counts(data['bad_input'])}; "
                 f"commands refused: {_counts(data['refused_commands'])}")
    lines.append(f"refused bus frames: {_counts(data['refused_frames'])}")
    problems = data["problems"]
    lines.append("healthy" if not problems else "NOT HEALTHY: " + "; ".join(problems))
    return lines, problems


def main(cfg: config_mod.Config) -> int:
    beats = listen(cfg)
    lines, problems = report(beats, cfg["bus"]["session"])
    if not beats:
        lines.insert(1, f"  nothing on the bus at {config_mod.endpoint(cfg, 'events_out')}: the session is not running")
    print("\n".join(lines))
    return 1 if problems else 0
