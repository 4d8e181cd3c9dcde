"""Configuration: ``defaults.toml`` (the documented reference), a user file, then environment.

``load()`` returns a plain ``dict[section][key]``. Every key a user sets must exist in
``defaults.toml`` and have the same type (an int is accepted where a float is expected), so a
typo is a clear error at start-up, not a silent default. Environment variables
``MMDAGENT_LLM_<SECTION>_<KEY>`` override both files.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import ipaddress
import os
import re
import sys
import tomllib
import unicodedata
import zlib
from pathlib import Path
from typing import Any

Config = dict[str, dict[str, Any]]

ENV_PREFIX = "MMDAGENT_LLM_"
ENV_CONFIG = "MMDAGENT_LLM_CONFIG"
LOCAL_NAME = "mmdagent-llm.toml"
DEFAULT = "default"  # the source of a value nobody set
APP_DIR = "mmdagent-llm"

#: the broker's endpoints, in port order (tcp uses base_port + index)
ENDPOINTS = (
    "events_in",      # XSUB: stages publish bus events here
    "events_out",     # XPUB: stages and observers subscribe here
    "tokens_in", "tokens_out",
    "segments_in", "segments_out",
    "commands_in", "commands_out",
)


# keys whose value is one of a few words
CHOICES = {("bus", "transport"): ("tcp", "ipc"), ("turn", "barge_in"): ("interrupt", "ignore"),
           ("plugin", "pipeline"): ("builtin", "supervisord"), ("expression", "untagged"): ("keep", "neutral"),
           ("comments", "while_busy"): ("latest", "oldest", "skip")}

MAX_BACKCHANNEL_CHARS = 12  # letters of a backchannel word ([turn] backchannel_words)

BUILTIN_TOOLS = ("current_time", "gesture", "set_timer", "remember")  # [tools] builtin (stages.llm.tools)

# keys that meant something once and are accepted, unused, so an old config still loads
RETIRED = {("segmenter", "first_soft_chars"): "the first segment is the first clause (stages.segmenter.pacing)"}

# the allowed range of every number (inclusive; None: no bound). A number not listed must be >= 0.
_PORT = (0, 65535)
RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("bus", "base_port"): (0, 65535 - 7), ("bus", "peer_timeout"): (0.5, 3600),
    ("llm", "temperature"): (0, 2), ("llm", "first_token_timeout"): (0.1, 3600), ("llm", "chunk_timeout"): (0.1, 3600),
    ("llm", "turn_timeout"): (0.1, 86400), ("llm", "max_retries"): (0, 10), ("llm", "history_tokens"): (0, 10_000_000),
    ("llm", "archive_keep"): (0, 10_000),
    ("segmenter", "soft_cut_chars"): (1, None),
    ("segmenter", "max_bytes"): (16, 1900), ("segmenter", "pause_release"): (0.01, 10),
    ("speech", "start_timeout"): (0.1, 600), ("speech", "stop_timeout_base"): (0.1, 3600),
    ("speech", "cut_timeout"): (0.1, 600), ("turn", "listen_timeout"): (0.1, 3600), ("turn", "max_age"): (0.1, 86400),
    ("turn", "stall_timeout"): (0.1, 86400), ("turn", "echo_similarity"): (0.5, 1.0),
    ("turn", "backchannel_wait"): (0.1, 10), ("transcript", "max_bytes"): (100, None), ("transcript", "keep"): (1, 100),
    ("captions", "size"): (0.1, 100), ("captions", "line_chars"): (1, 200), ("captions", "max_lines"): (1, 20),
    ("tools", "timeout"): (0.1, 600), ("tools", "max_calls"): (1, 20),
    ("remote", "max_connections"): (1, 1000), ("remote", "liveness"): (0.1, 3600),
    ("subtitles", "port"): _PORT, ("metrics", "port"): _PORT, ("expression", "thinking_after"): (0.1, 60),
    ("comments", "max_age"): (1, 86400), ("comments", "max_queue"): (1, 1000), ("comments", "quiet"): (0, 600),
    ("comments", "per_viewer"): (0, 86400), ("comments", "max_chars"): (1, 500),
    ("idle", "after"): (0.1, 86400), ("idle", "every"): (0.1, 86400),
    ("api", "port"): _PORT, ("api", "answer_timeout"): (0.1, 600),
}


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which file/variable and key."""


