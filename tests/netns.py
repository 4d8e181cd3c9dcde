"""Several hosts on one machine: one Linux network namespace per host, all on one IPv4 subnet.

``with hosts(["pipe", "gpu"]) as (pipe, gpu):`` makes, for this run only:

- a *hub* namespace holding a bridge (the subnet's switch), and one namespace per host, named
  ``mmdl-<pid>-<random>-<name>`` so two runs on one machine never meet;
- per host a veth pair, ``eth0`` inside the host and a port of the bridge in the hub. Both ends
  are created directly in their namespaces, so nothing appears in the machine's own namespace
  and the interface names are the same in every run (``eth0``; ``h0``, ``h1``... in the hub);
- a random ``10.a.b.0/24`` per run, hosts at ``.2``, ``.3``, ... in the order given; ``lo`` is
  up everywhere (a host's own 127.0.0.1 is its alone).

It returns once every bridge port forwards. A :class:`Host` runs commands inside it
(:meth:`Host.popen`, :meth:`Host.argv` for a command line given to someone else), or lets this
process open sockets there (:meth:`Host.entered`, :meth:`Host.zmq_context`). On leaving, even
after a failure, every process in the hosts is killed and every namespace deleted (their
interfaces go with them). Processes get SIGTERM first, to stop as they would on a machine.

Needs Linux, root and ``ip`` (iproute2); elsewhere :func:`hosts` skips the test, saying why.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
import zmq

IP = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
NETNS_DIR = Path("/run/netns")          # where `ip netns add` mounts a namespace's handle
CLONE_NEWNET = 0x40000000
BRIDGE = "br0"                          # in the hub namespace
NAME = re.compile(r"[a-z][a-z0-9]{0,11}")   # short: it ends the namespace's name
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message has its arguments and stderr."""


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; its stdout. NetnsError on failure when ``check``."""
    assert IP is not None
    done = subprocess.run([IP, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    return done.stdout


@functools.cache
def unavailable() -> str | None:
    """Why hosts cannot be made here (None: they can). Tries a namespace with a bridge and a veth
    pair once per process: a container may forbid them even to root."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and veth pairs need root"
    if IP is None:
        return "no `ip` command (install iproute2)"
    probe = f"mmdl-{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        ip("netns", "add", probe)
    except NetnsError as exc:
        return f"cannot make a network namespace: {exc}"
    try:
        ip("-n", probe, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    except NetnsError as exc:
        return f"cannot make a bridge or a veth pair: {exc}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def _net_inode(path: str | Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class Host:
    """One host: ``name`` (as given), ``namespace`` (its network namespace), ``address`` (IPv4 on
    the subnet), ``subnet`` (``10.a.b.0/24``)."""

    def __init__(self, name: str, namespace: str, address: str, subnet: str, port: str) -> None:
        self.name, self.namespace, self.address, self.subnet = name, namespace, address, subnet
        self.port = port                  # its bridge port in the hub namespace
        self.procs: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address}, netns {self.namespace})"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` to be run in this host: ``ip netns exec <namespace> argv...``. ``ip`` execs the
        command (same pid, same environment and working folder), so the pid is the command's."""
        assert IP is not None
        return [IP, "netns", "exec", self.namespace, *argv]

    def command(self, command: str) -> str:
        """A command line (split at spaces, e.g. a ``.mdf`` plugin line) run in this host."""
        return " ".join([*self.argv([]), command])

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """``subprocess.Popen`` of ``argv`` in this host (same keywords; ``env`` is passed on as is).
        The process is ended (SIGTERM, then SIGKILL) when the hosts are removed, if still running."""
        proc = subprocess.Popen(self.argv(argv), **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``argv`` in this host."""
        return subprocess.run(self.argv(argv), **kwargs)

    def pids(self) -> list[int]:
        """Every process whose network namespace is this host's (not this test process)."""
        out = ip("netns", "pids", self.namespace, check=False)
        return [pid for pid in map(int, out.split()) if pid != os.getpid()]

    def holds(self, pid: int) -> bool:
        """Whether process ``pid`` runs in this host's network namespace."""
        mine = _net_inode(NETNS_DIR / self.namespace)
        return mine is not None and _net_inode(f"/proc/{pid}/ns/net") == mine

    @contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread in this host's network namespace (other threads stay where they are).

        A socket made meanwhile belongs to the host for its whole life, wherever it is used from
        later: e.g. a server this test process runs in the host (bind it here, serve from any
        thread)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(NETNS_DIR / self.namespace, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)  # failing here would leave the thread in the host: let it raise
        finally:
            os.close(target)
            os.close(home)

    @contextmanager
    def zmq_context(self) -> Iterator[zmq.Context]:
        """A ZeroMQ context whose connections are made from this host; destroyed on leaving.

        libzmq opens a tcp connection in its I/O thread, which it starts with the context's first
        socket and which inherits the namespace of the thread starting it: so that first socket is
        made here, inside. A ``bind`` is done by the calling thread: bind inside :meth:`entered`."""
        with self.entered():
            ctx = zmq.Context()
            ctx.socket(zmq.PUB).close(linger=0)
        try:
            yield ctx
        finally:
            ctx.destroy(linger=0)


def _subnet() -> ipaddress.IPv4Network:
    # the hub is reachable from nowhere else, but distinct subnets keep two runs' logs apart
    return ipaddress.IPv4Network(f"10.{64 + secrets.randbelow(190)}.{secrets.randbelow(256)}.0/24")


@contextmanager
def hosts(names: Sequence[str], timeout: float = 10.0) -> Iterator[list[Host]]:
    """One :class:`Host` per name, in order, joined on one fresh subnet; all removed on leaving.

    Names are short lowercase words (``[a-z][a-z0-9]*``, at most 12 characters), each once.
    Skips the calling test where hosts cannot be made (:func:`unavailable`)."""
    if len(set(names)) != len(names) or not all(NAME.fullmatch(n) for n in names):
        raise ValueError(f"host names must be distinct short lowercase words: {list(names)}")
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    prefix = f"mmdl-{os.getpid()}-{secrets.token_hex(2)}"
    subnet = _subnet()
    addresses = list(subnet.hosts())[1:]        # .1 left for a gateway, should one be needed
    hub = f"{prefix}--hub"                      # "--": no host name can end like this
    made: list[str] = []
    members = [Host(name, f"{prefix}-{name}", str(addresses[i]), str(subnet), f"h{i}")
               for i, name in enumerate(names)]
    try:
        for namespace in (hub, *(h.namespace for h in members)):
            ip("netns", "add", namespace)
            made.append(namespace)
            ip("-n", namespace, "link", "set", "dev", "lo", "up")
        ip("-n", hub, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0")
        ip("-n", hub, "link", "set", "dev", BRIDGE, "up")
        for host in members:
            ip("link", "add", "eth0", "netns", host.namespace, "type", "veth", "peer", "name", host.port, "netns", hub)
            ip("-n", hub, "link", "set", "dev", host.port, "master", BRIDGE)
            ip("-n", hub, "link", "set", "dev", host.port, "up")
            ip("-n", host.namespace, "addr", "add", f"{host.address}/{subnet.prefixlen}", "dev", "eth0")
            ip("-n", host.namespace, "link", "set", "dev", "eth0", "up")
        _wait_forwarding(hub, [h.port for h in members], timeout)
        yield members
    finally:
        _remove(members, made)


def _wait_forwarding(hub: str, ports: list[str], timeout: float) -> None:
    """Until every port of the hub's bridge forwards (its veth pair is up at both ends)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = ip("-n", hub, "-d", "-o", "link", "show", "master", BRIDGE).splitlines()
        forwarding = {line.split(":")[1].strip().split("@")[0] for line in lines if "state forwarding" in line}
        if set(ports) <= forwarding:
            return
        if time.monotonic() > deadline:
            raise NetnsError(f"bridge ports not forwarding after {timeout} s: {sorted(set(ports) - forwarding)}")
        time.sleep(0.02)  # no event to wait on: the kernel reports link states only when asked


def _remove(members: list[Host], namespaces: list[str]) -> None:
    """End every process in the hosts (SIGTERM, then SIGKILL what is left), reap ours, delete the
    namespaces; each step runs even if an earlier one failed, and what went wrong is raised."""
    errors: list[str] = []
    made = [h for h in members if h.namespace in namespaces]
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        for host in made:
            for pid in host.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        # a process that exited is no longer listed (its namespaces go at exit), zombie or not
        while any(h.pids() for h in made) and time.monotonic() < deadline:
            time.sleep(0.05)  # no event tells when an unrelated process has exited
    errors += [f"{h.name}: pids {h.pids()} still running" for h in made if h.pids()]
    for host in members:
        for proc in host.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                errors.append(f"{host.name}: pid {proc.pid} did not end")
    for namespace in reversed(namespaces):
        try:
            ip("netns", "del", namespace)
        except NetnsError as exc:
            errors.append(str(exc))
    if errors:
        raise NetnsError("; ".join(errors))
