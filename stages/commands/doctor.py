"""``mmdagent-llm doctor``: does the LLM answer with this configuration, and if not, why?

One cheap request, as the llm stage would make it (same ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``
and ``[llm] model``): a chat completion of at most one token, no retries, at most
:data:`TIMEOUT` seconds. It prints what was checked and, on failure, the cause
(:data:`broker.wire.CAUSES`) and what to do about it; the key itself is never printed. Exit
status 0 when the model answered (or the embedded offline responder is in use), 1 otherwise.
"""

from __future__ import annotations

import os
import sys

import openai

from broker import wire
from broker import config as config_mod
from stages.llm.llm import cause_of, redact
from stages.llm.offline_responder import OFFLINE_NOTICE

TIMEOUT = 15.0

FIXES = {
    "authentication": "Check OPENAI_API_KEY: the server refused it. (A local server needs none: unset it and set "
                      "OPENAI_BASE_URL.)",
    "permission": "This key may not use the model {model!r}: check the account's model access, or choose another.",
    "model_not_found": "The server has no model {model!r}: set [llm] model to one it serves (Ollama: `ollama list`; "
                       "OpenAI: e.g. gpt-4o-mini).",
    "rate_limited": "Rate limit or quota reached: check the account's limits and billing, or try again later.",
    "server_error": "The server failed: try again later, or read the server's own log.",
    "bad_request": "The server refused the request: check [llm] model and [llm] max_tokens for this server.",
    "unreachable": "Nothing answers at {base}: is the server running? Check OPENAI_BASE_URL (Ollama: "
                   "http://localhost:11434/v1).",
    "connection_lost": "The connection broke: try again; check the server and the network.",
    "timeout": f"No answer within {TIMEOUT:.0f} s: is the server still loading the model? Try again.",
    "stream_error": "The server reported an error: read its message above.",
    "other": "Read the message above; the llm stage's log has the same.",
}


def main(cfg: config_mod.Config) -> int:
    model = cfg["llm"]["model"]
    key = os.environ.get("OPENAI_API_KEY")
    base = os.environ.get("OPENAI_BASE_URL")
    if not key and not base:
        print(OFFLINE_NOTICE)
        return 0
    where = base or "OpenAI (https://api.openai.com/v1)"
    print(f"checking {where}, model {model!r}, {'with' if key else 'without'} OPENAI_API_KEY ...", flush=True)
    client = openai.OpenAI(api_key=key or "not-needed", base_url=base or None, max_retries=0, timeout=TIMEOUT)
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "ping"}], max_tokens=1)
    except Exception as exc:  # every failure gets its cause; the key never reaches the output
        cause = cause_of(exc)
        print(f"FAILED: {cause}: {wire.CAUSES[cause]}")
        print(f"  {redact(str(getattr(exc, 'message', None) or exc))}")
        print("  " + FIXES[cause].format(model=model, base=base or "the OpenAI API"))
        return 1
    finally:
        client.close()
    print(f"OK: {where} answered with model {model!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(config_mod.load()))
