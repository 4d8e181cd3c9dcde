"""The hosts harness (tests/netns.py): hosts reach each other on their subnet, each keeps its own
loopback, and leaving removes every namespace and process, also after a failure."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import zmq

from tests.netns import Host, hosts, ip


def namespaces() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}


def connect_from(host: Host, address: str, port: int) -> subprocess.CompletedProcess:
    """A process in ``host`` connects to ``address:port`` and sends its own name."""
    code = (f"import socket; s = socket.create_connection(({address!r}, {port}), timeout=5); "
            f"s.sendall({host.name.encode()!r})")
    return host.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


def test_hosts_reach_each_other_each_with_its_own_loopback():
    with hosts(["left", "right"]) as (left, right):
        assert left.address != right.address and left.subnet == right.subnet
        with right.entered():
            server = socket.create_server((right.address, 0))
            local = socket.create_server(("127.0.0.1", 0))
        with server, local:
            server.settimeout(10)
            done = connect_from(left, right.address, server.getsockname()[1])
            assert done.returncode == 0, done.stderr
            conn, (peer, _) = server.accept()
            with conn:
                assert conn.recv(16) == b"left" and peer == left.address
            # right's 127.0.0.1 is right's alone: left's own loopback has nothing there
            refused = connect_from(left, "127.0.0.1", local.getsockname()[1])
            assert refused.returncode != 0 and "ConnectionRefusedError" in refused.stderr

        # ZeroMQ from this process, as from each host: libzmq binds in the calling thread
        with left.zmq_context() as ctx:
            pull = ctx.socket(zmq.PULL)
            with right.entered():
                port = pull.bind_to_random_port(f"tcp://{right.address}")
            push = ctx.socket(zmq.PUSH)
            push.connect(f"tcp://{right.address}:{port}")
            push.send(b"over the subnet")
            assert pull.poll(10_000) and pull.recv() == b"over the subnet"
            pull.close(0)
            push.close(0)


def test_leaving_removes_namespaces_and_processes_even_after_a_failure():
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="the test failed"):
        with hosts(["solo"]) as (solo,):
            made = {solo.namespace, solo.namespace.rsplit("-", 1)[0] + "--hub"}
            assert made <= namespaces()
            # one process of ours, and one it left behind (not our child: only the namespace knows it)
            shell = solo.popen(["sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
            pids += [shell.pid, int(shell.stdout.readline())]
            assert all(solo.holds(pid) for pid in pids) and not solo.holds(os.getpid())
            raise RuntimeError("the test failed")
    shell.stdout.close()
    assert not made & namespaces()
    assert all(gone(pid) for pid in pids)


def gone(pid: int) -> bool:
    """No such process, or only its exit status is left (a zombie its parent has yet to reap)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_names_must_be_short_distinct_words():
    for names in (["pipe", "pipe"], ["Pipe"], ["a" * 13], ["x-y"]):
        with pytest.raises(ValueError):
            with hosts(names):
                pass