def defaults_text() -> str:
    # beside this module (not importlib.resources: that import alone costs every stage ~1.5 MB)
    return (Path(__file__).parent / "defaults.toml").read_text(encoding="utf-8")


@functools.cache
def defaults() -> Config:
    """``defaults.toml``, parsed once per process (do not change it: :func:`load` copies it)."""
    return tomllib.loads(defaults_text())


def user_config_path() -> Path | None:
    """The user's file by the search order in defaults.toml, or None."""
    if os.environ.get(ENV_CONFIG):
        path = Path(os.environ[ENV_CONFIG])
        if not path.is_file():
            raise ConfigError(f"{ENV_CONFIG}={path}: no such file")
        return path
    local = Path.cwd() / LOCAL_NAME
    if local.is_file():
        return local
    base = Path(os.environ.get("APPDATA", "~")) if sys.platform == "win32" else Path("~/.config")
    home = base.expanduser() / "mmdagent-llm" / "config.toml"
    return home if home.is_file() else None


def load(path: Path | None = None, sources: dict[tuple[str, str], str] | None = None) -> Config:
    """Defaults, overlaid by ``path`` (or the file found by :func:`user_config_path`), then env.

    ``sources``, if given, is filled with where each value that is not the default came from
    (the file's path, or ``environment MMDAGENT_LLM_...``); range errors name it too."""
    sources = {} if sources is None else sources
    cfg = copy.deepcopy(defaults())
    path = path or user_config_path()
    if path is not None:
        try:
            user = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        _overlay(cfg, user, str(path), sources)
    _overlay_env(cfg, os.environ, sources)
    for (section, key), allowed in CHOICES.items():
        if cfg[section][key] not in allowed:
            raise ConfigError(f"[{section}] {key} = {cfg[section][key]!r}: expected one of {', '.join(allowed)}"
                              f"{_from(sources, section, key)}")
    _check_ranges(cfg, sources)
    _check_bus_access(cfg)
    for key in ("model", "voice"):  # both are fields of every SYNTH_START
        _check_field(cfg["speech"][key], f"[speech] {key}", _from(sources, "speech", key))
    _check_expression(cfg["expression"], _from(sources, "expression", "names"))
    _check_remote(cfg["remote"], _from(sources, "remote", "avatars"))
    _check_mcp(cfg["tools"]["mcp"], _from(sources, "tools", "mcp"))
    _check_inputs(cfg, sources)
    _check_backchannels(cfg["turn"], _from(sources, "turn", "backchannel_words"))
    unknown = [name for name in cfg["tools"]["builtin"] if name not in BUILTIN_TOOLS]
    if unknown:
        raise ConfigError(f"[tools] builtin: no tool {unknown[0]!r} (known: {', '.join(BUILTIN_TOOLS)})"
                          f"{_from(sources, 'tools', 'builtin')}")
    return cfg


def _check_mcp(servers: Any, where: str) -> None:
    """``[tools.mcp]``: name = { command, args } or { url }."""
    if not isinstance(servers, dict):
        raise ConfigError(f"[tools.mcp] must be a table of name = {{ command = ..., args = [...] }}{where}")
    for name, spec in servers.items():
        at = f"[tools.mcp] {name}"
        ok = isinstance(spec, dict) and (
            (set(spec) <= {"command", "args"} and isinstance(spec.get("command"), str) and spec["command"]
             and all(isinstance(a, str) for a in spec.get("args", [])) and isinstance(spec.get("args", []), list))
            or (set(spec) == {"url"} and isinstance(spec["url"], str) and spec["url"].startswith(("http://", "https://"))))
        if not ok:
            raise ConfigError(f'{at}: expected {{ command = "<program>", args = ["..."] }} or '
                              f'{{ url = "http://host:port/mcp" }}{where}')


TWITCH_CHANNEL = re.compile(r"#?[A-Za-z0-9_]{1,25}")
IDLE_PROMPT_MAX = 500  # characters: the idle prompt and its longest topic reach the model as one input


