"""Property tests run with a fixed seed (``derandomize``): a test run is repeatable, and CI is
never red by luck. Explore with fresh random examples: ``HYPOTHESIS_PROFILE=explore pytest``.

Every test has a state folder of its own (``XDG_STATE_HOME``), inherited by the processes it
starts: its sessions' keys, histories and run folders never meet another test's or the user's."""

import os

import pytest
from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(autouse=True)
def _own_state_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
