"""A simulated MMDAgent-EX: runs a plugin script the way Plugin_AnyScript does and answers like it.

It follows the team's record of the real program's behaviour,
``/work/shared/mmdagent-ex-protocol.md`` ("MMDAgent-EX: what the pipeline talks to"), cross-read
with MMDAgent-EX's Plugin_AnyScript/ChildProcess.cpp; where a detail was left open, the choice is
written here. Used as the fake MMDAgent-EX of the end-to-end tests and by ``mmdagent-llm console``.

Starting the script (``command`` None: no script at all, an app reached only over Plugin_Remote,
which :mod:`stages.commands.avatar_remote` adds on top: :meth:`SimulatedMMDAgent.add_listener`)
  - POSIX: argv = :func:`split_plugin_command` (spaces split, ``"..."``/``'...'`` quote a whole
    argument, nothing else; PATH lookup like execvp), no shell. Windows: the command line as
    written (CreateProcess). cwd = the ``.mdf`` folder, environment inherited unless ``env``,
    stderr not captured (inherited, or ``stderr=``). A script that exits or crashes is noted
    (:attr:`returncode`), never restarted, and no message is sent about it.
  - :meth:`SimulatedMMDAgent.kill` is what MMDAgent-EX does when it quits: SIGKILL
    (TerminateProcess on Windows). The script never sees end of input.

Message queue (one "main loop" thread)
  - Every message on the queue is written to the script's stdin with a blocking write: what
    :meth:`send` puts there, the simulator's own events, and every message the script printed
    (echoed back). A script that stops reading blocks the main loop, as it freezes the avatar.
    Each written message is in :attr:`inbox` and passed to ``on_message``.
  - Writing (snprintf into a 2048-byte buffer): ``msg + "\\n"`` cut to 2047 bytes. A message of
    2047 bytes or more therefore reaches the script as its first 2047 bytes WITHOUT newline,
    glued to the next message (:attr:`inbox` records the cut text). The simulator's own
    handling still sees the whole message.

Reading the script's stdout (its own thread)
  - At most 2048 bytes are read per message, newline included: a line of up to 2047 bytes is
    one message; from a longer line the first 2047 bytes become a message and the rest is read
    as the next message(s) (the garbage of the real program). Each piece is decoded on its own
    as UTF-8 with ``errors="replace"``; an unterminated last line is never delivered.
  - Each piece is then taken apart as the real reader does (``strtok(buf, "|\\r\\n")`` for the
    type, ``strtok(NULL, "\\r\\n")`` for the arguments): empty lines and lines of only ``|``/CR
    are dropped, a trailing CR is removed, ``TYPE|`` becomes ``TYPE``, and text after a CR
    inside a line is lost. The result is a :class:`Received` in :attr:`received`.

Speech (Plugin_Open_JTalk), per model alias; events go through one scheduler thread
  - ``SYNTH_START|model|voice|text`` with ``voice`` not in ``voices`` (or an empty field):
    ignored, no event at all, the current speech goes on. Unknown model aliases are accepted.
  - Normal: after ``start_delay + synth_seconds_per_char * len(text)`` (Open JTalk synthesises
    the whole segment before it plays, so a longer one starts later; default 0: a fixed delay):
    ``SYNTH_EVENT_START``, ``LIPSYNC_START|model|<phoneme,ms,...>``, ``LIPSYNC_EVENT_START``;
    after max(min_speech, seconds_per_char * len(text)): ``LIPSYNC_EVENT_STOP``,
    ``SYNTH_EVENT_STOP``. No ``LIPSYNC_STOP``: in MMDAgent-EX that is the barge-in command the
    synthesizer sends to the lip-sync plugin, not an end event.
  - ``SYNTH_STOP|model`` while speaking: ``LIPSYNC_STOP`` and ``LIPSYNC_EVENT_STOP`` at once,
    ``SYNTH_EVENT_STOP`` after ``stop_delay``. While not speaking (or already stopping): nothing.
  - ``SYNTH_START`` while the model speaks cuts it off: ``LIPSYNC_STOP``, ``LIPSYNC_EVENT_STOP``
    at once, the old sentence's ``SYNTH_EVENT_STOP`` after ``cut_delay``, then the new sentence
    plays normally (its ``SYNTH_EVENT_START`` after its own start delay, as above). A further
    ``SYNTH_START`` during that ``cut_delay`` replaces the waiting sentence, which then produces
    no event.
  - Every accepted sentence that was handed to the synthesizer gets exactly one
    ``SYNTH_EVENT_START`` and one ``SYNTH_EVENT_STOP``: one interrupted during its start delay
    gets its ``SYNTH_EVENT_START`` at once (no lip sync) and is then stopped as above.
  - ``SYNTH_START`` from :meth:`send` (another plugin, the .fst) is spoken the same way.
Echo (``echo=True``, or :attr:`echo` set at any time; the test double's option, not MMDAgent-EX's:
the microphone hears the loudspeaker, the field problem of the page's "Known field problems")
  - Every sentence that plays is heard by the recognizer as an utterance of its own (one that
    cuts at the pause between sentences): ``RECOG_EVENT_START`` ``echo_delay`` after its
    ``SYNTH_EVENT_START``, and ``RECOG_EVENT_STOP|<what was heard>`` ``echo_tail`` after its sound
    ended (played out, or cut off by ``SYNTH_STOP`` or another ``SYNTH_START``; never before the
    start). What was heard: the sentence, or the part of it played before the cut (by time),
    as a recognizer writes it: no punctuation or spaces in Japanese (words joined as Julius does),
    and ``echo_errors`` of its letters (rounded: none in a short word such as ``はい``, which a
    recognizer hears well from a clean synthetic voice) wrong (a kana heard as its voiced or plain
    neighbour, a kanji as kana, a letter as another) or missing, chosen by a random generator
    seeded with ``echo_seed``: the same run, the same errors. Both lines go on the message queue like
    the recognizer's own, so the script and the :attr:`inbox` see them in order.
Captions, as observed on the real app (the argument counts are exact; a wrong one is silence)
  - ``CAPTION_SETSTYLE`` with exactly 3 or 6 arguments -> ``CAPTION_EVENT_SETSTYLE|<style>``, and
    the style exists from then on; any other count: nothing.
  - ``CAPTION_START`` with exactly 7 arguments (alias, style, text, size, position, height,
    frames), whose style exists or is ``_default`` -> ``CAPTION_EVENT_START|<alias>`` at once,
    and ``CAPTION_EVENT_STOP|<alias>`` after ``frames / 30`` seconds or on ``CAPTION_STOP|<alias>``.
    Starting an alias that is showing replaces its text (the old one gets no stop event). A
    ``|`` in the text changes the count, an unknown style, or (the simulator's choice) a size,
    height or frame count that is not a number: nothing. :attr:`captions` holds what is on
    screen (alias -> text argument as written).
  - ``MOTION_ADD|model|alias|file|...``: a file that exists (relative to the ``.mdf`` folder, or
    absolute) -> ``MOTION_EVENT_ADD|model|alias`` at once, and, for ``ONCE`` (the default),
    ``MOTION_EVENT_DELETE|model|alias`` ``motion_seconds`` later. A missing file: nothing.
    From MMDAgent-EX's source (the page is silent): an alias that is playing gets the new motion
    swapped in (``MOTION_EVENT_ADD`` again, its end timer starts over), and
    ``MOTION_DELETE|model|alias`` of a playing alias ends it (``MOTION_EVENT_DELETE``, a frame
    later). :attr:`motions` holds what plays (``(model, alias)`` -> file).
Cheap extras: ``TIMER_START|alias|sec`` ->
``TIMER_EVENT_START``, then ``TIMER_EVENT_STOP`` after sec. Anything else is only echoed.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import random
import re
import unicodedata
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import IO, Callable, Collection

MAXBUFLEN = 2048                  # MMDAGENT_MAXBUFLEN
MAX_MESSAGE_BYTES = MAXBUFLEN - 1  # the C string's room: one byte goes to the terminator
ARG_BUF = 100                     # Plugin_AnyScript: char current_arg[100], char *args[100]

# strtok(buf, "|\r\n") then strtok(NULL, "\r\n"), as ChildProcess::receivingThreadRun does
_MESSAGE = re.compile(r"[|\r\n]*([^|\r\n]+)(?:[|\r\n][\r\n]*([^\r\n]*))?")
_EOF = object()  # queue marker for close_stdin(): keeps it in order with queued messages


def split_plugin_command(command: str) -> list[str]:
    """argv as Plugin_AnyScript builds it (POSIX): spaces split; a quote only opens an argument.

    ``"..."``/``'...'`` at the start of an argument take everything up to the closing quote
    (an unclosed one runs to the end) and end the argument there; quotes elsewhere are
    ordinary characters. Raises ValueError for an argument of 100 UTF-8 bytes or more or for
    100 arguments or more (the real buffers hold 99 plus a terminator and would overflow), or
    for an empty command.
    """
    args: list[str] = []
    i, n = 0, len(command)
    while True:
        while i < n and command[i] == " ":
            i += 1
        if i >= n:
            break  # the C loop would add an empty argument for trailing spaces; we do not
        quote = command[i] if command[i] in "\"'" else None
        if quote:
            end = command.find(quote, i + 1)
            end = n if end < 0 else end
            arg, i = command[i + 1:end], end + 1
        else:
            end = command.find(" ", i)
            end = n if end < 0 else end
            arg, i = command[i:end], end
        if len(arg.encode("utf-8")) >= ARG_BUF:
            raise ValueError(f"plugin command argument longer than {ARG_BUF - 1} bytes: {arg[:40]!r}...")
        args.append(arg)
        if len(args) >= ARG_BUF:
            raise ValueError(f"plugin command has {ARG_BUF} arguments or more")
    if not args:
        raise ValueError("empty plugin command")
    return args


def message_of(raw: bytes) -> str | None:
    """The message MMDAgent-EX makes of one piece read from a script (no newline), or None."""
    m = _MESSAGE.match(raw.decode("utf-8", errors="replace"))
    if not m:
        return None
    return f"{m[1]}|{m[2]}" if m[2] else m[1]


@dataclass(frozen=True)
class Received:
    """One line as MMDAgent-EX took it from the script (or, in ``inbox``, wrote to it)."""
    t: float  # time.monotonic()
    line: str


class _Speech:
    def __init__(self, text: str) -> None:
        self.text = text
        self.phase = "starting"  # -> "playing" -> "stopping"
        self.pending: str | None = None  # the sentence that cut this one off
        self.played_at = 0.0  # monotonic time its sound began
        self.duration = 0.0
        self.echo_start_at: float | None = None  # when its echo's RECOG_EVENT_START goes out (echo on)


#: the voice aliases of the official example content's main.ojt, and Flite's
EXAMPLE_VOICES = ("mei_voice_normal", "mei_voice_angry", "mei_voice_bashful", "mei_voice_happy", "mei_voice_sad",
                  "mei_voice_fast", "mei_voice_slow", "mei_voice_high", "mei_voice_low", "slt_voice_normal")


class SimulatedMMDAgent:
    """Runs ``command`` as MMDAgent-EX's Plugin_AnyScript would and plays MMDAgent-EX around it."""

    def __init__(self, command: str | None, *, mdf_dir: str | os.PathLike, env: dict[str, str] | None = None,
                 voices: Collection[str] = EXAMPLE_VOICES,
                 seconds_per_char: float = 0.2, min_speech: float = 0.3, start_delay: float = 0.03,
                 synth_seconds_per_char: float = 0.0,
                 stop_delay: float = 0.9, cut_delay: float = 1.1, motion_seconds: float = 1.0,
                 echo: bool = False, echo_delay: float = 0.1, echo_tail: float = 0.3, echo_errors: float = 0.1,
                 echo_seed: int = 0,
                 on_message: Callable[[str], None] | None = None,
                 on_speech: Callable[[str, str, bool], None] | None = None,
                 stderr: int | IO | None = None) -> None:
        self.command = command  # None: no Plugin_AnyScript script (an app reached only over Plugin_Remote)
        self.argv = command if sys.platform == "win32" or command is None else split_plugin_command(command)
        self.mdf_dir = os.fspath(mdf_dir)
        self.env = env
        self.voices = frozenset(voices)
        self.seconds_per_char, self.min_speech = seconds_per_char, min_speech
        self.start_delay, self.stop_delay, self.cut_delay = start_delay, stop_delay, cut_delay
        self.synth_seconds_per_char = synth_seconds_per_char
        self.echo, self.echo_delay, self.echo_tail, self.echo_errors = echo, echo_delay, echo_tail, echo_errors
        self._echo_rng = random.Random(echo_seed)  # used on the scheduler's thread only
        self.on_message, self.on_speech = on_message, on_speech
        self.stderr = stderr
        self.received: list[Received] = []
        self.inbox: list[Received] = []
        self.speaking: dict[str, str] = {}
        self.captions: dict[str, str] = {}      # alias -> the text argument on screen
        self.motion_seconds = motion_seconds
        self.motions: dict[tuple[str, str], str] = {}  # (model, alias) -> file playing
        self._motion_runs: dict[tuple[str, str], int] = {}  # which MOTION_ADD plays it
        self.caption_styles: set[str] = set()
        self._caption_shown: dict[str, int] = {}  # alias -> which CAPTION_START shows it
        self._proc: subprocess.Popen | None = None
        self._rcond = threading.Condition()   # guards received/inbox; notified on exit too
        self._qcond = threading.Condition()   # the message queue
        self._queue: collections.deque = collections.deque()
        self._scond = threading.Condition()   # the timers
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._lock = threading.RLock()         # speech state: main loop and scheduler both change it
        self._speech: dict[str, _Speech] = {}
        self._closing = False
        self._stdin_open = False
        self._threads: list[threading.Thread] = []
        self._started = False
        self._listeners: list[Callable[[str], None]] = []  # see add_listener

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> "SimulatedMMDAgent":
        threads = [(self._main_loop, "main"), (self._scheduler, "timers")]
        if self.argv is not None:
            # bufsize=0: no Python-side buffer may hide a script that stopped reading
            self._proc = subprocess.Popen(self.argv, cwd=self.mdf_dir, env=self.env, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=self.stderr, bufsize=0)
            self._stdin_open = True
            threads.insert(1, (self._read_stdout, "stdout"))
        self._started = True
        for target, name in threads:
            thread = threading.Thread(target=target, name=f"avatar-sim-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def kill(self) -> None:
        """MMDAgent-EX quits: SIGKILL the script, stop the simulator, close pipes, join threads."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
        with self._qcond:
            self._closing = True
            self._qcond.notify_all()
        with self._scond:
            self._scond.notify_all()
        with self._rcond:
            self._rcond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                # a grandchild holding a pipe open could block a thread forever: bounded join
                thread.join(timeout=5)
        if proc is not None:
            for pipe, thread in ((proc.stdin, self._threads[0]), (proc.stdout, self._threads[1])):
                if pipe is not None and not thread.is_alive():
                    pipe.close()

    def close_stdin(self) -> None:
        """End of input for the script, after the messages already queued."""
        self._post(_EOF)

    def __enter__(self) -> "SimulatedMMDAgent":
        return self if self._started else self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # -- input and observation ----------------------------------------------------------------
    def send(self, line: str) -> None:
        """Put a message on MMDAgent-EX's queue, as the recognizer or another plugin would."""
        if not self._started:
            raise RuntimeError("start() first")
        if "\n" in line:
            raise ValueError("a message is one line; send its lines one by one")
        self._post(line)

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(message)`` for every message the main loop dispatches (after the script
        got it), from the main loop's thread: what Plugin_Remote relays to its clients."""
        self._listeners.append(listener)

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> bool:
        """Wait until ``predicate(received)`` holds; False after ``timeout`` seconds."""
        with self._rcond:
            return self._rcond.wait_for(lambda: predicate(self.received), timeout)

    def wait_inbox(self, predicate: Callable[[list[Received]], bool], timeout: float) -> bool:
        """Wait until ``predicate(inbox)`` holds (what was written to the script); False on timeout."""
        with self._rcond:
            return self._rcond.wait_for(lambda: predicate(self.inbox), timeout)

    def wait_line(self, prefix: str, timeout: float, after: int = 0) -> Received | None:
        """The first received line at index >= ``after`` that starts with ``prefix``, or None."""
        return self._wait_first(self.received, prefix, timeout, after)

    def wait_inbox_line(self, prefix: str, timeout: float, after: int = 0) -> Received | None:
        """The first inbox line at index >= ``after`` that starts with ``prefix``, or None."""
        return self._wait_first(self.inbox, prefix, timeout, after)

    def wait_exit(self, timeout: float) -> int | None:
        """The script's exit status once it has ended, or None if it still runs after ``timeout``."""
        with self._rcond:
            self._rcond.wait_for(lambda: self.returncode is not None, timeout)
        return self.returncode

    def _wait_first(self, lines: list[Received], prefix: str, timeout: float, after: int) -> Received | None:
        found: list[Received] = []

        def match() -> bool:
            found[:] = [r for r in lines[after:] if r.line.startswith(prefix)][:1]
            return bool(found)
        with self._rcond:
            self._rcond.wait_for(match, timeout)
        return found[0] if found else None

    # -- threads ------------------------------------------------------------------------------
    def _post(self, item: object) -> None:
        with self._qcond:
            self._queue.append(item)
            self._qcond.notify()

    def _main_loop(self) -> None:
        while True:
            with self._qcond:
                self._qcond.wait_for(lambda: self._queue or self._closing)
                if self._closing:
                    return
                item = self._queue.popleft()
            if item is _EOF:
                self._close_pipe_in()
                continue
            self._deliver(item)
            for listener in self._listeners:
                self._call(listener, item)
            with self._lock:
                self._handle(item)

    def _close_pipe_in(self) -> None:
        self._stdin_open = False
        try:
            self._proc.stdin.close()
        except OSError:
            pass

    def _deliver(self, line: str) -> None:
        if self._proc is None or not self._stdin_open or self._proc.poll() is not None:
            return  # the real plugin skips a script it knows to be gone
        data = (line + "\n").encode("utf-8", errors="replace")[:MAX_MESSAGE_BYTES]
        view, fd = memoryview(data), self._proc.stdin.fileno()
        try:
            while view:
                view = view[os.write(fd, view):]
        except (OSError, ValueError):
            self._stdin_open = False  # the script died (EPIPE) or its stdin was closed
            return
        text = data.decode("utf-8", errors="replace")
        text = text[:-1] if text.endswith("\n") else text
        with self._rcond:
            self.inbox.append(Received(time.monotonic(), text))
            self._rcond.notify_all()
        self._call(self.on_message, text)

    def _read_stdout(self) -> None:
        fd, buf = self._proc.stdout.fileno(), b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while True:
                nl = buf.find(b"\n", 0, MAXBUFLEN)
                if nl >= 0:
                    piece, buf = buf[:nl], buf[nl + 1:]
                elif len(buf) >= MAXBUFLEN:
                    piece, buf = buf[:MAX_MESSAGE_BYTES], buf[MAX_MESSAGE_BYTES:]
                else:
                    break
                message = message_of(piece)
                if message is not None:
                    with self._rcond:
                        self.received.append(Received(time.monotonic(), message))
                        self._rcond.notify_all()
                    self._post(message)
        self._proc.wait()
        with self._rcond:
            self._rcond.notify_all()

    def _scheduler(self) -> None:
        while True:
            with self._scond:
                while True:
                    if self._closing:
                        return
                    now = time.monotonic()
                    if self._timers and self._timers[0][0] <= now:
                        _, _, action = heapq.heappop(self._timers)
                        break
                    self._scond.wait(self._timers[0][0] - now if self._timers else None)
            with self._lock:
                action()

    def _motion_end(self, key: tuple[str, str], run: int) -> None:
        if self._motion_runs.get(key) == run and key in self.motions:  # not swapped for another since
            del self.motions[key]
            self._post(f"MOTION_EVENT_DELETE|{key[0]}|{key[1]}")

    def _after(self, delay: float, action: Callable[[], None]) -> None:
        # the sequence number keeps equal deadlines in scheduling order: deterministic events
        with self._scond:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), action))
            self._scond.notify()

    @staticmethod
    def _call(callback: Callable | None, *args: object) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # a faulty hook must not kill the simulator's threads
            traceback.print_exc(file=sys.stderr)

    # -- what the other plugins do with a message (called with _lock held) --------------------
    def _handle(self, line: str) -> None:
        kind, _, rest = line.partition("|")
        args = rest.split("|") if rest else []
        if kind == "SYNTH_START":
            parts = rest.split("|", 2)
            if len(parts) == 3 and all(parts) and parts[1] in self.voices:
                self._synth_start(parts[0], parts[2])
        elif kind == "SYNTH_STOP" and args:
            speech = self._speech.get(args[0])
            if speech is not None and speech.phase != "stopping":
                self._interrupt(args[0], speech, self.stop_delay)
        elif kind == "MOTION_ADD" and len(args) >= 3:
            if os.path.isfile(os.path.join(self.mdf_dir, args[2])):
                key = (args[0], args[1])
                self.motions[key] = args[2]
                run = self._motion_runs[key] = self._motion_runs.get(key, 0) + 1
                self._post(f"MOTION_EVENT_ADD|{args[0]}|{args[1]}")
                if (args[4:5] or ["ONCE"])[0] != "LOOP":
                    self._after(self.motion_seconds, lambda: self._motion_end(key, run))
        elif kind == "MOTION_DELETE" and len(args) >= 2 and (args[0], args[1]) in self.motions:
            key = (args[0], args[1])
            self._after(0.03, lambda run=self._motion_runs[key]: self._motion_end(key, run))
        elif kind == "TIMER_START" and len(args) >= 2:
            try:
                seconds = float(args[1])
            except ValueError:
                return
            self._post(f"TIMER_EVENT_START|{args[0]}")
            self._after(seconds, lambda alias=args[0]: self._post(f"TIMER_EVENT_STOP|{alias}"))
        elif kind == "CAPTION_SETSTYLE" and len(args) in (3, 6):
            self.caption_styles.add(args[0])
            self._post(f"CAPTION_EVENT_SETSTYLE|{args[0]}")
        elif kind == "CAPTION_START" and len(args) == 7 and args[1] in self.caption_styles | {"_default"}:
            try:
                float(args[3]), float(args[5])
                frames = int(args[6])
            except ValueError:
                return
            alias, shown = args[0], next(self._seq)
            self.captions[alias] = args[2]
            self._caption_shown[alias] = shown
            self._post(f"CAPTION_EVENT_START|{alias}")
            self._after(frames / 30, lambda: self._caption_stop(alias, shown))
        elif kind == "CAPTION_STOP" and args:
            self._caption_stop(args[0], self._caption_shown.get(args[0]))

    def _caption_stop(self, alias: str, shown: int | None) -> None:
        """End caption ``alias`` if it is still the showing ``shown`` (not replaced since)."""
        if alias in self.captions and shown is not None and self._caption_shown.get(alias) == shown:
            del self.captions[alias]
            del self._caption_shown[alias]
            self._post(f"CAPTION_EVENT_STOP|{alias}")

    def _synth_start(self, model: str, text: str) -> None:
        speech = self._speech.get(model)
        if speech is None:
            self._begin(model, text)
        elif speech.phase == "stopping":
            speech.pending = text
        else:
            speech.pending = text
            self._interrupt(model, speech, self.cut_delay)

    def _begin(self, model: str, text: str) -> None:
        speech = self._speech[model] = _Speech(text)
        delay = self.start_delay + self.synth_seconds_per_char * len(text)
        self._after(delay, lambda: self._play(model, speech))

    def _play(self, model: str, speech: _Speech) -> None:
        if self._speech.get(model) is not speech or speech.phase != "starting":
            return  # interrupted meanwhile
        speech.phase = "playing"
        duration = max(self.min_speech, self.seconds_per_char * len(speech.text))
        self.speaking[model] = speech.text  # before the event: whoever sees it sees this too
        speech.played_at, speech.duration = time.monotonic(), duration
        if self.echo:
            speech.echo_start_at = speech.played_at + self.echo_delay
            self._after(self.echo_delay, lambda: self._post("RECOG_EVENT_START"))
        self._call(self.on_speech, model, speech.text, True)
        self._post(f"SYNTH_EVENT_START|{model}")
        self._post(f"LIPSYNC_START|{model}|{_phonemes(speech.text, duration)}")
        self._post(f"LIPSYNC_EVENT_START|{model}")
        self._after(duration, lambda: self._finish(model, speech))

    def _finish(self, model: str, speech: _Speech) -> None:
        if self._speech.get(model) is not speech or speech.phase != "playing":
            return
        self._silence(model, speech)
        self._post(f"LIPSYNC_EVENT_STOP|{model}")
        self._post(f"SYNTH_EVENT_STOP|{model}")
        del self._speech[model]

    def _interrupt(self, model: str, speech: _Speech, delay: float) -> None:
        if speech.phase == "starting":
            # the synthesizer already had it: it still announces the start, then is stopped
            self._post(f"SYNTH_EVENT_START|{model}")
            self._post(f"LIPSYNC_STOP|{model}")
        else:
            self._silence(model, speech)
            self._post(f"LIPSYNC_STOP|{model}")
            self._post(f"LIPSYNC_EVENT_STOP|{model}")
        speech.phase = "stopping"
        self._after(delay, lambda: self._stopped(model, speech))

    def _stopped(self, model: str, speech: _Speech) -> None:
        if self._speech.get(model) is not speech:
            return
        del self._speech[model]
        self._post(f"SYNTH_EVENT_STOP|{model}")
        if speech.pending is not None:
            self._begin(model, speech.pending)

    def _silence(self, model: str, speech: _Speech) -> None:
        if self.speaking.get(model) == speech.text:
            del self.speaking[model]
        self._call(self.on_speech, model, speech.text, False)
        if speech.echo_start_at is not None:  # the recognizer heard it: its result follows the end of the sound
            now = time.monotonic()
            played = (now - speech.played_at) / speech.duration if speech.duration else 1.0
            heard = misheard(speech.text[:max(1, round(len(speech.text) * min(1.0, played)))], self.echo_errors,
                             self._echo_rng)
            delay = max(self.echo_tail, speech.echo_start_at - now + 0.01)  # never before its START
            self._after(delay, lambda: self._post(f"RECOG_EVENT_STOP|{heard}"))
            speech.echo_start_at = None


