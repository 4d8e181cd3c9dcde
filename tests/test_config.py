"""Configuration: documented defaults, user file overlay, environment overrides, clear errors."""

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
