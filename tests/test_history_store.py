"""History on disk: round trip, continued conversation, corruption reported and survived,
crash-safe saves, and the [llm] history_file rule."""

import hashlib
import json
import logging
import os
import sys

import pytest

from broker import config
from stages.llm.history import History
from stages.llm.history_archive import Archive
from stages.llm.history_store import Conversation, HistoryStore, default_path, store_for

LOGGER = "mmdagent_llm"


def errors(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]


def pairs_of(*qa):
    return [({"role": "user", "content": q}, {"role": "assistant", "content": a}) for q, a in qa]


def test_no_file_loads_none(tmp_path):
    assert HistoryStore(tmp_path / "h.json").load() is None


def test_round_trip_keeps_pairs_exactly(tmp_path):
    store = HistoryStore(tmp_path / "sub" / "h.json", session="avatar1")
    pairs = pairs_of(("こんにちは", "やあ！"), ("元気？", "元気だよ。 [interrupted]"), ('"quotes"\n', "\\"))
    store.save(Conversation(pairs))
    assert HistoryStore(tmp_path / "sub" / "h.json").load().pairs == pairs
    doc = json.loads((tmp_path / "sub" / "h.json").read_text(encoding="utf-8"))
    assert doc["version"] == 2 and doc["session"] == "avatar1" and len(doc["sha256"]) == 64
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["h.json"]  # no temp file left


def test_the_summary_is_kept_with_the_pairs_under_the_checksum(tmp_path):
    path = tmp_path / "h.json"
    HistoryStore(path).save(Conversation(pairs_of(("q", "a")), "名前はハナ。", 12))
    assert HistoryStore(path).load() == Conversation(pairs_of(("q", "a")), "名前はハナ。", 12)
    again = History("sys", 10, 10_000, store=HistoryStore(path), summarize=True)
    assert again.folded == 12 and "名前はハナ。" in again.request("x")[0]["content"]
    path.write_bytes(path.read_bytes().replace("ハナ".encode(), "タロウ".encode()))
    assert read_error(path) == "checksum mismatch: the content was changed or damaged"


def test_a_version_1_file_is_read_as_it_is(tmp_path):
    pairs = pairs_of(("q", "a"))
    doc = {"format": "mmdagent-llm-history", "version": 1, "pairs": [list(p) for p in pairs],
           "sha256": hashlib.sha256(json.dumps([list(p) for p in pairs], ensure_ascii=False, sort_keys=True,
                                               separators=(",", ":")).encode()).hexdigest()}
    (tmp_path / "h.json").write_text(json.dumps(doc), encoding="utf-8")
    assert HistoryStore(tmp_path / "h.json").load() == Conversation(pairs)


def read_error(path) -> str:
    from stages.llm.history_store import CorruptHistory, read
    try:
        read(path.read_bytes())
    except CorruptHistory as exc:
        return str(exc)
    return ""


def test_new_history_with_the_same_store_continues_the_conversation(tmp_path):
    path = tmp_path / "h.json"
    h = History("sys", 10, 10_000, store=HistoryStore(path))
    h.add("質問1", "答え1")
    h.add("質問2", "一文目。二文目。")
    assert h.revise_last("質問2", "一文目。")

    again = History("sys", 10, 10_000, store=HistoryStore(path))  # the stage restarted
    assert again.pairs == h.pairs
    assert [m["content"] for m in again.request("次")] == [
        "sys", "質問1", "答え1", "質問2", "一文目。 [interrupted]", "次"]
    again.add("質問3", "答え3")
    assert len(History("sys", 10, 10_000, store=HistoryStore(path)).pairs) == 3


