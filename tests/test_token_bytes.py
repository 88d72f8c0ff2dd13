"""`Tokenizer.token_bytes`: the bytes each token adds to the text, as a constrained-decoding
library needs them. Checked against Hugging Face's tokenizer of the same files: the bytes of
the ids it encodes a text to spell that text (after SentencePiece's leading space)."""

from __future__ import annotations

import pytest

from mistol.tokenizer import Tokenizer
from tests.helpers import make_openhermes_tokenizer_dir

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world", "  two  spaces", "naïve café ☕ 日本語", "tab\tand\nnewline", "{\"a\": [1, 2.5e-3]}",
         "emoji 🤖🎉 and \u0301 a lone accent", "x" * 40]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    path = make_openhermes_tokenizer_dir(tmp_path_factory.mktemp("hermes"))
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


def test_the_bytes_of_hf_token_ids_spell_the_text(tokenizers):
    ours, hf = tokenizers
    for text in TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        assert b"".join(ours.token_bytes(i) for i in ids) == (" " + text).encode(), text


def test_byte_pieces_are_their_byte_and_control_tokens_are_marked(tokenizers):
    ours, hf = tokenizers
    for i in range(3, 3 + 256):  # SentencePiece's byte pieces <0x00>..<0xFF>
        assert hf.convert_ids_to_tokens(i) == f"<0x{i - 3:02X}>"
        assert ours.token_bytes(i) == bytes([i - 3])
    assert set(hf.all_special_ids) <= ours.control_ids
    assert ours.vocab_bytes() == [ours.token_bytes(i) for i in range(ours.vocab_size)]
    assert len(ours.vocab_bytes()) == len(hf)
