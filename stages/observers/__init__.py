"""Observers: processes that watch the bus and are never in the path of speech.

Each is its own program (``mmdagent-llm observe <name>``) and a :class:`broker.runtime.Stage`
like the pipeline's: it connects to the session's private bus with the session's keys,
beats a heartbeat (``status`` lists it), and can be started or stopped at any moment, by hand,
from ``deploy/supervisord.conf`` (the ``observers`` group) or from a ``Procfile`` line.

Why one cannot slow speech: an observer only subscribes to the bus (the broker's XPUB drops
what a slow or stopped subscriber cannot take, and never waits for it), and the one that
sends anything, ``captions``, sends on the ``commands`` queue that the bridge drains one item
at a time between speech commands.

- :mod:`.transcript`: one JSON line per event, per session file (``mmdagent-llm transcript``).
- :mod:`.captions`: subtitles inside the MMDAgent-EX window (``CAPTION_*``).
- :mod:`.subtitles`: a web page for an OBS browser source.
- :mod:`.metrics`: Prometheus metrics.
"""
