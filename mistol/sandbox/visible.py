"""Text from the model or its code, made safe to show on a terminal.

Code and its output may contain control characters that a terminal obeys instead of
showing: ESC sequences that clear a line, move the cursor or recolor text (so a block can
look harmless while it runs something else), a carriage return that writes over a line,
or Unicode bidi controls that reorder what is read. `visible` spells each of them out
(ESC becomes `\\x1b`, U+202E becomes `\\u202e`); newlines and tabs stay. Only what goes to
a terminal passes through it: the text the model is shown stays as the code printed it.
"""

from __future__ import annotations

_BIDI = [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C]
_SPELLED = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)] if chr(c) not in "\n\t"}
_SPELLED.update({c: f"\\u{c:04x}" for c in _BIDI})


def visible(text: str) -> str:
    """`text` with every control character except newline and tab written out as an escape."""
    return text.translate(_SPELLED)
