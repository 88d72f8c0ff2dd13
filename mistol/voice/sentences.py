"""Cutting a streamed reply into sentences as the tokens arrive, so speech can start early.

A sentence ends at . ! ? (or …) followed by whitespace, or at a line break (list items,
headings). "1." opening a list item, "e.g.", "Mr." and the like do not end one. A sentence
that runs past `max_chars` without an end is cut at its last comma, semicolon or colon (or
space), so a long first sentence does not hold back the first audio. Fenced code blocks
are never spoken: a fence ends the sentence before it, and everything up to the closing
fence is dropped.

Each `Sentence` carries `end`, the offset in the fed text just after it, so a reply cut
short by barge-in can be kept exactly as far as it was spoken.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)|\n")
_FENCE = re.compile(r"(?:^|\n)[ \t]*(`{3,}|~{3,})[^\n]*\n", re.S)
_MAYBE_FENCE = re.compile(r"(?:^|\n)[ \t]*(`{1,2}|~{1,2})$")  # the start of a fence still arriving
_LIST_MARK = re.compile(r"^\s*(\d+|[a-zA-Z])[.)]$")
_ABBREVIATIONS = frozenset("mr mrs ms dr prof vs e.g i.e approx".split())
_CLAUSE = re.compile(r"[,;:]\s")


@dataclass
class Sentence:
    text: str
    end: int  # offset just after the sentence in all the text fed so far


class SentenceSplitter:
    def __init__(self, max_chars: int = 160):
        self.max_chars = max_chars
        self.buffer = ""  # fed text not yet emitted or dropped
        self.base = 0  # offset of buffer[0] in all the text fed
        self.fence = ""  # the opening fence while inside a code block

    @property
    def fed(self) -> int:
        return self.base + len(self.buffer)

    def feed(self, piece: str) -> list[Sentence]:
        self.buffer += piece
        return self._split(final=False)

    def flush(self) -> list[Sentence]:
        """The end of the reply: whatever is left is the last sentence."""
        return self._split(final=True)

    def _take(self, n: int) -> str:
        text, self.buffer, self.base = self.buffer[:n], self.buffer[n:], self.base + n
        return text

    def _split(self, final: bool) -> list[Sentence]:
        out: list[Sentence] = []

        def emit(n: int) -> None:
            text = self._take(n).strip()
            if any(ch.isalnum() for ch in text):
                out.append(Sentence(text, self.base))

        while self.buffer:
            if self.fence:  # inside a code block: wait for its closing fence line
                close = re.search(rf"(?:^|\n)[ \t]*{re.escape(self.fence[0])}{{{len(self.fence)},}}[ \t]*(\n|$)", self.buffer)
                if close and (close.group(1) or final):
                    self._take(close.end())
                    self.fence = ""
                    continue
                if final:
                    self._take(len(self.buffer))
                else:  # keep only the last, unfinished line (it may become the closing fence)
                    self._take(self.buffer.rfind("\n") + 1)
                break
            fence = _FENCE.search(self.buffer)
            limit = fence.start() if fence else len(self.buffer)
            cut = self._boundary(self.buffer[:limit])
            if cut is not None:
                emit(cut)
                continue
            if fence:  # the prose before the fence is done (the loop above emitted it)
                emit(fence.start())
                self.fence = fence.group(1)
                self._take(fence.end() - fence.start())
                continue
            if final and not _MAYBE_FENCE.search(self.buffer):
                emit(len(self.buffer))
            elif final:
                self._take(len(self.buffer))
            break
        return out

    def _boundary(self, text: str) -> int | None:
        """Where the first sentence of `text` ends (None: not yet known)."""
        for m in _END.finditer(text):
            candidate = text[: m.end()]
            if m.group() != "\n" and _not_an_end(candidate):
                continue
            if not any(ch.isalnum() for ch in candidate):
                continue  # nothing to say before this boundary: look further
            return m.end()
        if len(text) > self.max_chars:
            window = text[: self.max_chars]
            clauses = list(_CLAUSE.finditer(window))
            if clauses and clauses[-1].end() > self.max_chars // 3:
                return clauses[-1].end()
            space = window.rfind(" ")
            return space if space > 0 else self.max_chars
        return None


def _not_an_end(candidate: str) -> bool:
    """A full stop that does not end a sentence: a list marker, an abbreviation."""
    line = candidate[candidate.rfind("\n") + 1 :]
    if _LIST_MARK.match(line):
        return True
    word = line.rstrip(".").split()[-1].lower() if line.rstrip(".").split() else ""
    return candidate.endswith(".") and word.strip("(\"'") in _ABBREVIATIONS
