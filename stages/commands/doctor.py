"""``mmdagent-llm doctor``: does the LLM answer with this configuration, and if not, why?

One cheap request, as the llm stage would make it (same ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``
and ``[llm] model``): a chat completion of at most one token, no retries, at most
:data:`TIMEOUT` seconds. It prints what was checked and, on failure, the cause
(:data:`broker.wire.CAUSES`) and what to do about it; the key itself is never printed. It also
starts each MCP server of ``[tools.mcp]`` as the llm stage would, and says which tools it offers
or why it cannot be used; and, in a content folder, which configured motions are missing. Exit
status 0 when the model answered (or the embedded offline responder is in use) and every MCP
server started, 1 otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

import openai
import zmq

from broker import wire
from broker import config as config_mod
from stages.llm.failures import cause_of, redact
from broker.runtime import connect, setup_logging, watch_owner
from stages.expression import Vocabulary
from stages.llm.offline_responder import OFFLINE_NOTICE

log = logging.getLogger("mmdagent_llm")

TIMEOUT = 15.0
NOTICE_WAIT = 20.0  # how long --notice waits for a bridge to show its finding

FIXES = {
    "authentication": "Check OPENAI_API_KEY: the server refused it. (A local server needs none: unset it and set "
                      "OPENAI_BASE_URL.)",
    "permission": "This key may not use the model {model!r}: check the account's model access, or choose another.",
    "model_not_found": "The server has no model {model!r}: set [llm] model to one it serves (Ollama: `ollama list`; "
                       "OpenAI: e.g. gpt-4o-mini).",
    "rate_limited": "Rate limit or quota reached: check the account's limits and billing, or try again later.",
    "server_error": "The server failed: try again later, or read the server's own log.",
    "bad_request": "The server refused the request: check [llm] model and [llm] max_tokens for this server.",
    "wrong_url": "Nothing at {base} serves /chat/completions: OPENAI_BASE_URL is the server's OpenAI-compatible "
                 "API, which usually ends in /v1 (Ollama: http://localhost:11434/v1).",
    "unreachable": "Nothing answers at {base}: is the server running? Check OPENAI_BASE_URL (Ollama: "
                   "http://localhost:11434/v1).",
    "openai_unreachable": "OpenAI's API cannot be reached from here (OPENAI_BASE_URL is {base_setting}): check the "
                          "network connection, and the proxy if this network needs one.",
    "connection_lost": "The connection broke: try again; check the server and the network.",
    "timeout": f"No answer within {TIMEOUT:.0f} s: is the server still loading the model? Try again.",
    "stream_error": "The server reported an error: read its message above.",
    "other": "Read the message above; the llm stage's log has the same.",
}


def check_motions(cfg: config_mod.Config, folder: Path, say: Callable[[str], None]) -> list[str]:
    """In a content folder (it holds a ``.mdf``): ``say`` each configured motion file that is not
    there (MMDAgent-EX would ignore it without a word). Returns those names."""
    if not any(folder.glob("*.mdf")):
        return []
    missing = [name for name, file in Vocabulary(cfg).motion_files().items() if not (folder / file).is_file()]
    for name in missing:
        say(f"MISSING MOTION: [expression.names] {name}: {cfg['expression']['names'][name]['motion']} is not in "
            f"{folder}: the avatar will not make that gesture (fix the path, or the name's motion)")
    return missing


def check_mcp(cfg: config_mod.Config, say: Callable[[str], None]) -> list[str]:
    """Start every ``[tools.mcp]`` server as the llm stage does, ``say`` what each offers or why it
    cannot be used, end them. Returns the names of those that cannot be used."""
    servers = cfg["tools"]["mcp"]
    if not servers:
        return []
    from stages.llm.mcp_tools import START_TIMEOUT, McpTools  # the mcp SDK only when servers are named
    say(f"starting the MCP servers of [tools.mcp]: {', '.join(servers)} ...")
    mcp = McpTools(servers, set(cfg["tools"]["builtin"]), lambda server, what: None)
    try:
        deadline = time.monotonic() + 2 * START_TIMEOUT + 1  # to start, then to list its tools
        while any(state == "starting" for state in mcp.state.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        states = dict(mcp.state)
        offered = sorted(mcp.tools)
    finally:
        mcp.close()
    failed = []
    for server, state in states.items():
        if state.startswith("ok"):
            say(f"OK: MCP server {server}: {state[4:]}")
        else:
            failed.append(server)
            say(f"MCP SERVER FAILED: {server}: {state.removeprefix('failed: ')}: its tools are left out of every "
                "answer (check [tools.mcp] and run the server's command by hand)")
    if offered:
        say(f"  tools from MCP servers: {', '.join(offered)}")
    return failed


def check(cfg: config_mod.Config, say: Callable[[str], None]) -> str | None:
    """Make the request; ``say`` each line for a person. The failure's cause, or None if it answered."""
    model = cfg["llm"]["model"]
    key = os.environ.get("OPENAI_API_KEY")
    base = os.environ.get("OPENAI_BASE_URL")
    if not key and not base:
        for line in OFFLINE_NOTICE.splitlines():
            say(line)
        return None
    where = base or "OpenAI (https://api.openai.com/v1)"
    say(f"checking {where}, model {model!r}, {'with' if key else 'without'} OPENAI_API_KEY ...")
    client = openai.OpenAI(api_key=key or "not-needed", base_url=base or None, max_retries=0, timeout=TIMEOUT)
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "ping"}], max_tokens=1)
    except Exception as exc:  # every failure gets its cause; the key never reaches the output
        cause = cause_of(exc)
        say(f"FAILED: {cause}: {wire.CAUSES[cause]}")
        say(f"  {redact(str(getattr(exc, 'message', None) or exc))}")
        say("  " + FIXES[cause].format(model=model, base=base or "the OpenAI API",
                                       base_setting=f"set to {base}" if base else "not set"))
        return cause
    finally:
        client.close()
    say(f"OK: {where} answered with model {model!r}")
    return None


