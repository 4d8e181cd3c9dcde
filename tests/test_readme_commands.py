"""The README's "Running the pipeline" commands, run as written on a fresh copy of the repository:
its own venv from `pip install .`, the activate step, supervisord (then supervisorctl), honcho,
and `mmdagent-llm avatar` talking to the pipeline. Nothing is written into the copy.

Only the session's name and ports come from the environment (two test runs on one machine must
not meet), and HOME is a folder of this test's: `~/.local/state/...` is created there."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from broker import config as config_mod
from tests.harness import ROOT, _end_group, free_base_port, wait_pipeline
from tests.pty_term import one_exchange


def blocks(section: str) -> list[list[str]]:
    """The ```sh blocks of a README section, as lists of lines."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = text[text.index(f"## {section}"):]
    body = body[:body.index("\n## ", 3)]
    return [b.split("```", 1)[0].strip().splitlines() for b in body.split("```sh\n")[1:]]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A copy of the files git tracks (what a clone has), with the README's install done in it."""
    copy = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            (copy / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            (copy / name.decode()).write_bytes(src.read_bytes())
    setup = blocks("Running the pipeline")[0]
    assert setup == ["python3 -m venv .venv && .venv/bin/pip install .", ". .venv/bin/activate"]
    done = subprocess.run(["bash", "-c", setup[0]], cwd=copy, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return copy


@pytest.fixture
def env(monkeypatch, tmp_path):
    home = Path(tempfile.mkdtemp(prefix="mmh-"))  # short: supervisord's socket path lives under it
    monkeypatch.setenv("MMDAGENT_LLM_BUS_SESSION", f"readme-{os.getpid()}-{tmp_path.name[-20:]}")
    monkeypatch.setenv("MMDAGENT_LLM_BUS_BASE_PORT", str(free_base_port()))
    values = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "VIRTUAL_ENV"))
              and k != "MMDAGENT_LLM_CONFIG"}
    values["HOME"] = str(home)
    values["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # a fresh shell: nothing of ours on it
    yield values
    subprocess.run(["rm", "-rf", str(home)], check=False)


def run_until_ready(script: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_pipeline(config_mod.load(None), 40)
    except BaseException:
        _end_group(proc)
        raise AssertionError(proc.stdout.read().decode(errors="replace")[-3000:])
    return proc


def talk(copy: Path, env: dict[str, str], activate: str) -> str:
    return one_exchange(["bash", "-c", f"{activate} && mmdagent-llm avatar"], str(copy), env, "こんにちは", 30)


def test_supervisord_as_the_readme_says(fresh: Path, env):
    setup, start, control = blocks("Running the pipeline")[:3]
    activate = setup[1]
    assert start == ["mkdir -p ~/.local/state/mmdagent-llm/supervisor", "supervisord -c deploy/supervisord.conf"]
    before = set(p.relative_to(fresh) for p in fresh.rglob("*") if ".venv" not in p.parts)
    proc = run_until_ready(" && ".join([activate, *start]), fresh, env)
    try:
        deadline = time.monotonic() + 20
        while True:  # supervisord calls a program RUNNING once it has lived startsecs (1 s)
            status = subprocess.run(["bash", "-c", f"{activate} && {control[0]}"], cwd=fresh, env=env,
                                    capture_output=True, text=True, timeout=30)
            running = [line for line in status.stdout.splitlines() if line.startswith("pipeline:") and "RUNNING" in line]
            if len(running) == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        restart = subprocess.run(["bash", "-c", f"{activate} && {control[1]}"], cwd=fresh, env=env,
                                 capture_output=True, text=True, timeout=60)
        said = talk(fresh, env, activate)
    finally:
        _end_group(proc)
    for stage in ("broker", "llm", "segmenter", "sequencer"):
        assert any(line.startswith(f"pipeline:{stage} ") and "RUNNING" in line for line in status.stdout.splitlines()), \
            status.stdout + status.stderr
    assert "pipeline:llm: started" in restart.stdout, restart.stdout + restart.stderr
    assert "avatar> " in said
    logs = Path(env["HOME"]) / ".local" / "state" / "mmdagent-llm" / "supervisor"
    assert (logs / "llm.log").exists() and (logs / "supervisord.log").exists()
    after = set(p.relative_to(fresh) for p in fresh.rglob("*") if ".venv" not in p.parts)
    assert after == before, f"written into the checkout: {sorted(map(str, after - before))}"


def test_honcho_as_the_readme_says(fresh: Path, env):
    setup, honcho = blocks("Running the pipeline")[0], blocks("Running the pipeline")[3]
    assert honcho == ["honcho start"]
    proc = run_until_ready(f"{setup[1]} && {honcho[0]}", fresh, env)
    try:
        said = talk(fresh, env, setup[1])
    finally:
        proc.send_signal(signal.SIGTERM) if proc.poll() is None else None
        _end_group(proc)
    assert "avatar> " in said


def test_without_the_activate_step_the_readme_says_why(fresh: Path, env):
    """What a newcomer sees if they skip it is what the README names."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    done = subprocess.run(["bash", "-c", "honcho start"], cwd=fresh, env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode != 0 and "not found" in done.stderr
    assert '"not found"' in text
