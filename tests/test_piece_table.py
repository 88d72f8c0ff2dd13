"""The compact vocabularies: a `PieceTable` reads back what it was given, and a 50k-token
tokenizer of either kind holds a few MB of Python objects rather than tens."""

from __future__ import annotations

import gc
import random
import tracemalloc

import pytest

from mistol.bpe_tokenizer import BPETokenizer, bytes_to_unicode
from mistol.piece_table import PieceTable
from mistol.tokenizer import BYTE, CONTROL, NORMAL, SPACE, UNKNOWN, Tokenizer

PIECES = ["", "▁the", "a", "😀", "<0x0A>", "中文", "", "▁" * 5, "x" * 300]


def test_a_piece_table_reads_back_its_pieces():
    table = PieceTable(PIECES)
    assert len(table) == len(PIECES)
    assert list(table) == PIECES and [table[i] for i in range(len(PIECES))] == PIECES
    assert table[-1] == PIECES[-1] and table[2:5] == PIECES[2:5] and table[::-2] == PIECES[::-2]
    assert table == PIECES and table == PieceTable(PIECES) and table != PIECES[:-1]
    with pytest.raises(IndexError):
        table[len(PIECES)]
    raw = [p.encode() for p in PIECES]
    assert list(PieceTable(raw, b"")) == raw
    assert len(PieceTable([])) == 0 and list(PieceTable([])) == []


def built_and_held(build):
    """`build()`'s object and the Python memory still allocated once it returned (the inputs it
    made are freed)."""
    gc.collect()
    tracemalloc.start()
    try:
        built = build()
        gc.collect()
        return built, tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def sentencepiece_vocabulary(n: int) -> Tokenizer:
    rng = random.Random(0)
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), SPACE, *"abcdefghijklmnopqrstuvwxyz"]
    words = {SPACE + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(2 * n)}
    pieces += sorted(words)[: n - len(pieces)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * (n - 259)
    return Tokenizer(pieces, types, scores=[-float(i) for i in range(n)], bos_token="<s>", eos_token="</s>",
                     unk_token="<unk>")


def byte_level_vocabulary(n: int) -> BPETokenizer:
    rng = random.Random(0)
    tokens = list(bytes_to_unicode().values())
    seen, merges = set(tokens), []
    while len(tokens) < n - 1:
        a, b = rng.choice(tokens), rng.choice(tokens[:2000])
        if len(a) + len(b) <= 12 and a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    return BPETokenizer.from_vocab([*tokens, "<|im_end|>"], merges, [NORMAL] * (n - 1) + [CONTROL], "qwen2")


@pytest.mark.parametrize("build", [sentencepiece_vocabulary, byte_level_vocabulary])
def test_a_large_vocabulary_holds_little_memory(build):
    n = 50_000
    tokenizer, held = built_and_held(lambda: build(n))
    assert tokenizer.vocab_size == n
    text = "the quick brown fox 😀 jumps"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # Held as lists of Python strings (pieces, their decoded text or bytes, ids by piece...) and
    # tuples (the SentencePiece merge table) this was 14-15 MB; compactly 2.3-3.5 MB.
    assert held < 6 * 2**20