def _check_inputs(cfg: Config, sources: dict[tuple[str, str], str]) -> None:
    """``[comments]``: the sources' addresses; ``[idle]``: a prompt to ask with."""
    comments, idle = cfg["comments"], cfg["idle"]
    url = comments["onecomme_url"]
    if url and not re.fullmatch(r"wss?://[^\s/]+(/\S*)?", url):
        raise ConfigError(f"[comments] onecomme_url = {url!r}: expected \"\" or a ws:// address, e.g. "
                          f"\"ws://127.0.0.1:11180/sub\"{_from(sources, 'comments', 'onecomme_url')}")
    channel = comments["twitch_channel"]
    if channel and not TWITCH_CHANNEL.fullmatch(channel):
        raise ConfigError(f"[comments] twitch_channel = {channel!r}: expected \"\" or a channel name (letters, digits, "
                          f"_, at most 25){_from(sources, 'comments', 'twitch_channel')}")
    host, _, port = comments["twitch_server"].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"[comments] twitch_server = {comments['twitch_server']!r}: expected HOST:PORT"
                          f"{_from(sources, 'comments', 'twitch_server')}")
    longest = max((len(t) for t in idle["topics"]), default=0)
    if not idle["prompt"].strip() or len(idle["prompt"]) + longest > IDLE_PROMPT_MAX:
        raise ConfigError(f"[idle] prompt: empty, or with its longest topic over {IDLE_PROMPT_MAX} characters"
                          f"{_from(sources, 'idle', 'prompt')}")


def _check_remote(remote: dict[str, Any], where: str) -> None:
    """``[remote] allow`` is addresses or networks; each avatar a session name with an address;
    listen and connect are HOST:PORT."""
    for key in ("listen", "connect"):
        host, _, port = remote[key].rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"[remote] {key} = {remote[key]!r}: expected HOST:PORT, e.g. \"127.0.0.1:60001\"{where}")
    for entry in remote["allow"]:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ConfigError(f"[remote] allow: {entry!r} is not an address or network (e.g. \"192.168.1.0/24\")"
                              f"{where}") from None
    avatars = remote["avatars"]
    if not isinstance(avatars, dict):
        raise ConfigError(f"[remote.avatars] must be a table of name = {{ address = ..., config = ... }}{where}")
    for name, entry in avatars.items():
        at = f"[remote.avatars] {name}"
        if not isinstance(entry, dict) or set(entry) - {"address", "config"} or \
                not all(isinstance(v, str) for v in entry.values()):
            raise ConfigError(f"{at}: expected {{ address = \"<IP>\", config = \"<file.toml>\" }}{where}")
        if safe_name(name) != name:
            raise ConfigError(f"{at}: a name is letters, digits, - and _ (it names the avatar's session){where}")
        try:
            ipaddress.ip_address(entry.get("address", ""))
        except ValueError:
            raise ConfigError(f"{at}: address = {entry.get('address')!r} is not an IP address{where}") from None


TAG_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_MOTION_KEYS = {"voice": str, "motion": str, "body": str, "play": str, "priority": (int, float)}
_UNSAFE = re.compile(r"[|\x00-\x1f\x7f\u0085\u2028\u2029]")


def _check_backchannels(turn: dict[str, Any], where: str) -> None:
    """Each backchannel word is compared by its letters and digits (:mod:`stages.bridge.echo`):
    one without any would never be heard; a long one is no backchannel."""
    words = turn["backchannel_words"]
    for word in words:
        letters = [ch for ch in word if unicodedata.category(ch)[0] in "LN"]
        if not letters or len(letters) > MAX_BACKCHANNEL_CHARS:
            raise ConfigError(f"[turn] backchannel_words: {word!r}: a word of 1 to {MAX_BACKCHANNEL_CHARS} "
                              f"letters or digits{where}")
    if turn["backchannels"] and not words:
        raise ConfigError(f"[turn] backchannels = true needs backchannel_words{where}")


def _check_field(value: str, at: str, where: str) -> None:
    """A value that reaches MMDAgent-EX as a message field (a voice, a model, a motion file)
    must be one field: not empty, no ``|`` or control character. ``at`` names the key."""
    if not value or _UNSAFE.search(value):
        raise ConfigError(f"{at} = {value!r}: empty, or a | or control character{where}")