def test_lowered_limits_apply_after_loading_and_the_file_is_archived_before_it_is_trimmed(tmp_path):
    path = tmp_path / "h.json"
    archive = Archive(tmp_path / "conversations", 20)
    h = History("sys", 10, 10_000, store=HistoryStore(path, archive=archive.copy_in))
    for i in range(6):
        h.add(f"q{i}", f"a{i}")
    assert archive.entries() == []  # within the limits: nothing to keep aside
    said = HistoryStore(path).load().pairs
    os.utime(path, (1_600_000_000, 1_600_000_000))

    fewer = History("sys", 2, 10_000, store=HistoryStore(path, archive=archive.copy_in))  # restarted with a lower limit
    assert [p[0]["content"] for p in fewer.pairs] == ["q4", "q5"]
    assert len(HistoryStore(path).load().pairs) == 2  # trimming is a change: saved ...
    [kept] = archive.entries()  # ... after every pair was copied aside, dated like the conversation
    assert HistoryStore(kept.path).load().pairs == said and kept.exchanges == 6 and kept.when == 1_600_000_000
    assert kept.path.name.startswith("h-") and kept.path.suffix == ".json"

    again = History("sys", 2, 10_000, store=HistoryStore(path, archive=archive.copy_in))  # within them now: no copy
    assert len(again.pairs) == 2 and len(archive.entries()) == 1
    small = History("sys", 100, 20, store=HistoryStore(path, archive=archive.copy_in))  # by tokens, the same
    assert small.tokens() <= 20 and len(small.pairs) == 1 and [e.exchanges for e in archive.entries()] == [2, 6]


def test_a_history_cleared_by_another_program_is_not_written_back(tmp_path, caplog):
    """`mmdagent-llm history --clear` while the llm runs: its next turn starts from the cleared file."""
    path = tmp_path / "h.json"
    h = History("sys", 10, 10_000, store=HistoryStore(path))
    h.add("q1", "a1")
    h.add("q2", "a2")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # its own saves are no change
    path.unlink()  # history --clear
    assert [m["content"] for m in h.request("q3")] == ["sys", "q3"]  # not given to the LLM either
    h.add("q3", "a3")
    assert HistoryStore(path).load().pairs == pairs_of(("q3", "a3"))
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(path) in warning.getMessage() and "removed by another program" in warning.getMessage()
    path.unlink()
    assert not h.revise_last("q3", "a")  # the pair it would revise is gone with the file
    assert not path.exists()


def test_a_history_replaced_by_another_program_is_followed(tmp_path, caplog):
    path = tmp_path / "h.json"
    h = History("sys", 10, 10_000, store=HistoryStore(path))
    h.add("q1", "a1")
    HistoryStore(path).save(Conversation(pairs_of(("theirs", "kept"))))  # another writer, same size or not
    h.add("q2", "a2")
    assert HistoryStore(path).load().pairs == pairs_of(("theirs", "kept"), ("q2", "a2"))
    assert "replaced by another program" in caplog.records[-1].getMessage()
    for i in range(3):  # followed once; from then on its own saves again
        h.add(f"n{i}", "x")
    assert len(HistoryStore(path).load().pairs) == 5 and len(caplog.records) == 1


def test_outside_change_needs_a_change(tmp_path):
    path = tmp_path / "h.json"
    store = HistoryStore(path)
    assert store.load() is None and store.outside_change() is None  # no file, still none
    store.save(Conversation(pairs_of(("q", "a"))))
    assert store.outside_change() is None
    HistoryStore(path).save(Conversation(pairs_of(("q", "a"))))  # the same content, written anew: a new file all the same
    assert store.outside_change().pairs == pairs_of(("q", "a")) and store.outside_change() is None


def test_without_a_store_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    h = History("sys", 10, 1000)
    h.add("q", "a")
    assert h.store is None and list(tmp_path.iterdir()) == []


def _valid_file(path):
    HistoryStore(path).save(Conversation(pairs_of(("q1", "a1"), ("q2", "a2"))))
    return path.read_bytes()


def _stale_checksum(raw):
    doc = json.loads(raw)
    doc["pairs"][0][1]["content"] = "edited"
    return json.dumps(doc).encode()


def _wrong_version(raw):
    doc = json.loads(raw)
    doc["version"] = 99
    return json.dumps(doc).encode()


def _wrong_structure(raw):
    doc = json.loads(raw)
    doc["pairs"] = [[{"role": "user", "content": "q"}]]
    return json.dumps(doc).encode()


