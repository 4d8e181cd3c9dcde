"""A command in a pseudo-terminal, as a person runs it: its terminal is the controlling one, so
Ctrl-C (``\\x03``) is a real SIGINT from the line discipline, and ``isatty()`` is true."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import termios
import time


def _controlling_tty() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyProcess:
    def __init__(self, argv: list[str], cwd: str, env: dict[str, str]) -> None:
        master, slave = os.openpty()
        self.master = master
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                                     preexec_fn=_controlling_tty, close_fds=True)
        os.close(slave)
        self.text = ""

    def _pump(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every holder of the terminal has gone
            return False
        self.text += data.decode("utf-8", errors="replace")
        return bool(data)

    def expect(self, needle: str, timeout: float = 30.0, after: int = 0) -> int:
        """Wait until ``needle`` is in the output past ``after``; the index just past it."""
        deadline = time.monotonic() + timeout
        while needle not in self.text[after:]:
            left = deadline - time.monotonic()
            if left <= 0 or (not self._pump(min(left, 0.2)) and self.proc.poll() is not None
                             and not self._pump(0.1)):
                if needle in self.text[after:]:
                    break
                raise AssertionError(f"{needle!r} not seen; output so far:\n{self.text[-3000:]}")
        return self.text.index(needle, after) + len(needle)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode("utf-8"))

    def wait(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._pump(0.1)
        while self._pump(0.05):
            pass
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        os.close(self.master)


def one_exchange(argv: list[str], cwd: str, env: dict[str, str], text: str, ready: float = 40.0) -> str:
    """Run ``argv`` (a conversation at a ``you> `` prompt) in a terminal: say ``text``, wait for
    the ``avatar> `` answer, ``/quit``, and require a clean exit. Returns what the screen showed."""
    term = PtyProcess(argv, cwd, env)
    try:
        at = term.expect("you> ", ready)
        term.send(f"{text}\r")
        term.expect("avatar> ", 30, at)
        term.send("/quit\r")
        assert term.wait(30) == 0
    finally:
        term.close()
    return term.text
