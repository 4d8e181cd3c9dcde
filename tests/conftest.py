"""Property tests run with a fixed seed (``derandomize``): a test run is repeatable, and CI is
never red by luck. Explore with fresh random examples: ``HYPOTHESIS_PROFILE=explore pytest``.

A test run has a state folder of its own (``XDG_STATE_HOME``), inherited by the processes its
tests start: its sessions' keys, histories and run folders never meet another run's or the
user's. A test that looks into the folder takes ``own_state``: one of its own."""

import os
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(autouse=True, scope="session")
def _run_state_folder(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    yield
    patch.undo()


@pytest.fixture
def own_state(monkeypatch, tmp_path) -> Path:
    """This test's own state folder (``<tmp_path>/state``)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state"
