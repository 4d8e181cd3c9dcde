"""Who may come in through ``mmdagent-llm remote --listen``: pure decisions, no sockets.

Plugin_Remote is plain, unauthenticated TCP: whoever connects can speak as the avatar (and
spend the owner's API key). So a connection is admitted only if:

- its address is in ``[remote] allow`` (addresses or networks, ``"192.168.1.0/24"``; by
  default loopback only), and
- it belongs to an avatar: the avatar whose ``address`` it is (``[remote.avatars]``), or, when
  no avatars are configured, the one avatar this configuration describes, and
- fewer than ``[remote] max_connections`` are open (counted over every avatar).

Anything else is refused at once. :class:`Door` remembers whom it refused, so each address is
logged once (the count goes on), and forgets the oldest past :data:`MAX_REMEMBERED` addresses.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

MAX_REMEMBERED = 1000  # refused addresses remembered (logged once each); a flood cannot grow it

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(allow: list[str]) -> list[Network]:
    """``[remote] allow`` parsed; a bad entry raises ``ValueError`` naming it."""
    out = []
    for entry in allow:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"[remote] allow: {entry!r} is not an address or network (e.g. \"192.168.1.0/24\")") \
                from None
    return out


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # a dual-stack listener sees ::ffff:a.b.c.d
    return mapped or address


@dataclass
class Door:
    """Admission to the listener: :meth:`admit` names the avatar, or says why not."""
    allow: list[Network]
    avatars: dict[str, str]   # avatar name -> its address ("" when there is one avatar, from anywhere allowed)
    max_connections: int
    refused: dict[str, int] = field(default_factory=dict)  # address -> connections refused

    def admit(self, peer: str, open_now: int) -> tuple[str | None, str]:
        """(avatar, "") for a connection from ``peer`` when ``open_now`` are open, or (None, why)."""
        address = _address(peer)
        if address is None or not any(address in net for net in self.allow):
            return None, "not in [remote] allow"
        if open_now >= self.max_connections:
            return None, f"[remote] max_connections = {self.max_connections} are open"
        for name, own in self.avatars.items():
            if not own or _address(own) == address:
                return name, ""
        return None, "no avatar in [remote.avatars] has this address"

    def refuse(self, peer: str) -> bool:
        """Count a refusal; True the first time for ``peer`` (then log it)."""
        first = peer not in self.refused
        if first and len(self.refused) >= MAX_REMEMBERED:
            del self.refused[next(iter(self.refused))]
        self.refused[peer] = self.refused.get(peer, 0) + 1
        return first