def _check_expression(exp: dict[str, Any], where: str) -> None:
    """The vocabulary reaches MMDAgent-EX as message fields: names a tag can spell, voices and
    files without ``|`` or control characters, files relative to the content folder and inside it."""
    names = exp["names"]
    if not isinstance(names, dict):
        raise ConfigError(f"[expression] names must be a table of name = {{ voice = ..., motion = ... }}{where}")
    for name, entry in names.items():
        at = f"[expression.names] {name}"
        if not TAG_NAME.fullmatch(name):
            raise ConfigError(f"{at}: a name is a-z, 0-9 and _, starting with a letter, at most 32 characters{where}")
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: expected a table such as {{ voice = \"mei_voice_happy\" }}{where}")
        for key, value in entry.items():
            if key not in _MOTION_KEYS:
                raise ConfigError(f"{at}: unknown key {key!r} (known: {', '.join(_MOTION_KEYS)}){where}")
            if not isinstance(value, _MOTION_KEYS[key]) or isinstance(value, bool):
                raise ConfigError(f"{at}: {key} = {value!r} is not a {'number' if key == 'priority' else 'string'}{where}")
            if isinstance(value, str):
                _check_field(value, f"{at}: {key}", where)
        motion = entry.get("motion", "")
        if motion and (Path(motion).is_absolute() or ".." in Path(motion.replace("\\", "/")).parts or
                       motion.startswith(("/", "\\")) or ":" in motion):
            raise ConfigError(f"{at}: motion = {motion!r}: a path relative to the content folder, inside it{where}")
        if entry.get("body", "PART") not in ("PART", "FULL") or entry.get("play", "ONCE") not in ("ONCE", "LOOP"):
            raise ConfigError(f"{at}: body is PART or FULL, play is ONCE or LOOP{where}")
    for key in ("listening", "thinking"):
        if exp[key] and not names.get(exp[key], {}).get("motion"):
            raise ConfigError(f"[expression] {key} = {exp[key]!r}: not a name with a motion in [expression.names]{where}")
    if exp["untagged"] == "neutral" and "neutral" not in names:
        raise ConfigError(f"[expression] untagged = \"neutral\" needs a name neutral in [expression.names]{where}")


def _check_ranges(cfg: Config, sources: dict[tuple[str, str], str]) -> None:
    for section, values in cfg.items():
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            low, high = RANGES.get((section, key), (0, None))
            if (low is not None and value < low) or (high is not None and value > high):
                span = (f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}") if low is not None \
                    else f"at most {high:g}"
                raise ConfigError(f"[{section}] {key} = {value!r}: must be {span}{_from(sources, section, key)}")


def _from(sources: dict[tuple[str, str], str], section: str, key: str) -> str:
    source = sources.get((section, key), DEFAULT)
    return "" if source == DEFAULT else f" (set in {source})"


def _check_bus_access(cfg: Config) -> None:
    """Who may talk: a non-loopback tcp host needs CURVE keys (``[bus] curve_dir``), which must
    be a folder. Whether it holds the right key files is checked where they are used
    (:mod:`broker.curve`), by the process that needs them."""
    bus = cfg["bus"]
    if bus["transport"] == "tcp" and not is_loopback(bus["host"]) and not bus["curve_dir"]:
        raise ConfigError(
            f"[bus] host = {bus['host']!r} is not a loopback address, so other machines could reach the "
            f"bus: it needs encryption and client keys. Run `mmdagent-llm keys <folder>` and set "
            f"[bus] curve_dir = \"<folder>\" (the same folder on every machine), or use host = \"127.0.0.1\"")
    if bus["curve_dir"] and not Path(bus["curve_dir"]).expanduser().is_dir():
        raise ConfigError(f"[bus] curve_dir = {bus['curve_dir']!r}: no such folder "
                          f"(create it with `mmdagent-llm keys <folder>`)")


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1`` (brackets allowed); False for anything else."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name, an interface name or "*": assume it is reachable from outside


def _coerce(default: Any, value: Any, where: str) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):  # every list in defaults.toml is a list of words
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
    else:
        ok = isinstance(value, type(default)) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")
    return value


