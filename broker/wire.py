"""The wire: one envelope, and every kind of message the pipeline sends. This module is the spec.

An observer that imports only this module (and msgpack) can decode every message on the bus.

Frames
------
Every ZeroMQ message is two frames: ``[topic, payload]``.

- ``topic`` is UTF-8 bytes: the kind, or ``kind.detail`` for kinds that have a detail (see
  :func:`topic_of`). It is a frame of its own so that SUB prefix matching never looks at
  payload bytes. Subscribing to ``b"mmd."`` gets every MMDAgent-EX line,
  ``b"mmd.RECOG_EVENT_STOP"`` only recognition results, ``b""`` everything.
- ``payload`` is a msgpack map, the envelope:

  ========== ======= ==========================================================================
  key        type    meaning
  ========== ======= ==========================================================================
  ``v``      int     envelope version, :data:`VERSION`. A receiver drops other versions.
  ``kind``   str     one of :data:`KINDS`.
  ``session`` str    the conversation (one MMDAgent-EX avatar); ``"default"`` unless configured.
  ``turn``   int     the turn this message belongs to; ``0`` when it belongs to none.
  ``seq``    int     per sender, +1 per message sent: gaps show loss, resets show a restart.
  ``sender`` str     the stage that made it (``bridge``, ``llm``, ``segmenter``, ...).
  ``ts``     float   when it was made (``time.time()``, seconds).
  ``origin`` float   when the input that caused it arrived in the pipeline; carried along the
                     chain so the last stage can tell end-to-end latency. Equals ``ts`` on
                     messages that start a chain.
  ``body``   map     kind-specific fields, below.
  ========== ======= ==========================================================================

Where each kind travels
-----------------------
*Work queues* (PUSH to the broker, PULL from the broker; never dropped, one consumer):
``tokens`` (llm -> segmenter), ``segments`` (segmenter -> sequencer), ``commands``
(sequencer -> bridge). The broker also mirrors every work item onto the *bus* (PUB/SUB
through the broker's XSUB/XPUB), so observers see everything without being in the path.
Bus-only kinds are published by their stage directly.

Refusal
-------
:func:`decode` refuses anything that is not exactly such a message with a :class:`WireError`
whose ``reason`` is one of a few fixed phrases. Receivers drop the message, log the first of
each reason and count the rest (a stage's heartbeat ``bad_frames``); a stage also drops, as
``wrong session``, a valid envelope whose ``session`` is not its own. Every socket that
receives from a peer has ``ZMQ_MAXMSGSIZE`` :data:`MAX_FRAME_BYTES`: a peer sending a larger
frame is disconnected by ZeroMQ before the frame is allocated. The broker's own receiving
sockets have it too, so a rogue publisher's or producer's huge frame never travels further.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

VERSION = 1
MAX_PAYLOAD_BYTES = 1 << 20  # a frame larger than this is refused, not unpacked
MAX_FRAME_BYTES = 2 << 20  # ZMQ_MAXMSGSIZE of receiving sockets: a peer sending more is disconnected
TIMER_MAX_SECONDS = 86_400  # a ``timer``'s seconds: a reminder within a day
TIMER_MAX_TEXT = 200  # characters of a ``timer``'s text
TOOL_RESULT_MAX = 300  # characters of a ``tool`` event's result
SUMMARY_MAX = 2000  # characters of a ``summary`` event's text
INPUT_MAX_TEXT = 1000  # characters of an ``input``'s text (longer is cut)
INPUT_ACTIONS = ("say", "ask", "stop")


KINDS: dict[str, str] = {
    # kind: docstring. The body fields are the spec of each message.
    "mmd": """A line that MMDAgent-EX wrote to the bridge's stdin (bus, bridge).

    body: ``type`` (str, before the first ``|``), ``args`` (list[str], the rest split on ``|``).
    topic: ``mmd.<type>``. Every line is published, including the bridge's own echoed output
    and types nobody here knows. Lines that were not valid UTF-8 arrive with U+FFFD.""",
    "command": """A message for MMDAgent-EX (work queue ``commands``: sequencer -> bridge).

    body: ``type`` (str), ``args`` (list[str]), for speech ``segment`` (int, the segment's index
    in its turn: the bridge writes them only in order, a gap means one was lost), and optionally
    ``after`` (int): a *cue*, the next sentence sent ahead, to be written the moment segment
    ``after`` of the same turn ends (its ``SYNTH_EVENT_STOP`` read by the bridge), or at once if
    it has ended already; the bridge holds one cue, and drops it when the turn is cancelled or
    another ``SYNTH_START`` is written first; and optionally ``motion`` (list[str]): the
    ``MOTION_ADD`` arguments of the sentence's gesture, written just before its ``SYNTH_START``
    and only with it (so never for a sentence a barge-in dropped). The bridge
    writes only a ``type`` in ``[bridge] allow_types`` from a ``sender`` in ``[bridge]
    allow_senders`` (others are refused, logged once per type and counted in its heartbeat's
    ``refused``), cleans every field (no ``|``, CR, LF or control characters) and caps the line
    at 2000 bytes before writing it.""",
    "written": """The bridge wrote a line to MMDAgent-EX (bus, bridge).

    body: ``type``, ``args`` (as written, after cleaning), ``bytes`` (int, line length).
    ``origin`` is the command's origin, so ``ts - origin`` is the pipeline's own latency.""",
    "turn_start": """A user utterance opens a turn (bus, bridge; see :mod:`stages.bridge.turns`).

    body: ``text`` (str, the utterance). ``turn`` is the new turn's id; ids only grow. The llm
    stage answers it; stages drop work items of older turns. A *resumed* answer (a stage was lost
    after the avatar had begun to answer, see :mod:`stages.bridge.turns`) also has ``resume``
    (int: the turn the answer that goes on was first asked under; every id of it since was
    cancelled with reason ``lost``) and ``heard`` (list[str]:
    the answer's segments written to MMDAgent-EX already, from its start): the llm sends the
    answer again from its start, and on, under the new id, the segmenter skipping what
    was heard; an llm restarted meanwhile holds no answer, and
    asks for its rest with ``heard`` as the assistant's beginning (``[llm] prefill``), or
    reports the turn ``broken``. A turn the avatar opens itself (the persona's greeting when it
    starts) has ``text`` "" and ``say`` (str): the llm streams exactly that as the answer, with
    no request and nothing kept in history. A turn an ``input`` opened also has ``source`` and
    ``from`` (str: see ``input``).""",
    "tool": """The LLM called a tool during the answer (bus, llm; :mod:`stages.llm.tools`).

    body: ``name`` (str), ``ok`` (bool: it gave a result), ``seconds`` (float: how long it
    took), ``result`` (str: what the model was told, at most :data:`TOOL_RESULT_MAX`
    characters here).""",
    "input": """An input process asks the avatar to do something (bus, an input: ``mmdagent-llm
    input <name>``, e.g. the control API, stream comments, idle talk; :mod:`stages.bridge.turns`
    decides).

    body: ``action`` (``say``: say ``text`` as an answer of its own, no LLM, no history; ``ask``:
    a turn as if the user had said ``text``; ``stop``: stop speaking now, the turn in progress
    cancelled with reason ``stopped``), ``text`` (str, one line, at most :data:`INPUT_MAX_TEXT`
    characters: cut there; tags ``[name]`` of the expression vocabulary work as in an answer),
    ``when`` (``now``: as the user's own utterance would, cutting off the avatar; ``idle``: only
    if nothing is going on, no turn, nobody speaking: else refused, ``busy``), ``id`` (str, at
    most 64: the input's own, echoed in ``input_result``), ``source`` (str, at most 32: which
    input), ``from`` (str, at most 64: on whose behalf, e.g. a viewer's name; "" if none).
    ``source`` and ``from`` go on in the turn's ``turn_start`` for observers; the llm gets only
    ``text``, so an input that passes on someone else's words (comments) puts them in ``text``
    as data, in a template of its own.""",
    "input_result": """What came of an ``input`` (bus, bridge).

    body: ``id`` (the input's), ``ok`` (bool), ``reason`` (str: "" when ``ok``; ``busy``: ``when``
    was ``idle`` and something was going on; ``away``: recognition is paused; ``empty``: no
    text; ``invalid``: not a request this bridge knows). ``turn``: the turn it opened or
    stopped, 0 if none.""",
    "summary": """The oldest exchanges of the history were folded into its summary, or that
    failed (bus, llm; :mod:`stages.llm.summary`).

    body: ``ok`` (bool), ``exchanges`` (int: how many were to be folded), ``text`` (str: the
    summary now, at most :data:`SUMMARY_MAX` characters here; "" when not ``ok``), ``error``
    (str: why it failed; "" when ``ok``). A failure changes nothing: the exchanges stay in the
    history, and the summary is asked for again after a later turn.""",
    "timer": """The LLM set a reminder (bus, llm; its ``set_timer`` tool).

    body: ``seconds`` (int, 1 to :data:`TIMER_MAX_SECONDS`), ``text`` (str, at most
    :data:`TIMER_MAX_TEXT` characters). The bridge, and
    only for a ``timer`` from the llm, writes ``TIMER_START|<an alias of its own>|<seconds>``
    (if ``TIMER_START`` is in ``[bridge] allow_types``) and, at that alias's
    ``TIMER_EVENT_STOP``, has the avatar say ``text`` as a turn of its own (``turn_start``'s
    ``say``) at the first moment it is free.""",
    "cancel": """A turn is cancelled: drop everything of it, now (bus, bridge).

    body: ``reason`` (``interrupted``: the user started speaking; ``superseded``: a newer
    utterance came; ``away``: recognition paused; ``failed``: the turn ended with the failure
    notice; ``restarted``: asked again under a new id before a word was said; ``gone``: a new
    bridge started, so the one that asked for every turn up to ``turn`` has gone, with its
    MMDAgent-EX: published by each bridge once it is ready, with ``turn`` just below its own
    first turn id, so no stage waits for events a dead MMDAgent-EX cannot send; and by a
    remote bridge for its current turn when its avatar's connection ends; ``lost``: a stage
    was lost in the middle of the answer, whose rest comes as a resumed turn (``turn_start``'s
    ``resume``): the llm keeps the answer going, the others drop this id's items), ``stopped`` (bool: ``SYNTH_STOP`` was written,
    so one more ``SYNTH_EVENT_STOP`` will come for the stopped speech), ``spoken`` (list[str]:
    the turn's segments whose ``SYNTH_EVENT_START`` came, i.e. what the user heard). It travels
    on the bus, which every stage reads before its work queue, so it never waits behind
    queued tokens or segments. Every item of this turn or an older one is dropped after it. A
    bridge publishes its latest cancel again when a pipeline process restarts (one that was down,
    or a broker that was, would have missed it).""",
    "spoken": """Every segment of a turn has been spoken or given up (bus, sequencer).

    body: ``segments`` (int). Not sent for a cancelled turn. The bridge's turn control takes
    the turn as over.""",
    "token": """A piece of the answer as the LLM streamed it (work queue ``tokens``: llm -> segmenter).

    body: ``text`` (str), ``index`` (int, 0-based within the turn: a gap means tokens were
    lost), and on the first token of a resumed answer ``heard`` (list[str]: the segments the user
    heard already; the segmenter cuts the text as usual but does not send again what they hold). ``origin``
    is when the llm process received it.""",
    "segment": """A speakable piece of the answer (work queue ``segments``: segmenter -> sequencer).

    body: ``text`` (str, clean speech, its tags taken out), ``index`` (int, 0-based within the
    turn), ``tags`` (list[str], the names of the known ``[name]`` tags of this sentence, in order:
    see :mod:`stages.expression`). ``origin`` is the arrival in llm of the token that completed
    the segment.""",
    "turn_end": """No more work items of this turn will follow (work queues ``tokens`` then ``segments``).

    body: ``reason`` (``done``, ``error``, or a cancel reason), ``segments`` (int, how many segments
    the turn had; 0 on the ``tokens`` queue, filled in by the segmenter), ``tokens`` (int, how
    many tokens the llm sent for the turn).""",
    "turn_result": """The llm stage closed a turn (bus, llm).

    body: ``reason`` (as turn_end), ``answer`` (str, the text the LLM produced), ``error``
    (str, one line, empty if none; never contains secrets), ``cause`` (str, empty unless
    ``reason`` is ``error``: one of :data:`CAUSES`, e.g. ``authentication``,
    ``unreachable``, ``model_not_found``, ``rate_limited``, ``timeout``), ``first_token``
    (float: when the LLM's first token arrived in the llm process, ``time.time()``; 0.0 when
    none came; the apology is not an LLM token). Observers take the time to the first token
    from here rather than subscribing to every ``token``.""",
    "speech": """The sequencer's view of one segment being spoken (bus, sequencer).

    body: ``model`` (alias), ``index``, ``text``, ``state``: ``sent`` (SYNTH_START written),
    ``started`` (SYNTH_EVENT_START came), ``finished`` (SYNTH_EVENT_STOP came), ``timeout``
    (no event in time: e.g. an unknown voice alias), ``dropped`` (never written: its turn was
    cancelled or superseded), ``interrupted`` (cut off by ``SYNTH_STOP``), ``stopped`` (the
    cut-off speech's ``SYNTH_EVENT_STOP`` came, or ``cut_timeout`` passed); ``tags`` (the
    segment's tag names) and ``voice`` (the voice alias its expression gave it).""",
    "heartbeat": """A stage is alive (bus, every stage, each second).

    body: ``stage`` (str), ``pid`` (int), ``ready`` (bool: its subscriptions are in place, it
    has seen its own heartbeat come back through the broker), ``info`` (map, stage-specific:
    llm's ``backend``, ``model`` and ``errors`` (failed turns by cause since its start); the
    segmenter's ``seconds_per_char`` (voice alias -> the speaking rate it learned); the
    bridge's ``bad_input`` (stdin problems by reason), ``refused`` (commands it would not write,
    by ``type X`` or ``sender X``), ``restarts`` (stage name -> how often a new pid took over
    since the bridge started) and ``turns`` (the last turns' ``turn``, ``first_token``,
    ``first_synth``, ``first_speech`` in ms or None, see :mod:`stages.latency`)),
    ``bad_frames`` (map: :attr:`WireError.reason` -> count of refused messages received since
    start; empty when none; not in the broker's, which decodes nothing), ``duplicates`` (map:
    stage name -> the pids of two or more live processes of that name on the bus; empty when
    none; not in the broker's), ``owner`` (int: the pid whose end stops this process, the plugin
    that started it; 0 when none: a plugin does not join a pipeline whose owner has ended, it is
    on its way out). topic: ``heartbeat.<stage>``.""",
    "broken": """A stage could not do its whole part of a turn (bus, any stage).

    body: ``stage`` (str), ``reason`` (str). E.g. a segmenter restarted in the middle of a turn
    sees its tokens from the middle on. The bridge then ends or asks again the turn (see
    :mod:`stages.bridge.turns`); the stage drops the rest of that turn.""",
    "notice": """Something a person should read (bus, any stage or command).

    body: ``level`` (``info``, ``warning``, ``error``), ``text`` (str). The bridge shows an
    ``error`` one with ``NOTIFY_SHOW`` (``[turn] notify_errors``), the console prints it; e.g.
    ``mmdagent-llm doctor --notice``, run at the start of ``plugin`` and ``console``, says so
    when the LLM server refuses the key.""",
}

#: why a turn failed (``turn_result``'s ``cause``), with what a person can do about it
CAUSES = {
    "authentication": "the API key was refused (OPENAI_API_KEY)",
    "permission": "the key may not use this model or endpoint",
    "model_not_found": "the server does not know [llm] model",
    "wrong_url": "the server at OPENAI_BASE_URL answered 404 for /chat/completions: does the URL end in /v1?",
    "rate_limited": "rate limit or quota reached (after the retries)",
    "server_error": "the LLM server failed (5xx, after the retries)",
    "bad_request": "the server refused the request (400/422)",
    "unreachable": "no connection to the LLM server (OPENAI_BASE_URL)",
    "openai_unreachable": "no connection to OpenAI's API (api.openai.com): check the network and any proxy",
    "connection_lost": "the connection to the LLM server broke in the middle of the answer",
    "timeout": "the LLM server did not answer in time",
    "stream_error": "the server sent an error in the middle of the answer",
    "other": "an unexpected failure (see the log)",
}


#: which kinds have a topic detail, and which body field supplies it
_TOPIC_DETAIL = {"mmd": "type", "heartbeat": "stage"}


class WireError(ValueError):
    """A frame that is not a valid envelope.

    :attr:`reason` is one of a small fixed set of short phrases (:data:`REASONS`, plus
    ``bad field <name>`` for each envelope field), fit for counting; the message adds the
    details of this frame (never more than a few dozen characters of what it carried).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


#: why :func:`decode` refuses a frame (besides ``bad field <name>``)
REASONS = ("wrong frame count", "payload too large", "not msgpack", "not a map", "wrong version",
           "unknown kind", "topic mismatch")


def _short(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut: a rogue frame's content goes into a log line."""
    if not isinstance(value, (str, bytes, int, float, type(None))):
        return f"a {type(value).__name__}"  # no repr of a container: it may be huge or deeply nested
    text = repr(value[: limit + 1] if isinstance(value, (str, bytes)) else value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class Envelope:
    kind: str
    body: dict[str, Any] = field(default_factory=dict)
    session: str = "default"
    turn: int = 0
    seq: int = 0
    sender: str = ""
    ts: float = 0.0
    origin: float = 0.0

    @property
    def topic(self) -> str:
        return topic_of(self.kind, self.body)


def topic_of(kind: str, body: dict[str, Any]) -> str:
    """``kind``, or ``kind.detail`` for kinds with a topic detail (``mmd.SYNTH_EVENT_STOP``).

    The detail is the body field if it is a str, else empty (``heartbeat.``)."""
    detail_key = _TOPIC_DETAIL.get(kind)
    if detail_key is None:
        return kind
    detail = body.get(detail_key, "")
    return f"{kind}.{detail if isinstance(detail, str) else ''}"


def encode(env: Envelope) -> list[bytes]:
    """The two frames of ``env``."""
    payload = msgpack.packb(
        {
            "v": VERSION,
            "kind": env.kind,
            "session": env.session,
            "turn": env.turn,
            "seq": env.seq,
            "sender": env.sender,
            "ts": env.ts,
            "origin": env.origin,
            "body": env.body,
        },
        use_bin_type=True,
    )
    return [env.topic.encode("utf-8"), payload]


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "kind": str,
    "session": str,
    "turn": int,
    "seq": int,
    "sender": str,
    "ts": (int, float),
    "origin": (int, float),
    "body": dict,
}


def decode(frames: list[bytes]) -> Envelope:
    """Parse ``[topic, payload]``; raise :class:`WireError` with the reason if it is not an envelope.

    Refused: not exactly two frames; a payload over :data:`MAX_PAYLOAD_BYTES` (before any
    unpacking); a payload that is not one complete msgpack object (truncated, trailing bytes,
    too deeply nested); not a map; ``v`` not the int :data:`VERSION`; a field missing or of
    the wrong type (``bool`` is not an int); a kind not in :data:`KINDS`; a topic frame that
    is not :func:`topic_of` the envelope (SUB filtering trusts the topic).
    """
    if len(frames) != 2:
        raise WireError("wrong frame count", f"expected 2 frames, got {len(frames)}")
    payload = frames[1]
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError("payload too large", f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireError("not msgpack", f"payload is not msgpack: {type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise WireError("not a map", f"payload is not a map but {type(raw).__name__}")
    version = raw.get("v")
    if type(version) is not int or version != VERSION:
        raise WireError("wrong version", f"envelope version {_short(version)}, expected {VERSION}")
    for key, typ in _FIELD_TYPES.items():
        if not isinstance(raw.get(key), typ) or isinstance(raw.get(key), bool):
            names = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
            raise WireError(f"bad field {key}", f"field {key!r} missing or not {names}")
    if raw["kind"] not in KINDS:
        raise WireError("unknown kind", f"unknown kind {_short(raw['kind'])}")
    if frames[0] != topic_of(raw["kind"], raw["body"]).encode("utf-8", errors="replace"):
        raise WireError("topic mismatch", f"topic {_short(bytes(frames[0]))} for a {raw['kind']}")
    return Envelope(
        kind=raw["kind"],
        body=raw["body"],
        session=raw["session"],
        turn=raw["turn"],
        seq=raw["seq"],
        sender=raw["sender"],
        ts=float(raw["ts"]),
        origin=float(raw["origin"]),
    )


class Sender:
    """Stamps outgoing envelopes of one stage: sender name, session, sequence number, times."""

    def __init__(self, sender: str, session: str = "default") -> None:
        self.sender = sender
        self.session = session
        self._seq = itertools.count(1)

    def make(self, kind: str, body: dict[str, Any] | None = None, *, turn: int = 0,
             origin: float | None = None) -> Envelope:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        now = time.time()
        return Envelope(kind=kind, body=body or {}, session=self.session, turn=turn,
                        seq=next(self._seq), sender=self.sender, ts=now,
                        origin=now if origin is None else origin)