def main(cfg: config_mod.Config, notice: bool = False) -> int:
    """Exit status 0 when the LLM answered (or none is configured), 1 otherwise.

    ``notice``: the start-up check of ``plugin`` and ``console``: the lines go to the log
    (stderr), and a failure is also published as an ``error`` ``notice`` on the bus, once the
    bridge is there to show it (see :func:`publish_notice`)."""
    if not notice:  # (the start-up check leaves MCP servers to the llm stage, which reports them itself)
        check_motions(cfg, Path.cwd(), lambda line: print(line, flush=True))
        failed = check(cfg, lambda line: print(line, flush=True))
        return 1 if check_mcp(cfg, lambda line: print(line, flush=True)) or failed else 0
    setup_logging("doctor")
    watch_owner(lambda: os._exit(1))  # a start-up check is of no use once its plugin or console is gone
    sub = connect(cfg, zmq.SUB, "events_out", ("heartbeat.bridge", "notice"))  # meanwhile, it connects
    try:
        check_motions(cfg, Path.cwd(), log.warning)
        cause = check(cfg, log.info)
        if cause is not None:
            publish_notice(cfg, sub, f"{wire.CAUSES[cause]}: run `mmdagent-llm doctor`")
    finally:
        sub.close(linger=0)
    return 1 if cause else 0


def publish_notice(cfg: config_mod.Config, sub: zmq.Socket, text: str, wait: float = NOTICE_WAIT) -> bool:
    """Publish an error ``notice`` when the bridge is ready (or ``wait`` has passed), until it
    comes back through the broker (a new publisher's first messages may be lost). True if seen."""
    sender = wire.Sender("doctor", cfg["bus"]["session"])
    pub = connect(cfg, zmq.PUB, "events_in")
    deadline = time.monotonic() + wait
    bridge_ready = False
    try:
        while not bridge_ready and (left := deadline - time.monotonic()) > 0:
            if sub.poll(int(left * 1000) + 1):
                env = _decode(sub.recv_multipart())
                bridge_ready = env is not None and env.kind == "heartbeat" and env.body.get("ready") is True
        for _ in range(20):
            env = sender.make("notice", {"level": "error", "text": text})
            pub.send_multipart(wire.encode(env))
            until = time.monotonic() + 0.25
            while (left := until - time.monotonic()) > 0:
                if sub.poll(int(left * 1000) + 1):
                    got = _decode(sub.recv_multipart())
                    if got is not None and got.kind == "notice" and got.sender == "doctor" and got.seq == env.seq:
                        return True
        return False
    finally:
        pub.close(linger=1000)


def _decode(frames: list[bytes]) -> wire.Envelope | None:
    try:
        return wire.decode(frames)
    except wire.WireError:
        return None


if __name__ == "__main__":
    sys.exit(main(config_mod.load()))
