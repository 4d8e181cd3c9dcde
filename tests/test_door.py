"""Who ``remote --listen`` lets in (stages.bridge.door): decisions without sockets."""

from __future__ import annotations

import pytest

from stages.bridge.door import MAX_REMEMBERED, Door, networks


def door(avatars: dict[str, str], allow=("127.0.0.1", "::1", "192.168.1.0/24"), limit: int = 3) -> Door:
    return Door(networks(list(allow)), avatars, limit)


def test_only_allowed_addresses_of_an_avatar_come_in():
    d = door({"front": "192.168.1.21", "back": "192.168.1.22"})
    assert d.admit("192.168.1.21", 0) == ("front", "")
    assert d.admit("::ffff:192.168.1.22", 0) == ("back", "")  # a dual-stack listener's view of IPv4
    assert d.admit("192.168.1.23", 0) == (None, "no avatar in [remote.avatars] has this address")
    assert d.admit("10.0.0.21", 0) == (None, "not in [remote] allow")
    assert d.admit("not an address", 0)[0] is None


def test_one_avatar_takes_any_allowed_address_and_loopback_is_the_default():
    d = door({"default": ""}, allow=("127.0.0.1", "::1"))
    assert d.admit("127.0.0.1", 0) == ("default", "") and d.admit("::1", 0) == ("default", "")
    assert d.admit("192.168.1.21", 0)[0] is None


def test_the_connection_limit_counts_every_avatar():
    d = door({"front": "192.168.1.21"}, limit=2)
    assert d.admit("192.168.1.21", 1)[0] == "front"
    assert d.admit("192.168.1.21", 2) == (None, "[remote] max_connections = 2 are open")


def test_each_refused_address_is_reported_once_and_the_memory_is_bounded():
    d = door({})
    assert d.refuse("10.0.0.1") and not d.refuse("10.0.0.1") and d.refused["10.0.0.1"] == 2
    for i in range(MAX_REMEMBERED + 10):
        d.refuse(f"10.1.{i // 256}.{i % 256}")
    assert len(d.refused) == MAX_REMEMBERED


def test_a_bad_allow_entry_is_named():
    with pytest.raises(ValueError, match="'192.168.1.300'"):
        networks(["192.168.1.300"])
