"""Which processes of the pipeline are alive, from their heartbeats.

Every process publishes ``heartbeat.<name>`` once a second with its pid. A peer is *alive*
while its ready heartbeats keep coming; *gone* after ``timeout`` seconds without one; a
heartbeat with a new pid means it was *restarted* (supervisord may bring a killed process
back before anyone noticed it was gone). Each change is logged once, when it happens:
a dead peer is not logged again every second, and its return is logged too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("mmdagent_llm")

PIPELINE = ("broker", "llm", "segmenter", "sequencer")


@dataclass
class _Peer:
    pid: int
    seen: float
    alive: bool = True


class Liveness:
    def __init__(self, watch: tuple[str, ...], timeout: float) -> None:
        self.watch = watch
        self.timeout = timeout
        self.peers: dict[str, _Peer] = {}

    def beat(self, name: str, pid: int, ready: bool, now: float) -> str | None:
        """A heartbeat; returns ``"up"`` (first seen), ``"back"``, ``"restarted"`` or None."""
        if name not in self.watch or not ready:
            return None
        peer = self.peers.get(name)
        self.peers[name] = _Peer(pid, now)
        if peer is None:
            log.info("%s is up (pid %d)", name, pid)
            return "up"
        if peer.pid != pid:
            log.warning("%s was restarted (pid %d, was %d)", name, pid, peer.pid)
            return "restarted"
        if not peer.alive:
            log.info("%s is back (pid %d)", name, pid)
            return "back"
        return None

    def check(self, now: float) -> list[str]:
        """Peers that have just gone silent (each reported once)."""
        gone = []
        for name, peer in self.peers.items():
            if peer.alive and now - peer.seen > self.timeout:
                peer.alive = False
                gone.append(name)
                log.warning("%s is gone: no heartbeat for %.1f s", name, self.timeout)
        return gone

    def missing(self) -> list[str]:
        """Watched peers not alive now (never seen, or gone)."""
        return [n for n in self.watch if n not in self.peers or not self.peers[n].alive]

    def next_deadline(self) -> float | None:
        alive = [p.seen for p in self.peers.values() if p.alive]
        return min(alive) + self.timeout if alive else None
