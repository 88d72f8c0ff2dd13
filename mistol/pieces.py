"""A prompt as pieces: text and token ids in prompt order (str is encoded as plain text, int is
placed as is), and the ids the model generated for a reply reused when the reply comes back."""

from __future__ import annotations

from typing import Mapping

Pieces = list


def known_pieces(text: str, reply_tokens: Mapping[str, Pieces] | None) -> Pieces:
    """`text` as pieces, reusing the generated ids of the longest known beginning of it."""
    best = max((k for k in (reply_tokens or {}) if text.startswith(k)), key=len, default=None)
    if best is None:
        return [text]
    rest = text[len(best):]
    return [*reply_tokens[best], rest] if rest else list(reply_tokens[best])
