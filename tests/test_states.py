"""State machines refuse moves that are not in their table."""

import pytest

from stages.states import (CONVERSATION_TRANSITIONS, IllegalTransition, Machine, SPEECH_TRANSITIONS,
                           ConversationState, SpeechState, TURN_TRANSITIONS, TurnState)


def test_speech_happy_path_and_illegal_move():
    m = Machine("speech", SPEECH_TRANSITIONS, SpeechState.IDLE)
    for s in (SpeechState.SENT, SpeechState.SPEAKING, SpeechState.IDLE):
        m.move(s)
    with pytest.raises(IllegalTransition, match="idle -> speaking"):
        m.move(SpeechState.SPEAKING)


def test_every_state_has_a_way_back_to_idle():
    for table, idle in ((TURN_TRANSITIONS, TurnState.IDLE), (SPEECH_TRANSITIONS, SpeechState.IDLE),
                        (CONVERSATION_TRANSITIONS, ConversationState.IDLE)):
        for state in table:
            seen, todo = set(), [state]
            while todo:
                s = todo.pop()
                seen.add(s)
                todo += [n for n in table[s] if n not in seen]
            assert idle in seen, state