def misheard(text: str, errors: float, rng: random.Random) -> str:
    """``text`` as a recognizer writes what it heard: no punctuation, Japanese without spaces, and
    the share ``errors`` of its letters wrong or missing (see the module's "Echo")."""
    kept = [ch for ch in text if unicodedata.category(ch)[0] in "LN" or ch == " "]
    letters = [i for i, ch in enumerate(kept) if ch != " "]
    out = list(kept)
    for i in rng.sample(letters, round(len(letters) * errors)):
        out[i] = "" if rng.random() < 1 / 3 else _confused(kept[i], rng)  # not heard, or heard wrong
    heard = "".join(out)
    if not heard.isascii():
        heard = heard.replace(" ", "")
    heard = " ".join(heard.split())
    return heard or (kept[0] if kept else "")


def _confused(ch: str, rng: random.Random) -> str:
    if "\u3041" <= ch <= "\u3093":  # hiragana: a neighbour (は/ば/ぱ, か/が)
        return chr(ord(ch) + rng.choice((-1, 1)))
    if "\u30a1" <= ch <= "\u30f3":  # katakana: a neighbour too
        return chr(ord(ch) + rng.choice((-1, 1)))
    if ch.isascii() and ch.isalpha():
        return rng.choice("aeiounrst")
    if unicodedata.category(ch) == "Lo":  # a kanji, written in kana
        return rng.choice("かしたいこう")
    return ch


def _phonemes(text: str, duration: float) -> str:
    """A fake Open JTalk phoneme list (``phoneme,ms,...``) spanning ``duration``, kept short."""
    count = max(1, min(len(text), 60))
    ms = max(1, round(duration * 1000 / count))
    return ",".join(f"{'aiueo'[i % 5]},{ms}" for i in range(count))
