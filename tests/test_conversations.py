"""History belongs to a conversation: each content (its .mdf folder) has its own under the
plugin, the console starts afresh unless asked to continue, keeping the last conversation in the
archive, and `mmdagent-llm history` shows and clears it, and lists and shows the archive. Real
plugin (its own supervisord pipeline), real console in a pseudo-terminal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker import config as config_mod
from stages.commands.avatar_sim import SimulatedMMDAgent
from stages.commands.launcher import wait_ready
from stages.llm.history_store import HistoryStore, console_path, content_path, decode
from stages.llm.offline_responder import ChatCompletionServer
from tests.e2e import ScriptedLLM, bridge_sees_pipeline
from tests.harness import BIN, BusWatcher, pipeline_env, processes_with, write_config
from tests.pty_term import PtyProcess, one_exchange


def asked(server: ChatCompletionServer, text: str) -> list[tuple[str, str]]:
    """The conversation (without the system prompt) of the last request that asked ``text``.
    Not simply the last request: the start-up check (``doctor --notice``) of the plugin or the
    console makes one too, at a moment of its own, which may come after the turn's."""
    said = [[(m["role"], m["content"]) for m in request["messages"]] for request in server.requests]
    turns = [messages[1:] for messages in said if messages[-1] == ("user", text)]
    assert turns, f"no request asked {text!r}: {said}"
    return turns[-1]


def plugin_turn(folder: Path, server: ChatCompletionServer, text: str) -> None:
    """Start `mmdagent-llm plugin` in ``folder`` as MMDAgent-EX would, say ``text``, wait for the
    answer, then SIGKILL it (as MMDAgent-EX quitting) and wait until its pipeline is gone."""
    folder.mkdir(exist_ok=True)
    cfg_path = write_config(folder, llm={"history_file": ""})
    cfg = config_mod.load(cfg_path)
    env = {k: v for k, v in pipeline_env(cfg_path, server.base_url).items() if k != "MMDAGENT_LLM_CONFIG"}
    with open(folder / "plugin.log", "ab") as log:
        avatar = SimulatedMMDAgent("mmdagent-llm plugin", mdf_dir=folder, env=env, stderr=log).start()
        try:
            wait_ready(cfg, ["bridge"], 30)
            bridge_sees_pipeline(cfg, 40)
            avatar.send("RECOG_EVENT_START")
            avatar.send(f"RECOG_EVENT_STOP|{text}")
            assert avatar.wait_inbox_line("SYNTH_EVENT_STOP|0", 30), (folder / "plugin.log").read_text()
        finally:
            avatar.kill()
    deadline = time.monotonic() + 15
    while processes_with(server.base_url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_with(server.base_url), "the plugin's pipeline outlived it"


def test_each_content_has_its_own_conversation(tmp_path: Path, own_state):
    server = ChatCompletionServer(ScriptedLLM(default="覚えました。")).start()
    try:
        plugin_turn(tmp_path / "content-a", server, "私はハナです。")
        assert asked(server, "私はハナです。") == [("user", "私はハナです。")]
        plugin_turn(tmp_path / "content-b", server, "私の名前は？")
        assert asked(server, "私の名前は？") == [("user", "私の名前は？")]       # nothing of content A
        plugin_turn(tmp_path / "content-a", server, "私の名前は？")
        assert asked(server, "私の名前は？") == [("user", "私はハナです。"), ("assistant", "覚えました。"),
                                               ("user", "私の名前は？")]
    finally:
        server.stop()
    a = content_path("default", tmp_path / "content-a")
    b = content_path("default", tmp_path / "content-b")
    assert a != b and a.exists() and b.exists()
    shown = subprocess.run([sys.executable, "-m", "stages.commands.cli", "history"], cwd=tmp_path / "content-a",
                           env=here_only(), capture_output=True, text=True,
                           encoding="utf-8", timeout=30)
    assert f"{a}: 2 exchanges" in shown.stdout and "you:    私はハナです。" in shown.stdout
    cleared = subprocess.run([sys.executable, "-m", "stages.commands.cli", "history", "--clear"],
                             cwd=tmp_path / "content-a", env=here_only(),
                             capture_output=True, text=True, timeout=30)
    assert "cleared" in cleared.stdout and not a.exists() and b.exists()


def here_only() -> dict[str, str]:
    """The environment without MMDAGENT_LLM_CONFIG: ./mmdagent-llm.toml is found, as in a content."""
    return {k: v for k, v in os.environ.items() if k != "MMDAGENT_LLM_CONFIG"}


def console_turn(tmp_path: Path, env: dict[str, str], text: str, *args: str) -> str:
    return one_exchange([str(BIN / "mmdagent-llm"), "console", *args], str(tmp_path), env, text)


def test_the_console_starts_afresh_unless_asked_to_continue(tmp_path: Path, own_state):
    server = ChatCompletionServer(ScriptedLLM(default="はい。")).start()
    cfg_path = write_config(tmp_path, llm={"history_file": ""})
    env = pipeline_env(cfg_path, server.base_url)
    try:
        first = console_turn(tmp_path, env, "私はハナです。")
        assert "a new conversation" in first
        second = console_turn(tmp_path, env, "覚えてる？")
        assert asked(server, "覚えてる？") == [("user", "覚えてる？")] and "a new conversation" in second
        third = console_turn(tmp_path, env, "私の名前は？", "--continue")
        assert asked(server, "私の名前は？") == [("user", "覚えてる？"), ("assistant", "はい。"), ("user", "私の名前は？")]
        assert f"continuing the conversation in {console_path('default')}: 1 earlier exchanges" in third
    finally:
        server.stop()
        for pid in processes_with(str(cfg_path)):
            os.kill(pid, signal.SIGKILL)
    assert len(HistoryStore(console_path("default")).load().pairs) == 2


def saved_exchanges(path: Path) -> int:
    try:
        return len(decode(path.read_bytes()))
    except FileNotFoundError:
        return 0


def history_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.commands.cli", "history", *args], env=here_only(),
                          capture_output=True, text=True, encoding="utf-8", timeout=30)


