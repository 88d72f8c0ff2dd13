"""`StopFilter`: a reply's text as it forms, cut at the first stop string.

Text that could still be the start of a stop string is held back until the next piece
shows whether it is one, so that no part of a stop string ever reaches the reader.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopFilter:
    """Feed pieces of text with `push`; each call returns the text now safe to show. Once a
    stop string appears, `stopped` is True, the text before it has been returned and the
    rest is dropped. `flush` returns what is still held back (at the end of the reply)."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        pending = self._held + text
        cut = self._find_stop(pending)
        if cut is not None:
            self._held, self.stopped = "", True
            return pending[:cut]
        safe = len(pending) - self._longest_stop_prefix(pending)
        self._held = pending[safe:]
        return pending[:safe]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _find_stop(self, text: str) -> int | None:
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        return min(hits) if hits else None

    def _longest_stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
