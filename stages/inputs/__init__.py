"""Inputs: processes that give the avatar something to say or answer besides the user's voice.

Each is its own program (``mmdagent-llm input <name>``) and a :class:`broker.runtime.Stage` on the
session's private bus, like an observer: started, stopped and restarted alone, by hand, from
``deploy/supervisord.conf`` (the ``inputs`` group) or from a ``Procfile`` line. An input never
writes to MMDAgent-EX: it publishes an ``input`` event (say, ask, stop; now or only when idle;
see :data:`broker.wire.KINDS`), the bridge's turn control decides
(:meth:`stages.bridge.turns.TurnController.on_input`: the user always comes first) and answers
with ``input_result``; what is then said goes the way of every answer, through the bridge's
cleaning and allow-list.

- :mod:`.api`: an HTTP control API (say, ask, stop, status, events).
- :mod:`.comments`: live-stream comments (OneComme, Twitch chat), under a policy.
- :mod:`.idle`: the avatar talks first after a while with no input.
"""
