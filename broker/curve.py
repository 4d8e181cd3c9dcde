"""Who may talk on the bus: ZeroMQ CURVE keys (encryption plus client authentication), always.

Every broker socket is a CURVE server, every stage and observer a CURVE client, and the
broker's ZAP authenticator (:func:`start_authenticator`) admits only the client public keys in
``<folder>/clients/``. A client without CURVE, or with any other key pair, gets no connection
at all. The folder (:func:`folder_of`) is:

- ``[bus] curve_dir``, made by ``mmdagent-llm keys <folder>`` (:func:`generate`) and copied to
  every machine, when the bus spans machines (required for a non-loopback host);
- otherwise the session's own ``<state>/bus-<session>/keys/``, made on first use
  (:func:`session_keys`), mode 0700 inside 0700 folders: a private bus per session with
  nothing to set up (see :mod:`broker.sessions`).

The folder (files in the ZeroMQ/pyzmq certificate format, so ``zmq.auth.load_certificate``
reads them)::

    server.key            the broker's public key (every process needs it)
    server.key_secret     the broker's secret key (only the broker's machine needs it)
    client.key            the clients' public key
    client.key_secret     the clients' secret key (every stage and observer)
    clients/client.key    public keys the broker admits: one ``*.key`` file per client key

Secret files are written with mode 0600. Secret keys are never logged, never put on a
command line and never put in an error message: errors name files and folders only.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import zmq
import zmq.auth

from broker import config as config_mod
from broker.config import safe_name, state_dir

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("mmdagent_llm")

SERVER_PUBLIC = "server.key"
SERVER_SECRET = "server.key_secret"
CLIENT_PUBLIC = "client.key"
CLIENT_SECRET = "client.key_secret"
CLIENTS_DIR = "clients"
#: what a client (every stage, observer, the launcher) needs; checked by :func:`client_options`
CLIENT_FILES = (SERVER_PUBLIC, CLIENT_PUBLIC, CLIENT_SECRET)
#: what the broker needs besides its folder of admitted client keys
SERVER_FILES = (SERVER_PUBLIC, SERVER_SECRET)
#: a complete folder
ALL_FILES = (SERVER_PUBLIC, SERVER_SECRET, CLIENT_PUBLIC, CLIENT_SECRET, f"{CLIENTS_DIR}/{CLIENT_PUBLIC}")

SocketOptions = Callable[[zmq.Socket], None]
_warned: set[Path] = set()  # secret files already reported as readable by others
_tightened: set[Path] = set()  # folders whose mode was made 0700 (reported once)

_PUBLIC_BANNER = """#   ****  Generated on {0} by mmdagent-llm keys  ****
#   ZeroMQ CURVE Public Certificate
"""
_SECRET_BANNER = """#   ****  Generated on {0} by mmdagent-llm keys  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.
"""


def explicit_folder(cfg: config_mod.Config) -> Path | None:
    """The key folder from ``[bus] curve_dir`` (``~`` expanded), or None when it is not set."""
    value = cfg["bus"]["curve_dir"]
    return Path(value).expanduser() if value else None


def folder_of(cfg: config_mod.Config) -> Path:
    """The key folder in force: ``[bus] curve_dir``, else the session's own (made if needed)."""
    return explicit_folder(cfg) or session_keys(cfg)


def session_folder(cfg: config_mod.Config) -> Path:
    """``<state>/bus-<session>``: the session's ``keys/`` and ``broker.json`` (not created here)."""
    return state_dir() / f"bus-{safe_name(cfg['bus']['session'])}"


def make_folders(path: Path) -> None:
    """Create ``path`` and each of its missing parents, every one mode 0700 (the XDG base
    directory spec's mode for folders it creates; ``mkdir(parents=True)`` would make the
    parents 0755); folders that exist already are left as they are."""
    missing: list[Path] = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass  # another process of the session made it meanwhile
    path.mkdir(mode=0o700, exist_ok=True)


