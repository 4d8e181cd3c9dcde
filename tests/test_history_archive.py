"""The archive of earlier conversations: a conversation set aside is moved there whole and
owner-only, nothing empty is kept, the number kept is bounded (oldest out first), and the listing
is newest first."""

import os
import re
import stat
from pathlib import Path

import pytest

from broker import config
from stages.llm.history_archive import FOLDER, Archive, archive_of
from stages.llm.history_store import Conversation, HistoryStore


def pairs_of(*qa):
    return [({"role": "user", "content": q}, {"role": "assistant", "content": a}) for q, a in qa]


def conversation(path, n, when=None):
    """A history file of ``n`` exchanges, last spoken in at ``when`` (epoch seconds)."""
    HistoryStore(path, session="s").save(Conversation(pairs_of(*[(f"q{i}", f"a{i}") for i in range(n)])))
    if when is not None:
        os.utime(path, (when, when))
    return path


def test_set_aside_moves_the_conversation_whole_and_private(tmp_path):
    path = conversation(tmp_path / "history-s-console.json", 2, 1_700_000_000)
    said = path.read_bytes()
    archive = Archive(tmp_path / "state" / "conversations", 20)
    target, count = archive.set_aside(path)
    assert count == 2 and not path.exists()
    assert target.parent == archive.folder and target.read_bytes() == said
    assert re.fullmatch(r"history-s-console-\d{8}T\d{6}Z\.json", target.name), target.name
    [entry] = archive.entries()
    assert (entry.path, entry.exchanges, entry.when, entry.problem) == (target, 2, 1_700_000_000, "")
    if os.name == "posix":
        assert stat.S_IMODE(archive.folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(target.stat().st_mode) == 0o600


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_a_file_readable_by_others_becomes_private_in_the_archive(tmp_path):
    path = conversation(tmp_path / "mine.json", 1)
    path.chmod(0o644)
    target, _ = Archive(tmp_path / "a", 20).set_aside(path)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_nothing_is_archived_when_there_is_nothing_to_keep(tmp_path):
    archive = Archive(tmp_path / "conversations", 20)
    assert archive.set_aside(tmp_path / "absent.json") == (None, 0)
    empty = conversation(tmp_path / "empty.json", 0)
    assert archive.set_aside(empty) == (None, 0) and not empty.exists()  # an empty one is simply removed
    assert archive.entries() == [] and not archive.folder.exists()


def test_an_unreadable_conversation_is_kept_all_the_same(tmp_path):
    path = tmp_path / "h.json"
    path.write_bytes(b'{"format": "mmdagent-llm-history", "version": 1, "pairs": [[')
    archive = Archive(tmp_path / "conversations", 20)
    target, count = archive.set_aside(path)
    assert count is None and target.read_bytes().endswith(b"[[")
    [entry] = archive.entries()
    assert entry.exchanges is None and "truncated" in entry.problem


def test_the_archive_keeps_the_newest_by_count_and_lists_them_newest_first(tmp_path):
    archive = Archive(tmp_path / "conversations", 3)
    for i in range(5):  # the same second for all five: their names differ all the same
        target, _ = archive.set_aside(conversation(tmp_path / "history-s-console.json", i + 1, 1_700_000_000 + i))
        assert target is not None and target.exists()
    entries = archive.entries()
    assert [e.exchanges for e in entries] == [5, 4, 3]  # the two oldest removed, newest first
    assert len(set(e.path.name for e in entries)) == 3 and len(list(archive.folder.iterdir())) == 3

    late = conversation(tmp_path / "history-s-console.json", 9, 1_600_000_000)  # last spoken in before them all
    assert archive.set_aside(late) == (None, 9)  # over the bound at once: not kept, and not said to be
    assert [e.exchanges for e in archive.entries()] == [5, 4, 3]


def test_keep_zero_keeps_none(tmp_path):
    archive = Archive(tmp_path / "conversations", 0)
    path = conversation(tmp_path / "h.json", 3)
    assert archive.set_aside(path) == (None, 3) and not path.exists() and archive.entries() == []
    assert archive.copy_in(path, pairs_of(("q", "a")), "s") is None and archive.entries() == []


def test_a_failure_to_move_leaves_the_file_where_it_is(tmp_path):
    path = conversation(tmp_path / "h.json", 2)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(OSError):
        Archive(blocker / "conversations", 20).set_aside(path)
    assert len(HistoryStore(path).load().pairs) == 2


def test_copy_in_failure_is_logged_not_raised(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    path = conversation(tmp_path / "h.json", 2)
    assert Archive(blocker / "c", 20).copy_in(path, HistoryStore(path).load().pairs, "s") is None
    assert "could not keep a copy" in caplog.records[-1].getMessage()


def test_the_users_archive_is_in_the_state_folder_bounded_by_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    cfg = config.load(Path(os.devnull))
    archive = archive_of(cfg)
    assert archive.folder == config.state_dir() / FOLDER and archive.keep == cfg["llm"]["archive_keep"] == 20
