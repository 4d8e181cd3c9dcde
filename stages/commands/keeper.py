"""The plugin's pipeline without supervisord (Windows, where supervisord does not run; anywhere
with ``[plugin] pipeline = "builtin"``).

:class:`Keeper` runs inside the plugin process. It starts each stage as a child, restarts one
that exits (after 1 s, doubling up to :data:`MAX_BACKOFF` while it keeps failing within
:data:`STEADY` seconds), writes each stage's log to the plugin's run folder, and ends them all
when the plugin ends. The promise is the supervisord one: nothing outlives MMDAgent-EX, even when
it kills the plugin outright:

- Windows: every stage is put in a job object with ``JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE``; the
  plugin holds its only handle, so when the plugin dies, however it dies, Windows ends them.
- Linux: each stage gets SIGTERM from the kernel when the plugin dies (``PR_SET_PDEATHSIG``).
- everywhere but Windows: each stage watches the plugin's pid (``MMDAGENTLLM_OWNER_PID``,
  :func:`broker.runtime.watch_owner`) and stops within a second of it being gone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from broker.liveness import PIPELINE
from broker.runtime import OWNER_ENV
from stages.commands.launcher import stage_command, stop_all

log = logging.getLogger("mmdagent_llm")

STEADY = 10.0  # a stage that ran this long before it exited is restarted after 1 s again
MAX_BACKOFF = 10.0
MAX_LOG_BYTES = 10_000_000  # a stage's log is rotated when it passed this at a (re)start


class Keeper:
    def __init__(self, env: dict[str, str], run: Path, names: tuple[str, ...] = PIPELINE) -> None:
        self.env = dict(env, **{OWNER_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"})
        self.run, self.names = run, names
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.backoff: dict[str, float] = {name: 1.0 for name in names}
        self.stopping = threading.Event()
        self.job = _kill_on_close_job() if sys.platform == "win32" else None
        self._thread = threading.Thread(target=self._watch, name="keeper", daemon=True)

    def start(self) -> "Keeper":
        for name in self.names:  # the broker first: the others connect to it (and retry anyway)
            self._spawn(name)
        self._thread.start()
        return self

    def _spawn(self, name: str) -> None:
        with open_log(self.run / f"{name}.log") as err:
            kwargs: dict = {}
            if sys.platform == "win32":
                kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW
            elif sys.platform.startswith("linux"):
                kwargs["preexec_fn"] = die_with_parent
            proc = subprocess.Popen(stage_command(name), env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, **kwargs)
        if self.job is not None:
            _assign(self.job, proc)
        self.procs[name], self.started[name] = proc, time.monotonic()
        log.info("started %s (pid %d)", name, proc.pid)

    def _watch(self) -> None:
        due: dict[str, float] = {}
        while not self.stopping.wait(0.2):
            now = time.monotonic()
            for name, proc in list(self.procs.items()):
                if name in due:
                    if now >= due[name]:
                        del due[name]
                        self._spawn(name)
                    continue
                code = proc.poll()
                if code is None:
                    continue
                ran = now - self.started[name]
                self.backoff[name] = 1.0 if ran >= STEADY else min(MAX_BACKOFF, self.backoff[name] * 2)
                log.warning("%s exited with status %s after %.1f s: starting it again in %.0f s", name, code, ran,
                            self.backoff[name])
                due[name] = now + self.backoff[name]

    def stop(self, timeout: float = 5.0) -> None:
        """End every stage: a polite request first, then a kill for what is left after ``timeout``."""
        self.stopping.set()
        if self._thread.is_alive():
            self._thread.join(2)
        stop_all(self.procs.values(), timeout)


def open_log(path: Path, limit: int = MAX_LOG_BYTES) -> IO[bytes]:
    """``path`` opened for appending (created owner-only). One over ``limit`` bytes is first renamed
    to ``<name>.1``, replacing the previous one: a stage is restarted right after it crashed, and
    the lines that tell why are at the end of its log, so the log is never simply deleted."""
    try:
        if path.stat().st_size > limit:
            os.replace(path, path.with_name(f"{path.name}.1"))
    except FileNotFoundError:
        pass
    except OSError as exc:  # e.g. Windows, the file still open somewhere: it grows on, the stage starts
        log.warning("%s could not be rotated (%s): appending to it", path, exc.strerror or exc)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")  # the owner's only


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


# -- Windows job object ----------------------------------------------------------------------
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9


class _BasicLimits(ctypes.Structure):
    _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                ("LimitFlags", ctypes.c_uint32), ("MinimumWorkingSetSize", ctypes.c_size_t),
                ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", ctypes.c_uint32),
                ("Affinity", ctypes.c_size_t), ("PriorityClass", ctypes.c_uint32),
                ("SchedulingClass", ctypes.c_uint32)]


class _IoCounters(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("ReadOperationCount", "WriteOperationCount",
                                                     "OtherOperationCount", "ReadTransferCount",
                                                     "WriteTransferCount", "OtherTransferCount")]


class _ExtendedLimits(ctypes.Structure):
    _fields_ = [("BasicLimitInformation", _BasicLimits), ("IoInfo", _IoCounters),
                ("ProcessMemoryLimit", ctypes.c_size_t), ("JobMemoryLimit", ctypes.c_size_t),
                ("PeakProcessMemoryUsed", ctypes.c_size_t), ("PeakJobMemoryUsed", ctypes.c_size_t)]


def _kill_on_close_job() -> int | None:
    """A job object whose processes Windows ends when its last handle (ours) closes."""
    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    job = kernel32.CreateJobObjectW(None, None)
    if not job:
        log.error("CreateJobObjectW failed (%d): stages may outlive the plugin", ctypes.GetLastError())  # type: ignore[attr-defined]
        return None
    limits = _ExtendedLimits()
    limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    if not kernel32.SetInformationJobObject(job, JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS,
                                            ctypes.byref(limits), ctypes.sizeof(limits)):
        log.error("SetInformationJobObject failed (%d): stages may outlive the plugin", ctypes.GetLastError())  # type: ignore[attr-defined]
    return job


def _assign(job: int, proc: subprocess.Popen) -> None:
    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    if not kernel32.AssignProcessToJobObject(job, int(proc._handle)):  # type: ignore[attr-defined]
        log.error("could not put %d in the job object (%d): it may outlive the plugin", proc.pid,
                  ctypes.GetLastError())  # type: ignore[attr-defined]