def private_dir(path: Path) -> Path:
    """``path`` created if needed (:func:`make_folders`), mode 0700, owned by us; ConfigError if
    another user owns it.

    A folder of ours that others could enter is tightened (reported once): the state folder
    may have been made by an older version, or by hand.
    """
    make_folders(path)
    if os.name != "posix":
        return path
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise config_mod.ConfigError(
            f"{path} belongs to another user (uid {st.st_uid}), who could read or replace the keys "
            f"there: remove it, or set XDG_STATE_HOME to a folder of your own")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        os.chmod(path, 0o700)
        if path not in _tightened:
            _tightened.add(path)
            log.warning("%s was open to other users: now mode 0700", path)
    return path


def session_keys(cfg: config_mod.Config) -> Path:
    """The session's key folder, the keys made now if it has none yet.

    The processes of a session start at once: the keys are written into a temporary folder
    that is renamed into place, so exactly one set wins and nobody reads a half-written one.
    """
    folder = session_folder(cfg) / "keys"
    private_dir(folder.parent.parent)
    private_dir(folder.parent)
    if folder.is_dir():
        private_dir(folder)
        if not missing_files(folder, ALL_FILES):
            return folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))  # mode 0700
    try:
        generate(tmp)
        os.rename(tmp, folder)
        log.info("made the keys of session %r in %s", cfg["bus"]["session"], folder)
    except OSError:
        pass  # another process of the session was first, or the folder is damaged (below)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    missing = missing_files(folder, ALL_FILES)
    if missing:
        raise config_mod.ConfigError(
            f"{folder} lacks {', '.join(missing)}: remove the folder to get new keys at the next start "
            f"(every process of the session must then be restarted)")
    return folder


