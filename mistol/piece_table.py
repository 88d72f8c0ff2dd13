"""A vocabulary's pieces (strings, or bytes) held as one string and an array of offsets.

A list of 151,936 Python strings (Qwen 2.5's vocabulary) takes ~13 MB, mostly the ~50-byte
header of each object; one string of all of them and their offsets take ~2 MB. A piece is
sliced out when asked for (one small allocation), which the decoder and the GGUF writer do
a token at a time.
"""

from __future__ import annotations

from array import array
from typing import AnyStr, Iterable, Iterator, Sequence, overload


class PieceTable(Sequence[AnyStr]):
    """An immutable sequence of strings (or of bytes), stored compactly."""

    def __init__(self, pieces: Iterable[AnyStr], empty: AnyStr = ""):  # type: ignore[assignment]
        pieces = list(pieces)
        self._text = empty.join(pieces)
        self._starts = array("I" if len(self._text) < 2**32 else "Q", [0])
        end = 0
        for piece in pieces:
            end += len(piece)
            self._starts.append(end)

    def __len__(self) -> int:
        return len(self._starts) - 1

    @overload
    def __getitem__(self, index: int) -> AnyStr: ...
    @overload
    def __getitem__(self, index: slice) -> list[AnyStr]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("piece index out of range")
        return self._text[self._starts[index] : self._starts[index + 1]]

    def __iter__(self) -> Iterator[AnyStr]:
        text, starts = self._text, self._starts
        return (text[starts[i] : starts[i + 1]] for i in range(len(starts) - 1))

    def __eq__(self, other) -> bool:
        if isinstance(other, PieceTable):
            return self._text == other._text and self._starts == other._starts
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PieceTable({len(self)} pieces)"
