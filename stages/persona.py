"""The avatar's character, from a plain text file beside the ``.mdf`` (``[persona] file``).

The format is for people who do not program: one ``key: value`` per line; a key with nothing
after its colon takes the indented lines below it; ``#`` starts a note line; blank lines are
ignored. The keys (each optional)::

    # character.txt
    name: メイ
    style: 明るく丁寧に、短く話す。
    greeting: こんにちは、メイです。何でも聞いてくださいね。
    about:
      駅前の案内係。地元の食べ物に詳しい。
    never: 値段を約束すること
    never: ほかのお客さんの話

``never`` may be given many times. A line that is not one of these is an error naming the file
and line, so a typo is not silently a character without a name.

:func:`prompt` turns it into the LLM's system prompt (in place of ``[llm] system_prompt``); the
``greeting`` is what the avatar says when it starts (``[persona] greet``). Nothing here reaches
MMDAgent-EX as written: the greeting goes through the pipeline like any answer, cleaned of ``|``
and control characters on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

KEYS = ("name", "style", "greeting", "about", "never")
MAX_BYTES = 20_000  # a character file is a page, not a book: a larger one is refused
#: said to every character: the answer is read aloud
SPEECH_RULE = "音声で読み上げられるので、記号や絵文字、箇条書きやURLは使わないでください。"


class PersonaError(ValueError):
    """The file cannot be used; the message names the file and line."""


@dataclass
class Persona:
    name: str = ""
    style: str = ""
    greeting: str = ""
    about: str = ""
    never: list[str] = field(default_factory=list)
    path: Path | None = None


def parse(text: str, where: str = "character file") -> Persona:
    """The persona ``text`` describes; :class:`PersonaError` for a line that is not a key."""
    persona = Persona()
    key = ""  # the key whose indented lines follow
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[:1] in (" ", "\t", "\u3000") and key:
            _add(persona, key, line.strip())
            continue
        name, colon, value = line.replace("：", ":", 1).partition(":")
        name = name.strip().lower()
        if not colon or name not in KEYS:
            raise PersonaError(f"{where}, line {number}: expected one of {', '.join(KEYS)} followed by ':' "
                               f"(got {line.strip()[:40]!r})")
        key = name
        if value.strip():
            _add(persona, key, value.strip(), new=True)
        elif key == "never":
            persona.never.append("")
    persona.never = [item for item in persona.never if item]
    return persona


def _add(persona: Persona, key: str, value: str, new: bool = False) -> None:
    if key == "never":
        if new or not persona.never:
            persona.never.append(value)
        else:
            persona.never[-1] = f"{persona.never[-1]} {value}".strip()
        return
    old = getattr(persona, key)
    setattr(persona, key, f"{old}\n{value}" if old and not new else value)


def load(path: Path) -> Persona:
    """The persona in ``path`` (UTF-8, BOM allowed); :class:`PersonaError` if it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PersonaError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise PersonaError(f"{path}: {len(data)} bytes; a character file is at most {MAX_BYTES}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PersonaError(f"{path}: not UTF-8 text (save it as UTF-8)") from None
    persona = parse(text, str(path))
    persona.path = path
    return persona


def prompt(persona: Persona) -> str:
    """The system prompt of this character."""
    lines = []
    if persona.name:
        lines.append(f"あなたの名前は{persona.name}です。")
    if persona.about:
        lines.append(persona.about)
    if persona.style:
        lines.append(f"話し方: {persona.style}")
    if persona.greeting:
        lines.append(f"会話の始めに、あなたは「{persona.greeting}」と挨拶しました。")
    if persona.never:
        lines.append("次のことは決して言わないでください: " + "、".join(persona.never) + "。")
    lines.append(SPEECH_RULE)
    return "\n".join(lines)


def find(file: str, folder: Path | None = None) -> Path | None:
    """``[persona] file`` as a path (relative ones from ``folder``, default the working
    folder), or None when it is unset or no such file exists."""
    if not file:
        return None
    path = Path(file).expanduser()
    if not path.is_absolute():
        path = (folder or Path.cwd()) / path
    return path.resolve() if path.is_file() else None
