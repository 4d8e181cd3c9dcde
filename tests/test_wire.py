"""The envelope: round trip, topics, and refusal of anything that is not an envelope."""

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from broker import wire


def test_round_trip_keeps_every_field():
    env = wire.Sender("llm", "kiosk").make("token", {"text": "こんにちは|"}, turn=7, origin=12.5)
    back = wire.decode(wire.encode(env))
    assert back == env
    assert (back.sender, back.session, back.turn, back.seq, back.origin) == ("llm", "kiosk", 7, 1, 12.5)


def test_sequence_numbers_increase_per_sender():
    sender = wire.Sender("bridge")
    assert [sender.make("notice").seq for _ in range(3)] == [1, 2, 3]


def test_topics_carry_detail_in_their_own_frame():
    sender = wire.Sender("bridge")
    frames = wire.encode(sender.make("mmd", {"type": "RECOG_EVENT_STOP", "args": ["やあ"]}))
    assert frames[0] == b"mmd.RECOG_EVENT_STOP"
    assert wire.encode(sender.make("heartbeat", {"stage": "llm"}))[0] == b"heartbeat.llm"
    assert wire.encode(sender.make("segment", {"text": "x"}))[0] == b"segment"


def test_every_kind_is_documented():
    for kind, doc in wire.KINDS.items():
        assert "body" in doc and len(doc) > 40, kind


def test_unknown_kind_cannot_be_made():
    with pytest.raises(ValueError):
        wire.Sender("x").make("nonsense")


def _payload(**changes):
    good = msgpack.unpackb(wire.encode(wire.Sender("x").make("notice", {"text": "t"}))[1])
    good.update(changes)
    return [b"notice", msgpack.packb(good)]


@pytest.mark.parametrize("frames, reason", [
    ([b"only one"], "2 frames"),
    ([b"t", b"\xc1\xc1\xc1"], "not msgpack"),
    ([b"t", msgpack.packb([1, 2])], "not a map"),
    (_payload(v=2), "version"),
    (_payload(turn="seven"), "turn"),
    (_payload(turn=True), "turn"),
    (_payload(body=[1]), "body"),
    (_payload(kind="launch_missiles"), "unknown kind"),
    ([b"t", b"\x00" * (wire.MAX_PAYLOAD_BYTES + 1)], "exceeds"),
])
def test_invalid_frames_are_refused_with_a_reason(frames, reason):
    with pytest.raises(wire.WireError, match=reason):
        wire.decode(frames)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=3))
def test_random_frames_never_raise_anything_but_wire_error(frames):
    try:
        wire.decode(frames)
    except wire.WireError:
        pass
