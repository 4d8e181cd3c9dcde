"""Long-term memory (stages.llm.memory): the file a person edits, the remember tool, the command,
and the facts in the next request."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

from stages.llm import memory as memory_mod
from stages.llm import tools
from stages.llm.memory import MAX_FACT, MAX_FACTS, Memory, path_beside
from stages.llm.offline_responder import ChatCompletionServer, ToolCall
from tests.e2e import ScriptedLLM, launched, tokens_of
from tests.harness import BIN, write_config


def test_a_file_a_person_edits(tmp_path: Path):
    m = Memory(tmp_path / "memory-x.txt")
    assert m.facts() == [] and m.prompt() == ""
    assert m.remember("  ユーザーの名前は  ハナ ") == "ok: remembered"
    assert m.remember("ユーザーの名前は ハナ") == "ok: already remembered"
    assert m.facts() == ["ユーザーの名前は ハナ"] and "- ユーザーの名前は ハナ" in m.prompt()
    if os.name == "posix":
        assert stat.S_IMODE(m.path.stat().st_mode) == 0o600
    with open(m.path, "a", encoding="utf-8") as f:  # a person adds a line by hand
        f.write("# a note\n猫が好き\n\n")
    assert m.facts() == ["ユーザーの名前は ハナ", "猫が好き"]
    assert m.forget("猫") == ["猫が好き"] and m.facts() == ["ユーザーの名前は ハナ"]
    for i in range(MAX_FACTS + 3):
        m.remember(f"fact {i} " + "x" * (MAX_FACT + 10))
    facts = m.facts()
    assert len(facts) == MAX_FACTS and facts[-1].startswith(f"fact {MAX_FACTS + 2}") and len(facts[-1]) == MAX_FACT
    assert m.clear() == MAX_FACTS and m.facts() == []
    assert path_beside(Path("/s/history-default-content-ab12.json")) == Path("/s/memory-default-content-ab12.txt")
    assert path_beside(Path("/s/talk.json")) == Path("/s/memory-talk.txt")


def test_the_remember_tool_writes_the_file(tmp_path: Path):
    m = Memory(tmp_path / "memory.txt")
    remember = tools.builtin(["remember"], [], m)["remember"]
    assert tools.call(remember, "remember", json.dumps({"fact": "誕生日は5月"}), 5, threading.Event()).ok
    assert m.facts() == ["誕生日は5月"]
    assert not tools.call(remember, "remember", '{"fact": "  "}', 5, threading.Event()).ok
    assert "remember" not in tools.builtin(["remember"], [])  # no memory, no tool


def test_the_memory_command(tmp_path: Path):
    cfg = write_config(tmp_path, llm={"history_file": str(tmp_path / "history-t.json")})
    env = {**os.environ, "MMDAGENT_LLM_CONFIG": str(cfg), "EDITOR": f"{sys.executable} -c pass"}
    run = lambda *args: subprocess.run([str(BIN / "mmdagent-llm"), "memory", *args], env=env, capture_output=True,
                                       text=True, timeout=60)
    assert "nothing remembered yet" in run().stdout
    Memory(tmp_path / "memory-t.txt").remember("コーヒーはブラック")
    assert "- コーヒーはブラック" in run("show").stdout
    assert run("edit").returncode == 0
    assert "forgot 1 fact(s)" in run("forget", "コーヒー").stdout
    assert "nothing remembered yet" in run().stdout
    assert run("forget").returncode == 2


def test_a_fact_remembered_in_one_turn_is_in_the_next_request(tmp_path: Path):
    llm = ScriptedLLM(default="はい。")
    server = ChatCompletionServer(llm).start()
    try:
        with launched(tmp_path, server=server) as world:
            llm.queue([ToolCall("remember", json.dumps({"fact": "ユーザーの名前はハナ"}))], tokens_of("覚えました。"))
            world.talk("私の名前はハナです")
            world.talk("こんにちは")
            system = server.requests[-1]["messages"][0]["content"]
            assert "- ユーザーの名前はハナ" in system
            history = Path(world.cfg["llm"]["history_file"])
            assert memory_mod.parse(path_beside(history).read_text(encoding="utf-8")) == ["ユーザーの名前はハナ"]
            [event] = [e for e in world.bus.envelopes if e.kind == "tool" and e.body["name"] == "remember"]
            assert event.body["ok"] and event.body["result"] == "ok: remembered"
    finally:
        server.stop()
