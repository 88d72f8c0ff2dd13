"""Who answers: the system prompt of a spoken conversation.

Written text and speech want different answers: no lists, tables or code read aloud, short
turns the person can interrupt. "Stacy" asks for that. `--persona FILE` takes any text.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MistolError

STACY = (
    "You are Stacy, a friendly voice assistant. Everything you write is read aloud by a speech "
    "synthesizer, so answer the way a person talks: in one to three short sentences, in plain words. "
    "Never use Markdown, lists, tables, emoji, code blocks or URLs; say numbers and symbols the way "
    "they are spoken. If a question needs a long answer, give the gist and offer to go on. If you did "
    "not catch what was said, ask the person to repeat it."
)

PERSONAS = {"stacy": STACY}


def load_persona(spec: str) -> str:
    """A built-in persona's name, or a text file holding the system prompt."""
    if spec.lower() in PERSONAS:
        return PERSONAS[spec.lower()]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise MistolError(f"{spec}: no such persona file (a text file with the system prompt, or one of: "
                          f"{', '.join(PERSONAS)})")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise MistolError(f"{spec}: the persona file is empty")
    return text
