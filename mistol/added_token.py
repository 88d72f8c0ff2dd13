"""A token that text is cut at as a whole (`<|im_start|>`), shared by both tokenizer kinds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AddedToken:
    """A token matched as a whole in trusted text, e.g. `<|im_start|>`.

    `special` tokens are dropped by `decode(..., skip_special=True)`. `lstrip`/`rstrip` make a match
    swallow the whitespace to its left/right, as in Hugging Face's AddedToken.
    """

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
