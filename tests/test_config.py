"""Configuration: documented defaults, user file overlay, environment overrides, clear errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from broker import config


def test_defaults_are_complete_and_typed():
    cfg = config.load()
    assert cfg["speech"] == {**cfg["speech"], "model": "0", "voice": "mei_voice_normal"}
    assert cfg["bus"]["transport"] == "tcp" and cfg["bus"]["host"] == "127.0.0.1"
    assert "ジェネ" in cfg["llm"]["system_prompt"]


def test_user_file_and_environment_override(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text('[llm]\nmodel = "llama3"\ntemperature = 1\n[speech]\nvoice = "mei_voice_happy"\n', encoding="utf-8")
    monkeypatch.setenv("MMDAGENT_LLM_CONFIG", str(path))
    monkeypatch.setenv("MMDAGENT_LLM_SPEECH_VOICE", "slt_voice_normal")
    monkeypatch.setenv("MMDAGENT_LLM_LLM_STREAM", "false")
    monkeypatch.setenv("MMDAGENT_LLM_BUS_BASE_PORT", "50000")
    cfg = config.load()
    assert cfg["llm"]["model"] == "llama3"
    assert cfg["llm"]["temperature"] == 1.0 and isinstance(cfg["llm"]["temperature"], float)
    assert cfg["speech"]["voice"] == "slt_voice_normal"
    assert cfg["llm"]["stream"] is False
    assert config.endpoint(cfg, "commands_out") == "tcp://127.0.0.1:50007"


def test_a_retired_key_of_an_older_config_still_loads(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text("[segmenter]\nfirst_soft_chars = 8\nsoft_cut_chars = 30\n", encoding="utf-8")
    monkeypatch.setenv("MMDAGENT_LLM_CONFIG", str(path))
    monkeypatch.setenv("MMDAGENT_LLM_SEGMENTER_FIRST_SOFT_CHARS", "5")
    cfg = config.load()
    assert cfg["segmenter"]["soft_cut_chars"] == 30 and "first_soft_chars" not in cfg["segmenter"]


def test_local_file_in_working_directory_is_found(tmp_path, monkeypatch):
    monkeypatch.delenv("MMDAGENT_LLM_CONFIG", raising=False)
    (tmp_path / "mmdagent-llm.toml").write_text('[speech]\nmodel = "mei"\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert config.load()["speech"]["model"] == "mei"


@pytest.mark.parametrize("text, message", [
    ("[llm]\nmodle = 'x'\n", "unknown key 'modle'"),
    ("[lm]\nmodel = 'x'\n", "unknown section"),
    ("[llm]\ntemperature = 'hot'\n", "expected float"),
    ("[llm]\nstream = 1\n", "expected bool"),
    ("[llm\n", "c.toml"),
])
def test_bad_files_give_clear_errors(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(config.ConfigError, match=message):
        config.load(path)


def test_bad_environment_gives_clear_errors(monkeypatch):
    monkeypatch.setenv("MMDAGENT_LLM_LLM_TEMPRATURE", "1")
    with pytest.raises(config.ConfigError, match="MMDAGENT_LLM_LLM_TEMPRATURE"):
        config.load()


def test_ipc_endpoints_are_distinct_per_session():
    cfg = config.load()
    cfg["bus"].update(transport="ipc", ipc_prefix="@t-", session="s1")
    names = {config.endpoint(cfg, n) for n in config.ENDPOINTS}
    assert len(names) == len(config.ENDPOINTS) and all(n.startswith("ipc://@t-s1-") for n in names)


def test_ranges_are_checked_with_the_source_named(tmp_path, monkeypatch):
    for env, words in (("MMDAGENT_LLM_BUS_BASE_PORT=70000", "base_port = 70000: must be from 0 to 65528"),
                       ("MMDAGENT_LLM_LLM_FIRST_TOKEN_TIMEOUT=-5", "first_token_timeout = -5.0: must be from 0.1"),
                       ("MMDAGENT_LLM_SEGMENTER_MAX_BYTES=5000", "max_bytes = 5000: must be from 16 to 1900"),
                       ("MMDAGENT_LLM_TRANSCRIPT_KEEP=0", "keep = 0: must be from 1 to 100"),
                       ("MMDAGENT_LLM_LLM_ARCHIVE_KEEP=-1", "archive_keep = -1: must be from 0 to 10000")):
        name, value = env.split("=")
        monkeypatch.setenv(name, value)
        with pytest.raises(config.ConfigError, match=re.escape(words) + r".*set in environment " + name):
            config.load(Path(os.devnull))
        monkeypatch.delenv(name)
    path = tmp_path / "c.toml"
    path.write_text("[speech]\ncut_timeout = 0\n", encoding="utf-8")
    with pytest.raises(config.ConfigError, match=rf"cut_timeout = 0.0: must be from 0.1 to 600 \(set in {re.escape(str(path))}\)"):
        config.load(path)


@pytest.mark.parametrize("key, value", [("voice", "a|b"), ("voice", "a\tb"), ("voice", ""), ("model", "0|1"),
                                        ("model", "a\u2028b")])
def test_speech_fields_are_checked_like_the_vocabularys_voices(tmp_path, monkeypatch, key, value):
    # the value is a field of every SYNTH_START: a | would split it and the avatar stay silent
    path = tmp_path / "c.toml"
    path.write_text(f"[speech]\n{key} = {json.dumps(value)}\n", encoding="utf-8")
    with pytest.raises(config.ConfigError, match=re.escape(f"[speech] {key} = {value!r}: empty, or a | or control "
                                                           f"character (set in {path})")):
        config.load(path)
    name = f"MMDAGENT_LLM_SPEECH_{key.upper()}"
    monkeypatch.setenv(name, value)
    with pytest.raises(config.ConfigError, match=re.escape(f"[speech] {key} = {value!r}") + ".*" + name):
        config.load(Path(os.devnull))
    monkeypatch.delenv(name)
    if key == "voice":  # the same check as [expression.names] voices, in the same words
        path.write_text(f"[expression.names]\nodd = {{ voice = {json.dumps(value)} }}\n", encoding="utf-8")
        with pytest.raises(config.ConfigError, match=re.escape(f"voice = {value!r}: empty, or a | or control")):
            config.load(path)


def test_config_command_shows_the_values_in_effect_and_their_source(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[llm]\nmodel = "qwen2.5:7b"\n', encoding="utf-8")
    env = dict(os.environ, MMDAGENT_LLM_SPEECH_VOICE="mei_voice_happy")
    env.pop("MMDAGENT_LLM_CONFIG", None)
    out = subprocess.run([sys.executable, "-m", "stages.commands.cli", "config", "--config", str(path)], env=env,
                         capture_output=True, text=True, encoding="utf-8", timeout=30, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"file: {path}" in lines[0]
    assert f'model = "qwen2.5:7b"  # from {path}' in lines
    assert 'voice = "mei_voice_happy"  # from environment MMDAGENT_LLM_SPEECH_VOICE' in lines
    assert "temperature = 0.7" in lines                                  # a default: no source
    import tomllib
    assert tomllib.loads(out.stdout)["llm"]["model"] == "qwen2.5:7b"     # it is valid TOML


def test_version_help_and_options_after_the_subcommand():
    run = lambda *a: subprocess.run([sys.executable, "-m", "stages.commands.cli", *a], capture_output=True,
                                    text=True, timeout=30)
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("mmdagent-llm ")
    top = run("--help").stdout
    from stages.commands.cli import HELP
    for name in HELP:
        assert name in top
        page = run(name, "--help").stdout
        assert HELP[name][:30].lower() in page.lower().replace("\n", " "), name
    assert run("bus", "--session", "after-it").stdout.startswith("session 'after-it'")
    assert run("--session", "before-it", "bus").stdout.startswith("session 'before-it'")


def test_the_plugins_help_names_the_real_default_pipeline(monkeypatch):
    import tomllib
    from stages.commands import cli
    default = tomllib.loads((Path(config.__file__).parent / "defaults.toml").read_text("utf-8"))["plugin"]["pipeline"]
    page = " ".join(subprocess.run([sys.executable, "-m", "stages.commands.cli", "plugin", "--help"],
                                   capture_output=True, text=True, timeout=30).stdout.split())
    assert f'([plugin] pipeline = "{default}", the default;' in page, page
    if default == "builtin":
        assert 'kept by the plugin itself ([plugin] pipeline = "builtin", the default; also "supervisord")' in page
    assert "under supervisord if none is running" not in page
    # it follows defaults.toml, not a second copy of the default
    monkeypatch.setattr(config, "defaults", lambda: {"plugin": {"pipeline": "supervisord"}})
    assert cli._plugin_help().endswith('under a supervisord of its own ([plugin] pipeline = "supervisord", the '
                                       'default; also "builtin")')


def test_paths_are_in_the_users_folders_never_here(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, HOME=str(tmp_path / "home"), XDG_STATE_HOME=str(tmp_path / "state"))
    env.pop("MMDAGENT_LLM_CONFIG", None)
    out = subprocess.run([sys.executable, "-m", "stages.commands.cli", "paths"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    places = [line.split(None, 1)[1].rsplit("  ", 1)[-1].strip() for line in out.stdout.splitlines()[1:]]
    assert len(places) >= 10
    for place in places[1:]:
        assert place.startswith((str(tmp_path / "state"), str(tmp_path / "home"))), place
        assert not place.startswith(str(work))


def test_remote_avatars_and_allow_are_checked(tmp_path):
    from broker import config as config_mod
    good = tmp_path / "good.toml"
    good.write_text('[remote]\nallow = ["192.168.1.0/24"]\n[remote.avatars]\nfront = { address = "192.168.1.21", '
                    'config = "front.toml" }\n', encoding="utf-8")
    assert config_mod.load(good)["remote"]["avatars"]["front"]["address"] == "192.168.1.21"
    for text, words in (('[remote]\nallow = ["nonsense"]\n', "is not an address or network"),
                        ('[remote.avatars]\nfront = { address = "kiosk" }\n', "is not an IP address"),
                        ('[remote.avatars]\n"a b" = { address = "10.0.0.1" }\n', "a name is letters"),
                        ('[remote.avatars]\nfront = { addr = "10.0.0.1" }\n', "expected { address")):
        refused(tmp_path, text, words)


def refused(tmp_path: Path, text: str, words: str) -> None:
    """A configuration file of ``text`` is refused, the error saying ``words``."""
    bad = tmp_path / "bad.toml"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(config.ConfigError, match=re.escape(words)):
        config.load(bad)


def test_an_unknown_builtin_tool_is_named(tmp_path):
    from broker import config as config_mod
    bad = tmp_path / "bad.toml"
    bad.write_text('[tools]\nbuiltin = ["current_time", "wether"]\n', encoding="utf-8")
    with pytest.raises(config_mod.ConfigError, match="no tool 'wether'"):
        config_mod.load(bad)


def test_the_echo_guard_and_backchannels_are_checked(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[turn]\necho_guard = true\nbackchannels = true\nbackchannel_words = ["うん", "mhm"]\n',
                    encoding="utf-8")
    assert config.load(good)["turn"]["backchannel_words"] == ["うん", "mhm"]
    for text, words in (('[turn]\necho_similarity = 0.2\n', "echo_similarity = 0.2: must be from 0.5 to 1"),
                        ('[turn]\nbackchannel_wait = 0\n', "backchannel_wait = 0.0: must be from 0.1 to 10"),
                        ('[turn]\nbackchannel_words = ["うん", "。"]\n', "'。': a word of 1 to 12 letters"),
                        ('[turn]\nbackchannel_words = ["ちょっと待ってくださいと言いました"]\n', "a word of 1 to 12"),
                        ('[turn]\nbackchannels = true\nbackchannel_words = []\n', "needs backchannel_words"),
                        ('[turn]\necho_guard = "yes"\n', "expected bool")):
        refused(tmp_path, text, words)