CORRUPTIONS = {
    "garbage": (lambda raw: bytes(range(7, 200)) * 3, "not valid UTF-8"),
    "garbage_text": (lambda raw: b"hello, not json at all", "not valid JSON"),
    "truncated": (lambda raw: raw[: len(raw) // 2], "truncated"),
    "stale_checksum": (_stale_checksum, "checksum mismatch"),
    "wrong_version": (_wrong_version, "version 99"),
    "invalid_utf8": (lambda raw: raw.replace(b"q1", b"q\xff\xfe1"), "not valid UTF-8"),
    "wrong_structure": (_wrong_structure, "wrong structure"),
    "not_ours": (lambda raw: b'{"pairs": []}', "not an mmdagent-llm history file"),
    "empty": (lambda raw: b"", "empty file"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_file_is_reported_kept_and_replaced(tmp_path, caplog, kind):
    corrupt, reason = CORRUPTIONS[kind]
    path = tmp_path / "history-default.json"
    bad = corrupt(_valid_file(path))
    path.write_bytes(bad)

    caplog.set_level(logging.INFO, logger=LOGGER)
    store = HistoryStore(path)
    assert store.load().pairs == []
    [error] = errors(caplog)
    message = error.getMessage()
    assert str(path) in message and reason in message, message

    kept = [p for p in tmp_path.iterdir() if p.name.startswith("history-default.json.corrupt-")]
    assert len(kept) == 1 and kept[0].read_bytes() == bad and kept[0].name in message
    assert not path.exists()

    h = History("sys", 10, 1000, store=store)  # starts fresh (the file is gone now) ...
    assert h.pairs == []
    h.add("new", "start")  # ... and the next save works
    assert HistoryStore(path).load().pairs == pairs_of(("new", "start"))
    assert len(errors(caplog)) == 1


def test_history_starts_fresh_on_a_corrupt_file(tmp_path, caplog):
    path = tmp_path / "h.json"
    path.write_bytes(b'{"format": "mmdagent-llm-history", "version": 1, "pairs": [[')
    h = History("sys", 10, 1000, store=HistoryStore(path))
    assert h.pairs == [] and len(errors(caplog)) == 1


def test_two_corruptions_keep_both_copies(tmp_path, caplog):
    path = tmp_path / "h.json"
    for content in (b"one", b"two"):
        path.write_bytes(content)
        assert HistoryStore(path).load().pairs == []
    kept = sorted(p.read_bytes() for p in tmp_path.iterdir() if ".corrupt-" in p.name)
    assert kept == [b"one", b"two"] and len(errors(caplog)) == 2


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_unreadable_folder_is_logged_not_raised(tmp_path, caplog):
    folder = tmp_path / "locked"
    path = folder / "h.json"
    _valid_file(path)
    folder.chmod(0)
    try:
        assert HistoryStore(path).load().pairs == []
    finally:
        folder.chmod(0o755)
    [error] = errors(caplog)
    assert str(path) in error.getMessage() and "cannot be read" in error.getMessage()


def test_crash_during_save_leaves_the_previous_file_intact(tmp_path, monkeypatch, caplog):
    path = tmp_path / "h.json"
    store = HistoryStore(path)
    before = pairs_of(("q1", "a1"))
    store.save(Conversation(before))
    original = path.read_bytes()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    store.save(Conversation(before + pairs_of(("q2", "a2"))))  # does not raise
    store.save(Conversation(before + pairs_of(("q3", "a3"))))  # the same reason: logged once
    assert path.read_bytes() == original and HistoryStore(path).load().pairs == before
    assert [p.name for p in tmp_path.iterdir()] == ["h.json"]  # the temp file is removed
    [error] = errors(caplog)
    assert str(path) in error.getMessage() and "No space left" in error.getMessage()

    monkeypatch.undo()
    store.save(Conversation(before + pairs_of(("q4", "a4"))))
    assert HistoryStore(path).load().pairs[-1][0]["content"] == "q4"


def test_temp_file_left_by_a_real_crash_is_ignored_and_cleaned(tmp_path, caplog):
    path = tmp_path / "h.json"
    HistoryStore(path).save(Conversation(pairs_of(("q", "a"))))
    stale = tmp_path / ".h.json.abc123.tmp"
    stale.write_bytes(b'{"format": "mmdagent-llm-hi')  # a save interrupted half-way
    assert HistoryStore(path).load().pairs == pairs_of(("q", "a"))
    assert not stale.exists() and errors(caplog) == []


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_save_into_a_read_only_folder_is_logged_once(tmp_path, caplog):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        h = History("sys", 10, 1000, store=HistoryStore(folder / "h.json"))
        h.add("q1", "a1")
        h.add("q2", "a2")
    finally:
        folder.chmod(0o755)
    assert len(h.pairs) == 2  # the conversation goes on in memory
    [error] = errors(caplog)
    assert "cannot be saved" in error.getMessage()


def _cfg(history_file, session="default"):
    return {"llm": {"history_file": history_file, "archive_keep": 20}, "bus": {"session": session}}


def test_defaults_declare_history_file():
    assert config.load()["llm"]["history_file"] == ""


def test_store_for_none_keeps_history_in_memory():
    assert store_for(_cfg("none")) is None
    assert store_for(_cfg(" None ")) is None


@pytest.mark.skipif(sys.platform == "win32", reason="XDG layout")
def test_store_for_empty_uses_the_per_session_state_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    store = store_for(_cfg("", session="avatar1"))
    assert store.path == tmp_path / "state" / "mmdagent-llm" / "history-avatar1.json"
    assert default_path("avatar1") == store.path

    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert store_for(_cfg("")).path == tmp_path / "home" / ".local" / "state" / "mmdagent-llm" / "history-default.json"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    assert default_path("x").parent == tmp_path / "home" / ".local" / "state" / "mmdagent-llm"


def test_store_for_windows_uses_localappdata(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    assert default_path("s").parent == tmp_path / "Local" / "mmdagent-llm"


def test_store_for_explicit_path(tmp_path):
    assert store_for(_cfg(str(tmp_path / "mine.json"))).path == tmp_path / "mine.json"


def test_session_names_are_sanitized_without_collisions():
    names = {default_path(s).name for s in ("a/b", "a_b", "../..", "ジェネ", "", "x" * 300)}
    assert len(names) == 6
    for name in names:
        assert name.startswith("history-") and name.endswith(".json") and len(name) < 100
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    assert default_path("a_b").name == "history-a_b.json"


def test_a_path_that_cannot_be_read_is_logged_not_raised(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    store = HistoryStore(blocker / "h.json")  # its "folder" is a file (works as root too)
    assert store.load().pairs == []
    [error] = errors(caplog)
    assert str(blocker / "h.json") in error.getMessage() and "cannot be read" in error.getMessage()
    (tmp_path / "dir.json").mkdir()
    assert HistoryStore(tmp_path / "dir.json").load().pairs == []
    assert len(errors(caplog)) == 2


def test_save_failures_are_logged_once_per_reason_and_never_raise(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    caplog.set_level(logging.INFO, logger=LOGGER)
    h = History("sys", 10, 1000, store=HistoryStore(blocker / "sub" / "h.json"))
    assert "cannot be read" in errors(caplog)[0].getMessage()  # loading fails too: reported once
    caplog.clear()
    for i in range(3):
        h.add(f"q{i}", f"a{i}")
    assert len(h.pairs) == 3  # the conversation goes on in memory
    [error] = errors(caplog)
    assert "cannot be saved" in error.getMessage() and str(blocker / "sub" / "h.json") in error.getMessage()

    blocker.unlink()  # the problem goes away: the next save works and says so
    h.add("q3", "a3")
    assert len(HistoryStore(blocker / "sub" / "h.json").load().pairs) == 4
    assert any("saved again" in r.getMessage() for r in caplog.records)


def test_macos_uses_application_support_and_its_logs_folder(tmp_path, monkeypatch):
    from broker.config import log_dir, state_dir
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert state_dir() == tmp_path / "Library" / "Application Support" / "mmdagent-llm"
    assert log_dir() == tmp_path / "Library" / "Logs" / "mmdagent-llm"


def test_a_file_that_cannot_be_read_is_kept_aside_not_replaced(tmp_path, monkeypatch, caplog):
    from stages.llm import history_store

    path = tmp_path / "h.json"
    said = _valid_file(path)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(history_store, "open", refused, raising=False)  # as for a file of another user
    h = History("sys", 10, 1000, store=HistoryStore(path))
    monkeypatch.undo()
    [error] = errors(caplog)
    message = error.getMessage()
    assert "cannot be read (Permission denied)" in message and "kept as h.json.unreadable-" in message
    h.add("new", "start")  # the new conversation's save ...
    [kept] = tmp_path.glob("h.json.unreadable-*")
    assert kept.read_bytes() == said  # ... did not overwrite the one that could not be read
    assert HistoryStore(path).load().pairs == pairs_of(("new", "start"))
