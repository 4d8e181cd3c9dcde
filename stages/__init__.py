"""The pipeline's processes and what a person runs; the bus they share is in :mod:`broker`.

Where each role lives:

- ``broker/``: the bus and how to be on it: the wire spec (:mod:`broker.wire`), the broker
  process, the :class:`broker.runtime.Stage` loop, liveness, keys (:mod:`broker.curve`),
  configuration and sessions.
- ``stages/bridge/``: MMDAgent-EX's plugin process, its turn control and its line format.
- ``stages/llm/``: the LLM stage, its HTTP client, the history and the offline responder.
- ``stages/segmenter/``: tokens to speakable sentences.
- ``stages/sequencer/``: one ``SYNTH_START`` at a time.
- ``stages/observers/``: processes that watch the bus and are never in the path of speech.
- ``stages/commands/``: what a person runs: the CLI, plugin, console, launcher, doctor,
  status, transcript reader and the simulated MMDAgent-EX.
- :mod:`stages.states` and :mod:`stages.latency`: the explicit states and the turn clock that
  several stages share.
"""
