"""What went wrong with a request to the LLM server, in words a person can act on, without secrets.

:func:`cause_of` names the failure (a :data:`broker.wire.CAUSES` key: the llm stage's log line,
``turn_result``'s ``cause``, and ``mmdagent-llm doctor``'s advice), :func:`describe` gives the
one-line message, and :func:`redact` takes the API key, and anything shaped like a key, out of
any text that may be logged.
"""

from __future__ import annotations

import json
import os
import re

import httpx2
import openai

_KEY_PATTERN = re.compile(r"(sk-|key-|Bearer\s+)[A-Za-z0-9_\-\*\.]{6,}")


def redact(text: str) -> str:
    """``text`` on one line with the API key and anything shaped like a key removed."""
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        text = text.replace(key, "***")
    text = _KEY_PATTERN.sub(lambda m: m.group(1) + "***", text)
    return " ".join(text.split())[:300]


OPENAI_HOST = "api.openai.com"  # where the client goes when OPENAI_BASE_URL is not set


def cause_of(exc: BaseException) -> str:
    """The :data:`broker.wire.CAUSES` key of a failure raised by the openai client.

    A 404 is ``model_not_found`` only when the body is the API's own error (:func:`wrong_path`
    tells the two apart), and a connection that could not be made is ``openai_unreachable``
    when it was to OpenAI's own API (no ``OPENAI_BASE_URL``: the network or a proxy is at
    fault), else ``unreachable`` (the server at ``OPENAI_BASE_URL``)."""
    if isinstance(exc, openai.NotFoundError):
        try:
            body = exc.response.text
        except httpx2.ResponseNotRead:  # closed before it was read: nothing to tell by
            return "model_not_found"
        return "wrong_url" if wrong_path(body) else "model_not_found"
    if isinstance(exc, openai.APIConnectionError) and not isinstance(exc, openai.APITimeoutError):
        return "openai_unreachable" if exc.request.url.host == OPENAI_HOST else "unreachable"
    for kind, cause in ((openai.AuthenticationError, "authentication"), (openai.PermissionDeniedError, "permission"),
                        (openai.RateLimitError, "rate_limited"), (openai.APITimeoutError, "timeout")):
        if isinstance(exc, kind):
            return cause
    if isinstance(exc, openai.APIStatusError):
        return "server_error" if exc.status_code >= 500 else "bad_request"
    if isinstance(exc, openai.APIError):
        return "stream_error"
    return "other"


def wrong_path(body: str) -> bool:
    """Whether a 404's ``body`` says the URL's path is not the API (a base URL without ``/v1``)
    rather than that the API has no such model: it is not an OpenAI error object
    ``{"error": {...}}`` (Ollama's ``404 page not found``, vLLM's ``{"detail": "Not Found"}``),
    or it is one whose code is ``unknown_url`` (OpenAI's own word for a path it does not serve)."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        return True
    return not isinstance(error, dict) or error.get("code") == "unknown_url"


def describe(exc: BaseException) -> str:
    """One line naming the failure, for logs and ``turn_result``."""
    status = getattr(exc, "status_code", None)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}{f' {status}' if status else ''}: {message}")