def _overlay(cfg: Config, user: dict[str, Any], source: str, sources: dict[tuple[str, str], str]) -> None:
    for section, values in user.items():
        if section not in cfg or not isinstance(values, dict):
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(cfg)})")
        for key, value in values.items():
            if (section, key) in RETIRED:
                continue
            if key not in cfg[section]:
                raise ConfigError(f"{source}: unknown key {key!r} in [{section}]")
            cfg[section][key] = _coerce(cfg[section][key], value, f"{source} [{section}] {key}")
            sources[(section, key)] = source


def _overlay_env(cfg: Config, environ: os._Environ[str] | dict[str, str], sources: dict[tuple[str, str], str]) -> None:
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
        if (section, key) in RETIRED:
            continue
        if section not in cfg or key not in cfg[section]:
            raise ConfigError(f"environment {name}: no key {key!r} in [{section}]")
        default = cfg[section][key]
        if isinstance(default, bool):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ConfigError(f"environment {name}: expected true/false, got {text!r}")
            value: Any = text.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, list):
            value = [item.strip() for item in text.split(",") if item.strip()]
        elif isinstance(default, (int, float)):
            try:
                value = type(default)(text)
            except ValueError:
                raise ConfigError(f"environment {name}: expected {type(default).__name__}, got {text!r}") from None
        else:
            value = text
        cfg[section][key] = value
        sources[(section, key)] = f"environment {name}"


# Derived base ports are FIRST_PORT + 8 * block: 27110 .. 29157, below the ephemeral ports
# (Linux 32768-60999, Windows and macOS 49152-65535). A port in that range can be taken by a
# stage's own outgoing connection while the broker is down (a TCP self-connect, which a CURVE
# handshake then holds for its whole timeout), so a restarted broker could not bind.
FIRST_PORT = 27110
PORT_BLOCKS = 256


def derived_base_port(session: str) -> int:
    """The first of the eight tcp ports of ``session`` when ``[bus] base_port = 0``: two
    sessions get two buses with nothing to set (a clash is refused, see :mod:`broker.sessions`)."""
    return FIRST_PORT + 8 * (zlib.crc32(session.encode("utf-8")) % PORT_BLOCKS)


def endpoint(cfg: Config, name: str) -> str:
    """The ZeroMQ address of broker endpoint ``name`` (one of :data:`ENDPOINTS`)."""
    bus = cfg["bus"]
    if bus["transport"] == "tcp":
        base = bus["base_port"] or derived_base_port(bus["session"])
        return f"tcp://{bus['host']}:{base + ENDPOINTS.index(name)}"
    if bus["transport"] == "ipc":
        return f"ipc://{bus['ipc_prefix']}{bus['session']}-{name}"
    raise ConfigError(f"[bus] transport must be 'tcp' or 'ipc', not {bus['transport']!r}")


def state_dir() -> Path:
    """The user's state folder for this application (not created here): keys, histories,
    transcripts, the plugin's run folders.

    Windows ``%LOCALAPPDATA%\\mmdagent-llm``; elsewhere ``$XDG_STATE_HOME/mmdagent-llm`` where
    ``XDG_STATE_HOME`` is set to an absolute path (an unset or relative one is ignored, as the XDG
    spec says); else macOS ``~/Library/Application Support/mmdagent-llm``, others
    ``~/.local/state/mmdagent-llm``."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        return (Path(base) if base else Path.home() / "AppData" / "Local") / APP_DIR
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / APP_DIR
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / APP_DIR
    return Path.home() / ".local" / "state" / APP_DIR


def log_dir() -> Path:
    """Where the processes this application starts by itself write their logs (the console's
    stages): macOS ``~/Library/Logs/mmdagent-llm`` (unless ``XDG_STATE_HOME`` is set), elsewhere
    the state folder's ``logs``."""
    if sys.platform == "darwin" and not os.environ.get("XDG_STATE_HOME", "").startswith("/"):
        return Path.home() / "Library" / "Logs" / APP_DIR
    return state_dir() / "logs"


def safe_name(session: str) -> str:
    """``session`` as a portable file name part: ``[A-Za-z0-9._-]`` only, at most 64 characters.

    A name that had to be changed gets a short hash of the original, so ``a/b`` and ``a_b``
    do not share a file."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", session)[:64] or "_"
    if cleaned == session:
        return cleaned
    return f"{cleaned}-{hashlib.sha256(session.encode('utf-8')).hexdigest()[:8]}"
