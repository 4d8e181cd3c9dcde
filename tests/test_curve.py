"""Who may talk: loopback by default; anything else needs CURVE keys, and a client without them is refused."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from broker import wire
from stages.commands import cli
from broker import config, curve
from stages.llm.history_store import Conversation, HistoryStore
from tests.harness import ROOT, pipeline_env, write_config


@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch, tmp_path):
    """Only what a test sets: no MMDAGENT_LLM_* from the caller's environment, no local file."""
    for name in list(os.environ):
        if name.startswith("MMDAGENT_LLM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def keys(tmp_path) -> Path:
    folder = tmp_path / "keys"
    curve.generate(folder)
    return folder


def secrets_of(folder: Path) -> list[bytes]:
    found = [zmq.auth.load_certificate(folder / name)[1] for name in (curve.SERVER_SECRET, curve.CLIENT_SECRET)]
    assert all(s and len(s) == 40 for s in found)
    return found


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return path


# -- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "*", "broker.example", "::"])
def test_a_non_loopback_host_without_keys_is_refused(tmp_path, host):
    with pytest.raises(config.ConfigError, match=r"not a loopback address.*mmdagent-llm keys <folder>.*curve_dir"):
        config.load(write(tmp_path, f'[bus]\nhost = "{host}"\n'))


def test_the_environment_cannot_open_the_bus_either(monkeypatch):
    monkeypatch.setenv("MMDAGENT_LLM_BUS_HOST", "0.0.0.0")
    with pytest.raises(config.ConfigError, match="curve_dir"):
        config.load()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.8.7", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_keys(tmp_path, host):
    assert config.load(write(tmp_path, f'[bus]\nhost = "{host}"\n'))["bus"]["curve_dir"] == ""


def test_ipc_needs_no_keys(tmp_path):
    config.load(write(tmp_path, '[bus]\ntransport = "ipc"\nhost = "0.0.0.0"\n'))


def test_a_non_loopback_host_with_keys_is_accepted(tmp_path, keys, monkeypatch):
    cfg = config.load(write(tmp_path, f"[bus]\nhost = \"0.0.0.0\"\ncurve_dir = '{keys}'\n"))
    assert cfg["bus"]["curve_dir"] == str(keys)
    monkeypatch.setenv("MMDAGENT_LLM_BUS_CURVE_DIR", str(keys))   # the environment works too
    monkeypatch.setenv("MMDAGENT_LLM_BUS_HOST", "10.0.0.5")
    assert curve.folder_of(config.load()) == keys


def test_missing_key_files_name_the_folder_never_a_key(tmp_path, keys):
    secrets = secrets_of(keys)
    (keys / curve.CLIENT_SECRET).unlink()
    cfg = config.load(write(tmp_path, f"[bus]\ncurve_dir = '{keys}'\n"))
    with pytest.raises(config.ConfigError) as err:
        curve.client_options(cfg)
    assert str(keys) in str(err.value) and curve.CLIENT_SECRET in str(err.value)
    assert not any(s.decode() in str(err.value) for s in secrets)
    with pytest.raises(config.ConfigError, match="no such folder"):
        config.load(write(tmp_path, f"[bus]\ncurve_dir = '{tmp_path / 'nowhere'}'\n"))


def test_a_broken_secret_file_is_named_and_not_shown(tmp_path, keys):
    cfg = config.load(write(tmp_path, f"[bus]\ncurve_dir = '{keys}'\n"))
    path = keys / curve.SERVER_SECRET
    text = path.read_text(encoding="utf-8")
    secret = zmq.auth.load_certificate(path)[1].decode()
    path.write_text(text.replace(secret, secret[:-3]), encoding="utf-8")   # a truncated secret key
    with pytest.raises(config.ConfigError) as err:
        curve.server_options(cfg)
    assert str(path) in str(err.value) and secret[:-3] not in str(err.value)


def test_the_broker_needs_its_secret_and_a_client_key(tmp_path, keys):
    cfg = config.load(write(tmp_path, f"[bus]\ncurve_dir = '{keys}'\n"))
    (keys / curve.CLIENTS_DIR / curve.CLIENT_PUBLIC).unlink()
    with pytest.raises(config.ConfigError, match="no client public key"):
        curve.start_authenticator(zmq.Context.instance(), cfg)
    (keys / curve.SERVER_SECRET).unlink()     # a machine that runs only stages: clients still work
    curve.client_options(cfg)(zmq.Context.instance().socket(zmq.SUB))
    with pytest.raises(config.ConfigError, match=curve.SERVER_SECRET):
        curve.server_options(cfg)


def test_without_curve_dir_the_session_has_keys_of_its_own(tmp_path, own_state):
    """Made on first use, private (0700 folders, 0600 secrets), different per session, used by every socket."""
    cfg = config.load(write(tmp_path, "[bus]\n"))
    folder = curve.folder_of(cfg)
    state = tmp_path / "state" / "mmdagent-llm"
    assert folder == state / "bus-default" / "keys"
    assert not curve.missing_files(folder, curve.ALL_FILES)
    for path in (state, folder.parent, folder, folder / curve.CLIENTS_DIR):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for name in (curve.SERVER_SECRET, curve.CLIENT_SECRET):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert curve.folder_of(cfg) == folder and secrets_of(folder) == secrets_of(curve.folder_of(cfg))  # kept
    other = curve.folder_of({**cfg, "bus": {**cfg["bus"], "session": "avatar2"}})
    assert other != folder and set(secrets_of(other)).isdisjoint(secrets_of(folder))
    sock = zmq.Context.instance().socket(zmq.SUB)
    try:
        curve.client_options(cfg)(sock)
        assert sock.mechanism == zmq.CURVE
    finally:
        sock.close(0)


def test_a_state_folder_open_to_others_is_closed(tmp_path, own_state, caplog):
    state = tmp_path / "state" / "mmdagent-llm"
    state.mkdir(parents=True, mode=0o755)
    os.chmod(state, 0o755)
    curve.folder_of(config.load(write(tmp_path, "[bus]\n")))
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert [r.getMessage() for r in caplog.records if "open to other users" in r.getMessage()] == \
        [f"{state} was open to other users: now mode 0700"]


def test_a_state_folder_made_here_is_private_from_the_start(tmp_path, monkeypatch, caplog):
    """What the console and the plugin do first (a log or run folder inside the state folder,
    a history file), then the keys: every folder made on the way is 0700, nothing to report."""
    base = tmp_path / "new" / "state"                       # XDG_STATE_HOME does not exist yet either
    monkeypatch.setenv("XDG_STATE_HOME", str(base))
    state = config.state_dir()
    curve.private_dir(state / "run-default")
    HistoryStore(state / "history-default.json").save(Conversation())
    curve.folder_of(config.load(write(tmp_path, "[bus]\n")))
    assert not [r for r in caplog.records if "open to other users" in r.getMessage()]
    for path in (tmp_path / "new", base, state, state / "run-default", state / "bus-default"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


def test_make_folders_leaves_existing_folders_alone(tmp_path):
    os.chmod(tmp_path, 0o755)
    curve.make_folders(tmp_path / "a" / "b")
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
    assert [stat.S_IMODE((tmp_path / p).stat().st_mode) for p in ("a", "a/b")] == [0o700, 0o700]
    curve.make_folders(tmp_path / "a" / "b")                 # there already: fine
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        curve.make_folders(tmp_path / "file")


def test_many_processes_starting_at_once_agree_on_one_key_set(tmp_path, own_state):
    config_path = write(tmp_path, "[bus]\n")
    code = ("import sys; from broker import config, curve; "
            "print(curve.folder_of(config.load()).joinpath('client.key').read_text())")
    env = dict(os.environ, MMDAGENT_LLM_CONFIG=str(config_path), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE) for _ in range(6)]
    outs = {proc.communicate(timeout=60)[0] for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert len(outs) == 1 and b"public-key" in outs.pop()
    assert not [p for p in (tmp_path / "state" / "mmdagent-llm").iterdir() if p.name.startswith(".")]


# -- the keys subcommand --------------------------------------------------------------------
def test_keys_subcommand_writes_private_files_and_prints_no_secret(tmp_path, capsys):
    folder = tmp_path / "new" / "keys"
    assert cli.main(["keys", str(folder)]) == 0
    out, err = capsys.readouterr()
    for name in (curve.SERVER_PUBLIC, curve.SERVER_SECRET, curve.CLIENT_PUBLIC, curve.CLIENT_SECRET):
        assert (folder / name).is_file()
    assert (folder / curve.CLIENTS_DIR / curve.CLIENT_PUBLIC).is_file()
    for name in (curve.SERVER_SECRET, curve.CLIENT_SECRET):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    for secret in secrets_of(folder):
        assert secret.decode() not in out + err
    assert str(folder) in out
    # the printed line is valid TOML and makes a non-loopback configuration valid
    line = next(s.strip() for s in out.splitlines() if s.strip().startswith("curve_dir = "))
    assert tomllib.loads(line)["curve_dir"] == str(folder)
    config.load(write(tmp_path, f'[bus]\nhost = "0.0.0.0"\n{line}\n'))
    # never overwrites keys
    before = (folder / curve.CLIENT_SECRET).read_bytes()
    assert cli.main(["keys", str(folder)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (folder / curve.CLIENT_SECRET).read_bytes() == before


# -- a real broker ----------------------------------------------------------------------------
def _wrong_keys(folder: Path):
    """The broker's real public key, but a client key pair it does not know."""
    server_public = zmq.auth.load_certificate(folder / curve.SERVER_PUBLIC)[0]
    public, secret = zmq.curve_keypair()

    def apply(sock: zmq.Socket) -> None:
        sock.curve_serverkey = server_public
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    return apply


HANDSHAKE_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}


def _subscriber(ctx: zmq.Context, cfg: config.Config, options) -> tuple[zmq.Socket, zmq.Socket]:
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.setsockopt(zmq.SUBSCRIBE, b"heartbeat.broker")
    options(sock)
    events = zmq.EVENT_HANDSHAKE_SUCCEEDED
    for event in HANDSHAKE_FAILED:
        events |= event
    monitor = sock.get_monitor_socket(events)
    sock.connect(config.endpoint(cfg, "events_out"))
    return sock, monitor


def _wait_event(monitor: zmq.Socket, timeout: float) -> int | None:
    """The first handshake event of a monitored socket, or None after ``timeout`` seconds."""
    if monitor.poll(int(timeout * 1000)):
        return recv_monitor_message(monitor)["event"]
    return None


def test_only_a_client_with_the_right_keys_hears_the_broker(tmp_path, keys):
    config_path = write_config(tmp_path, bus={"curve_dir": str(keys)})
    cfg = config.load(config_path)
    log_path = tmp_path / "broker.log"
    ctx = zmq.Context.instance()
    sockets: list[zmq.Socket] = []
    with open(log_path, "wb") as log:
        broker = subprocess.Popen([sys.executable, "-m", "stages.commands.cli", "broker"], cwd=ROOT,
                                  env=pipeline_env(config_path, None), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=log)
    try:
        good, good_monitor = _subscriber(ctx, cfg, curve.client_options(cfg))
        sockets += [good, good_monitor]
        assert good.poll(20_000), "the client with the right keys heard nothing from the broker"
        env = wire.decode(good.recv_multipart())
        assert env.kind == "heartbeat" and env.sender == "broker" and env.body["stage"] == "broker"
        assert _wait_event(good_monitor, 5) == zmq.EVENT_HANDSHAKE_SUCCEEDED

        wrong, wrong_monitor = _subscriber(ctx, cfg, _wrong_keys(keys))
        plain, plain_monitor = _subscriber(ctx, cfg, lambda sock: None)
        sockets += [wrong, wrong_monitor, plain, plain_monitor]
        # each is turned away at the handshake: the unknown key by the authenticator (400),
        # the client without CURVE by the mechanism mismatch (seen as a protocol error or a
        # plain disconnect, depending on timing)
        assert _wait_event(wrong_monitor, 10) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        assert _wait_event(plain_monitor, 10) in HANDSHAKE_FAILED
        # and for 3 s, while the right client keeps hearing heartbeats, they hear nothing
        heard = {good: 0, wrong: 0, plain: 0}
        poller = zmq.Poller()
        for sock in heard:
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + 3.0
        while (left := deadline - time.monotonic()) > 0:
            for sock, _ in poller.poll(int(left * 1000) + 1):
                sock.recv_multipart()
                heard[sock] += 1
        assert heard[wrong] == 0 and heard[plain] == 0
        assert heard[good] >= 2
        assert broker.poll() is None
    finally:
        for sock in sockets:
            sock.close(0)
        if broker.poll() is None:
            broker.terminate()
            try:
                broker.wait(5)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait(5)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    assert "CURVE on: 1 admitted client key(s)" in text and "refused a client" in text
    for secret in secrets_of(keys):
        assert secret.decode() not in text


def test_stages_and_the_launcher_use_the_keys(tmp_path, keys):
    """A real stage becomes ready through a CURVE broker: its sockets and wait_ready's carry the keys."""
    from stages.commands.launcher import Pipeline, wait_ready

    config_path = write_config(tmp_path, bus={"curve_dir": str(keys)})
    cfg = config.load(config_path)
    with open(tmp_path / "stages.log", "wb") as log:
        pipeline = Pipeline(env=pipeline_env(config_path, None), stderr=log, names=("broker", "segmenter"))
        try:
            pipeline.start()
            seen = wait_ready(cfg, ("broker", "segmenter"), timeout=30)
            assert seen["segmenter"]["ready"] and seen["broker"]["ready"]
        finally:
            pipeline.stop()
    text = (tmp_path / "stages.log").read_text(encoding="utf-8", errors="replace")
    assert "refused" not in text
    for secret in secrets_of(keys):
        assert secret.decode() not in text
