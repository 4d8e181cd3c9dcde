"""Which processes of the pipeline are alive, from their heartbeats.

Every process publishes ``heartbeat.<name>`` once a second with its pid. A peer is *alive*
while its ready heartbeats keep coming; *gone* after ``timeout`` seconds without one; a
heartbeat with a new pid means it was *restarted* (supervisord may bring a killed process
back before anyone noticed it was gone). Each change is logged once, when it happens:
a dead peer is not logged again every second, and its return is logged too.

Two processes with one name on the bus (a stage started twice) would look like a restart
every second. A pid that was replaced but beats again is therefore taken as a *duplicate*:
reported once with both pids (an error: they split or double the work), never as a restart,
and reported again only after one of them has gone and another comes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("mmdagent_llm")

PIPELINE = ("broker", "llm", "segmenter", "sequencer")


@dataclass
class _Peer:
    pid: int
    seen: float
    alive: bool = True
    replaced: dict[int, float] = field(default_factory=dict)  # earlier pids -> their last beat
    duplicate: bool = False  # an earlier pid still beats: reported


class Liveness:
    def __init__(self, watch: tuple[str, ...], timeout: float) -> None:
        self.watch = watch
        self.timeout = timeout
        self.peers: dict[str, _Peer] = {}
        self.restarts: dict[str, int] = {}  # name -> how many times a new pid took over

    def beat(self, name: str, pid: int, ready: bool, now: float) -> str | None:
        """A heartbeat; returns ``"up"`` (first seen), ``"back"``, ``"restarted"`` or None."""
        if name not in self.watch or not ready:
            return None
        peer = self.peers.get(name)
        if peer is None:
            self.peers[name] = _Peer(pid, now)
            log.info("%s is up (pid %d)", name, pid)
            return "up"
        if pid in peer.replaced:  # the "restarted" one still lives: two processes, one name
            peer.replaced[pid] = now
            if not peer.duplicate:
                peer.duplicate = True
                log.error("two %s processes are on this bus, pids %d and %d: they split or double its work. "
                          "Stop one of them (was one started by hand beside supervisord or a plugin?)",
                          name, peer.pid, pid)
            return None
        if peer.pid != pid:
            log.warning("%s was restarted (pid %d, was %d)", name, pid, peer.pid)
            peer.replaced[peer.pid] = peer.seen
            peer.pid, peer.seen, peer.alive = pid, now, True
            self.restarts[name] = self.restarts.get(name, 0) + 1
            return "restarted"
        peer.seen = now
        if not peer.alive:
            peer.alive = True
            log.info("%s is back (pid %d)", name, pid)
            return "back"
        return None

    def check(self, now: float) -> list[str]:
        """Peers that have just gone silent (each reported once)."""
        gone = []
        for name, peer in self.peers.items():
            others = {p: t for p, t in peer.replaced.items() if now - t <= self.timeout}
            if peer.alive and now - peer.seen > self.timeout and others:  # one of two went: the other goes on
                pid = max(others, key=others.__getitem__)
                log.info("%s pid %d went silent; pid %d goes on", name, peer.pid, pid)
                peer.pid, peer.seen = pid, others.pop(pid)
            if peer.duplicate and not others:
                peer.duplicate = False
                log.info("one %s process is left on the bus (pid %d)", name, peer.pid)
            peer.replaced = others
            if peer.alive and now - peer.seen > self.timeout:
                peer.alive = False
                gone.append(name)
                log.warning("%s is gone: no heartbeat for %.1f s", name, self.timeout)
        return gone

    def duplicates(self) -> dict[str, list[int]]:
        """Names with more than one live process, and their pids."""
        return {name: sorted([peer.pid, *peer.replaced]) for name, peer in self.peers.items() if peer.duplicate}

    def missing(self) -> list[str]:
        """Watched peers not alive now (never seen, or gone)."""
        return [n for n in self.watch if n not in self.peers or not self.peers[n].alive]

    def next_deadline(self) -> float | None:
        alive = [p.seen for p in self.peers.values() if p.alive]
        return min(alive) + self.timeout if alive else None
