"""The pipeline's explicit states: an enum and a transition table each, checked on every move.

Conversation (owned by the bridge, :mod:`stages.bridge.turns`: who may speak now)::

    IDLE --RECOG_EVENT_START--> LISTENING --RECOG_EVENT_STOP--> ANSWERING --all spoken--> IDLE
    IDLE --RECOG_EVENT_STOP (no START came)--> ANSWERING
    LISTENING --no RECOG_EVENT_STOP within listen_timeout (a noise)--> IDLE
    ANSWERING --RECOG_EVENT_START, policy "interrupt": cancel--> LISTENING
    ANSWERING --RECOG_EVENT_START once the avatar answers, [turn] echo_guard or backchannels on--> HEARING
    HEARING --its own voice, a backchannel, an empty result, or no result (echo guard: a noise)--> ANSWERING
    HEARING --other words: cancel, new turn--> ANSWERING (through HOLDING)
    HEARING --backchannel_wait over with no result (echo guard off): cancel--> LISTENING
    HEARING --the answer all said while the voice goes on--> LISTENING
    (HEARING is ANSWERING in every other respect: speech, cues, failures, a stage lost, away)
    ANSWERING --RECOG_EVENT_STOP: cancel (superseded), new turn--> ANSWERING
    any --RECOG_EVENT_AWAY|ON (cancels an answer)--> AWAY --RECOG_EVENT_AWAY|OFF--> IDLE
    IDLE/LISTENING/ANSWERING --utterance while a stage is down--> HOLDING
    ANSWERING --a stage restarted before anything was said: replay--> HOLDING
    HOLDING --pipeline up again--> ANSWERING
    HOLDING --older than max_age: failure notice--> IDLE
    ANSWERING --a stage restarted after speech began, or no progress: failure notice--> IDLE
    any --the avatar app gone (a remote bridge's connection ended)--> IDLE

LLM request of a turn (owned by the llm stage)::

    IDLE --utterance--> REQUESTING --first token--> STREAMING --end of stream--> IDLE
    REQUESTING/STREAMING --error, timeout, superseded--> IDLE

Speech, per model alias (owned by the sequencer)::

    IDLE --SYNTH_START sent--> SENT --SYNTH_EVENT_START--> SPEAKING --SYNTH_EVENT_STOP--> IDLE
    SENT --no SYNTH_EVENT_START in time (unknown voice alias)--> IDLE
    SPEAKING --no SYNTH_EVENT_STOP in time--> IDLE
    SENT/SPEAKING --SYNTH_STOP sent--> STOPPING --SYNTH_EVENT_STOP or timeout--> IDLE

A move that is not in the table raises :class:`IllegalTransition`: a bug shows up at once
instead of as a wedged avatar.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import Generic, TypeVar

log = logging.getLogger("mmdagent_llm")


class ConversationState(enum.Enum):
    IDLE = "idle"
    LISTENING = "listening"
    ANSWERING = "answering"
    HEARING = "hearing"   # answering, and a voice is heard whose words decide whether it interrupts
    HOLDING = "holding"
    AWAY = "away"


class TurnState(enum.Enum):
    IDLE = "idle"
    REQUESTING = "requesting"
    STREAMING = "streaming"


class SpeechState(enum.Enum):
    IDLE = "idle"
    SENT = "sent"
    SPEAKING = "speaking"
    STOPPING = "stopping"


CONVERSATION_TRANSITIONS: dict[ConversationState, set[ConversationState]] = {
    ConversationState.IDLE: {ConversationState.LISTENING, ConversationState.ANSWERING, ConversationState.HOLDING,
                             ConversationState.AWAY},
    ConversationState.LISTENING: {ConversationState.ANSWERING, ConversationState.IDLE, ConversationState.HOLDING,
                                  ConversationState.AWAY},
    ConversationState.ANSWERING: {ConversationState.IDLE, ConversationState.LISTENING, ConversationState.ANSWERING,
                                  ConversationState.HOLDING, ConversationState.AWAY, ConversationState.HEARING},
    ConversationState.HEARING: {ConversationState.ANSWERING, ConversationState.LISTENING, ConversationState.IDLE,
                                ConversationState.HOLDING, ConversationState.AWAY},
    ConversationState.HOLDING: {ConversationState.ANSWERING, ConversationState.HOLDING, ConversationState.IDLE,
                                ConversationState.AWAY},
    ConversationState.AWAY: {ConversationState.IDLE},
}

TURN_TRANSITIONS: dict[TurnState, set[TurnState]] = {
    TurnState.IDLE: {TurnState.REQUESTING},
    TurnState.REQUESTING: {TurnState.STREAMING, TurnState.IDLE},
    TurnState.STREAMING: {TurnState.IDLE},
}

SPEECH_TRANSITIONS: dict[SpeechState, set[SpeechState]] = {
    SpeechState.IDLE: {SpeechState.SENT},
    SpeechState.SENT: {SpeechState.SPEAKING, SpeechState.STOPPING, SpeechState.IDLE},
    SpeechState.SPEAKING: {SpeechState.IDLE, SpeechState.STOPPING},
    SpeechState.STOPPING: {SpeechState.IDLE},
}

S = TypeVar("S", ConversationState, TurnState, SpeechState)


class IllegalTransition(RuntimeError):
    pass


class Machine(Generic[S]):
    """A current state, the time it was entered, and checked moves along ``table``."""

    def __init__(self, name: str, table: dict[S, set[S]], initial: S) -> None:
        self.name = name
        self.table = table
        self.state = initial
        self.since = time.monotonic()

    def move(self, new: S, why: str = "") -> None:
        if new not in self.table[self.state]:
            raise IllegalTransition(f"{self.name}: {self.state.value} -> {new.value} ({why})")
        log.debug("%s: %s -> %s %s", self.name, self.state.value, new.value, why)
        self.state = new
        self.since = time.monotonic()

    def __eq__(self, other: object) -> bool:
        return self.state == other

    def __hash__(self) -> int:
        return hash(self.state)
