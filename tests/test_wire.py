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


def _good_frames():
    return wire.encode(wire.Sender("x").make("notice", {"text": "t"}))


def _reasons():
    return set(wire.REASONS) | {f"bad field {key}" for key in wire._FIELD_TYPES}


@pytest.mark.parametrize("frames, reason", [
    ([], "wrong frame count"),
    ([b"notice"], "wrong frame count"),
    (_good_frames() + [b"extra"], "wrong frame count"),
    ([b"notice", _good_frames()[1][:-3]], "not msgpack"),                        # truncated
    ([b"notice", _good_frames()[1][:1]], "not msgpack"),
    ([b"notice", _good_frames()[1] + b"\x00"], "not msgpack"),                   # trailing bytes
    ([b"notice", b""], "not msgpack"),
    ([b"notice", b"\x91" * 5000 + b"\x90"], "not msgpack"),                      # nested too deep
    ([b"notice", msgpack.packb({1: 2})], "not msgpack"),                         # non-str keys
    ([b"notice", msgpack.packb("a string")], "not a map"),
    ([b"notice", msgpack.packb(None)], "not a map"),
    ([b"notice", msgpack.packb(7)], "not a map"),
    (_payload(v=True), "wrong version"),
    (_payload(v=1.0), "wrong version"),
    (_payload(v="1"), "wrong version"),
    (_payload(v=None), "wrong version"),
    (_payload(v=0), "wrong version"),
    (_payload(kind=7), "bad field kind"),
    (_payload(session=None), "bad field session"),
    (_payload(seq=1.5), "bad field seq"),
    (_payload(sender=b"bytes"), "bad field sender"),
    (_payload(ts="now"), "bad field ts"),
    (_payload(origin=[1.0]), "bad field origin"),
    (_payload(body="text"), "bad field body"),
    (_payload(kind="x" * 100_000), "unknown kind"),
    ([b"heartbeat.llm", _payload()[1]], "topic mismatch"),
    ([b"", _payload()[1]], "topic mismatch"),
    ([b"t", b"\x00" * (5 << 20)], "payload too large"),
])
def test_refusals_have_a_fixed_reason_and_a_short_message(frames, reason):
    with pytest.raises(wire.WireError) as caught:
        wire.decode(frames)
    assert caught.value.reason == reason
    assert str(caught.value).startswith(reason) and len(str(caught.value)) < 200


def test_a_missing_field_is_refused():
    frames = _payload()
    raw = msgpack.unpackb(frames[1])
    del raw["turn"]
    with pytest.raises(wire.WireError) as caught:
        wire.decode([frames[0], msgpack.packb(raw)])
    assert caught.value.reason == "bad field turn"


def test_the_topic_detail_is_checked_and_a_non_string_detail_gives_an_empty_one():
    sender = wire.Sender("bridge")
    frames = wire.encode(sender.make("mmd", {"type": "KEY", "args": ["a"]}))
    assert wire.decode(frames).body["type"] == "KEY"
    with pytest.raises(wire.WireError, match="topic mismatch"):
        wire.decode([b"mmd.RECOG_EVENT_STOP", frames[1]])
    odd = wire.encode(sender.make("heartbeat", {"stage": ["x"] * 3}))
    assert odd[0] == b"heartbeat." and wire.decode(odd).body["stage"] == ["x"] * 3


def test_a_payload_at_the_limit_is_still_unpacked():
    env = wire.Sender("x").make("notice", {"text": ""})
    room = wire.MAX_PAYLOAD_BYTES - len(wire.encode(env)[1]) - 8
    env.body["text"] = "a" * room
    frames = wire.encode(env)
    assert len(frames[1]) <= wire.MAX_PAYLOAD_BYTES
    assert wire.decode(frames).body["text"] == "a" * room
    assert wire.MAX_FRAME_BYTES > wire.MAX_PAYLOAD_BYTES


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=3))
def test_random_frames_are_refused_with_one_of_few_reasons(frames):
    try:
        wire.decode(frames)
    except wire.WireError as exc:
        assert exc.reason in _reasons()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_envelopes_decode_or_are_refused_with_one_of_few_reasons(data):
    frames = _good_frames()
    payload = bytearray(frames[1])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(payload) - 1)))
        if op == "flip" and payload:
            payload[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del payload[at:]
        else:
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        wire.decode([frames[0], bytes(payload)])
    except wire.WireError as exc:
        assert exc.reason in _reasons() and len(str(exc)) < 200