def say(term: PtyProcess, bus: BusWatcher, history: Path, text: str, spoken: int, saved: int, at: int) -> int:
    """Type ``text`` in the console, wait until its answer (はい。) was spoken to the end (the
    ``spoken``-th turn to be) and the history file holds ``saved`` exchanges; where the screen is."""
    term.send(f"{text}\r")
    at = term.expect("avatar> はい。", 30, at)
    # in full before the next line: a line typed while it speaks would cut it off
    assert bus.wait_for(lambda envs: len(envs) >= spoken, 30), "the answer was never spoken to the end"
    deadline = time.monotonic() + 20
    while saved_exchanges(history) != saved and time.monotonic() < deadline:
        time.sleep(0.05)
    assert saved_exchanges(history) == saved
    return at


def test_a_new_console_keeps_the_last_conversation_in_the_archive(tmp_path: Path, own_state):
    """Two exchanges, then a new console left at once with Ctrl-D: nothing of them is lost;
    `history --archive` lists the earlier conversation and prints both exchanges."""
    server = ChatCompletionServer(ScriptedLLM(default="はい。")).start()
    cfg_path = write_config(tmp_path, llm={"history_file": ""})
    cfg = config_mod.load(cfg_path)
    env = pipeline_env(cfg_path, server.base_url)
    console = [str(BIN / "mmdagent-llm"), "console"]
    history = console_path("default")
    bus = None
    try:
        term = PtyProcess(console, str(tmp_path), env)
        try:
            at = term.expect("you> ", 40)
            bus = BusWatcher(cfg, b"spoken")
            at = say(term, bus, history, "私はハナです。", 1, 1, at)
            say(term, bus, history, "猫が好きです。", 2, 2, at)
            term.send("\x04")  # Ctrl-D
            assert term.wait(30) == 0
        finally:
            term.close()
        term = PtyProcess(console, str(tmp_path), env)  # a new conversation, left at once
        try:
            term.expect("you> ", 40)
            term.send("\x04")
            assert term.wait(30) == 0
        finally:
            term.close()
    finally:
        if bus is not None:
            bus.close()
        server.stop()
        for pid in processes_with(str(cfg_path)):
            os.kill(pid, signal.SIGKILL)
    archived = own_state / "mmdagent-llm" / "conversations"
    [kept] = list(archived.iterdir())
    assert f"the last conversation (2 exchanges) is kept in {kept}" in term.text
    assert not history.exists() or saved_exchanges(history) == 0

    listed = history_command("--archive")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert str(archived) in lines[0] and "newest first" in lines[0]
    assert lines[1].split()[0] == "1" and "2 exchanges" in lines[1] and lines[1].endswith(kept.name)
    for which in ("1", kept.name):
        shown = history_command("--archive", which)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines() == [f"{kept}: 2 exchanges", "  you:    私はハナです。",
                                             "  avatar: はい。", "  you:    猫が好きです。", "  avatar: はい。"]
    assert "earlier conversations: mmdagent-llm history --archive" in history_command("--console").stdout


def test_history_clear_is_not_undone_by_the_running_console(tmp_path: Path, own_state):
    """`history --console --clear` between two turns: the running llm neither gives the cleared
    exchange to the LLM again nor writes it back with its next save."""
    server = ChatCompletionServer(ScriptedLLM(default="はい。")).start()
    cfg_path = write_config(tmp_path, llm={"history_file": ""})
    cfg = config_mod.load(cfg_path)
    history = console_path("default")
    bus = None
    try:
        term = PtyProcess([str(BIN / "mmdagent-llm"), "console"], str(tmp_path), pipeline_env(cfg_path, server.base_url))
        try:
            at = term.expect("you> ", 40)
            bus = BusWatcher(cfg, b"spoken")
            at = say(term, bus, history, "私はハナです。", 1, 1, at)
            cleared = history_command("--console", "--clear")
            assert f"cleared {history}: deleted its 1 exchanges, not archived" in cleared.stdout, cleared.stdout
            say(term, bus, history, "私の名前は？", 2, 1, at)
            term.send("/quit\r")
            assert term.wait(30) == 0
        finally:
            term.close()
    finally:
        if bus is not None:
            bus.close()
        server.stop()
        for pid in processes_with(str(cfg_path)):
            os.kill(pid, signal.SIGKILL)
    [request] = [r for r in server.requests if r["messages"][-1]["content"] == "私の名前は？"]
    assert [m["content"] for m in request["messages"][1:]] == ["私の名前は？"]
    assert [(q["content"], a["content"]) for q, a in HistoryStore(history).load().pairs] == [("私の名前は？", "はい。")]