def missing_files(folder: Path, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` are not regular files in ``folder``."""
    return [name for name in names if not (folder / name).is_file()]


def check_folder(folder: Path, names: tuple[str, ...] = CLIENT_FILES) -> None:
    """Raise ConfigError naming the folder and the missing file names (never any content)."""
    if not folder.is_dir():
        raise config_mod.ConfigError(
            f"[bus] curve_dir = {str(folder)!r}: no such folder (create it with `mmdagent-llm keys <folder>`)")
    missing = missing_files(folder, names)
    if missing:
        raise config_mod.ConfigError(
            f"[bus] curve_dir = {str(folder)!r}: missing {', '.join(missing)} "
            f"(create the folder with `mmdagent-llm keys <folder>` and copy it whole)")


# -- generating --------------------------------------------------------------------------
def _write(path: Path, text: str, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    if os.name == "posix":
        os.chmod(path, mode)  # exactly this mode, whatever the umask


def _certificate(public: bytes, secret: bytes | None) -> str:
    now = datetime.datetime.now().isoformat(timespec="seconds")
    lines = [(_SECRET_BANNER if secret else _PUBLIC_BANNER).format(now), "metadata", "curve",
             f'    public-key = "{public.decode("ascii")}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def generate(folder: Path) -> list[Path]:
    """Write a fresh server and client key pair into ``folder`` (created, mode 0700).

    Refuses (FileExistsError, naming the file) to overwrite any existing key file: replacing
    keys would lock out every machine that holds the old ones. Returns the files written.
    """
    folder = Path(folder).expanduser()
    clients = folder / CLIENTS_DIR
    targets = [folder / SERVER_PUBLIC, folder / SERVER_SECRET, folder / CLIENT_PUBLIC,
               folder / CLIENT_SECRET, clients / CLIENT_PUBLIC]
    for path in targets:
        if path.exists():
            raise FileExistsError(f"{path} already exists: keys are never overwritten (use another folder)")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    clients.mkdir(mode=0o700, exist_ok=True)
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    _write(folder / SERVER_PUBLIC, _certificate(server_public, None), 0o644)
    _write(folder / SERVER_SECRET, _certificate(server_public, server_secret), 0o600)
    _write(folder / CLIENT_PUBLIC, _certificate(client_public, None), 0o644)
    _write(folder / CLIENT_SECRET, _certificate(client_public, client_secret), 0o600)
    _write(clients / CLIENT_PUBLIC, _certificate(client_public, None), 0o644)
    return targets


# -- loading -----------------------------------------------------------------------------
def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) from a certificate file; errors name the file, never its content."""
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError):
        raise config_mod.ConfigError(f"{path}: not a readable CURVE certificate "
                                     f"(create it with `mmdagent-llm keys <folder>`)") from None
    if len(public) != 40 or (secret and (secret_key is None or len(secret_key) != 40)):
        raise config_mod.ConfigError(f"{path}: no valid {'secret' if secret else 'public'} key in this file")
    if secret and os.name == "posix" and os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        if path not in _warned:  # once, not once per socket
            _warned.add(path)
            log.warning("%s is accessible to other users: chmod 600 it", path)
    return public, secret_key


def server_options(cfg: config_mod.Config) -> SocketOptions:
    """What to apply to each broker socket before ``bind``: CURVE server with the secret key.

    Raises ConfigError when files are missing.
    """
    folder = folder_of(cfg)
    check_folder(folder, SERVER_FILES)
    public, secret = _load(folder / SERVER_SECRET, secret=True)

    def apply(sock: zmq.Socket) -> None:
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret

    return apply


def client_options(cfg: config_mod.Config) -> SocketOptions:
    """What to apply to each socket before ``connect``: the broker's public key and ours.

    Raises ConfigError when files are missing.
    """
    folder = folder_of(cfg)
    check_folder(folder, CLIENT_FILES)
    server_public, _ = _load(folder / SERVER_PUBLIC, secret=False)
    public, secret = _load(folder / CLIENT_SECRET, secret=True)

    def apply(sock: zmq.Socket) -> None:
        sock.curve_serverkey = server_public
        sock.curve_publickey = public
        sock.curve_secretkey = secret

    return apply


class _KnownClients:
    """ZAP credentials provider: admits the public keys found in ``clients/``; logs refusals."""

    MAX_LOGGED = 20  # distinct refused keys logged one by one; after that, only counted

    def __init__(self, keys: set[bytes], folder: Path) -> None:
        self.keys = keys
        self.folder = folder
        self.refused: set[bytes] = set()
        self.refusals = 0
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        with self._lock:
            self.refusals += 1
            if key not in self.refused and len(self.refused) < self.MAX_LOGGED:
                self.refused.add(key)
                log.warning("refused a client with the unknown public key %s (not in %s)",
                            key.decode("ascii", "replace"), self.folder)
        return False


def start_authenticator(ctx: zmq.Context, cfg: config_mod.Config) -> ThreadAuthenticator:
    """Start the broker's ZAP handler (before any bind) admitting only ``<folder>/clients/*.key``.

    Stop the returned authenticator when the broker ends.
    """
    folder = folder_of(cfg)
    clients = folder / CLIENTS_DIR
    if not clients.is_dir():
        raise config_mod.ConfigError(f"[bus] curve_dir = {str(folder)!r}: missing the folder {CLIENTS_DIR}/ "
                                     f"of admitted client keys")
    try:
        keys = set(zmq.auth.load_certificates(clients))
    except (OSError, ValueError):
        raise config_mod.ConfigError(f"{clients}: a *.key file there is not a CURVE certificate") from None
    if not keys:
        raise config_mod.ConfigError(f"{clients}: no client public key (*.key): nobody could connect")
    from zmq.auth.thread import ThreadAuthenticator  # imports asyncio (~8 MB): the broker's alone
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("mmdagent_llm.zap"))
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=_KnownClients(keys, clients))
    log.info("CURVE on: %d admitted client key(s) from %s", len(keys), clients)
    return auth
