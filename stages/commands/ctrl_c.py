"""Ctrl-C that ends an interactive command at once, even while its main thread waits in C code.

Python runs a signal's handler on the main thread, between two bytecodes, and a C call that
is waiting sees the signal only if the signal interrupts that very wait. A SIGINT taken a
moment before the wait begins (readline has printed its prompt and is about to wait for a key;
a ZeroMQ poll is being entered), or taken by another thread, is noted and nothing more: the
``KeyboardInterrupt`` comes with the next key typed, or when the poll's whole timeout is over.
On a loaded machine that moment is long enough to be hit, and Ctrl-C seemed to do nothing.

:func:`install` (``console``, ``avatar``) closes that gap: each signal writes a byte to a pipe
(:func:`signal.set_wakeup_fd`), and a thread reading it sends SIGINT to the main thread again
every :data:`NUDGE` seconds until the main thread has raised its ``KeyboardInterrupt``; each
nudge interrupts whatever wait the main thread has entered by then. Later Ctrl-Cs are ignored:
the command is ending, and its cleanup (stopping what it started) must not be cut short.
POSIX only: on Windows Ctrl-C arrives on a thread of its own and Python wakes the main thread.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

NUDGE = 0.1  # seconds between two SIGINTs to the main thread, until it has acted on one


class _CtrlC:
    def __init__(self) -> None:
        self.raised = threading.Event()

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.raised.is_set():
            return  # the command is ending already: let its cleanup finish
        self.raised.set()
        raise KeyboardInterrupt

    def nudge(self, wake: int) -> None:
        main = threading.main_thread().ident
        assert main is not None
        while True:
            try:
                got = os.read(wake, 64)
            except OSError:
                return
            if not got:
                return
            if signal.SIGINT in got:
                while not self.raised.wait(NUDGE):
                    signal.pthread_kill(main, signal.SIGINT)


def install() -> None:
    """From now on Ctrl-C raises ``KeyboardInterrupt`` on the main thread within about
    :data:`NUDGE` seconds, whatever it is waiting in; only the first one. Call it on the main
    thread, once, in a process that ends when its command does."""
    if not hasattr(signal, "pthread_kill"):  # Windows
        return
    ctrl_c = _CtrlC()
    wake, wake_w = os.pipe()
    os.set_blocking(wake_w, False)  # a full pipe must never block a signal handler
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, ctrl_c.handler)
    threading.Thread(target=ctrl_c.nudge, args=(wake,), name="ctrl-c", daemon=True).start()
