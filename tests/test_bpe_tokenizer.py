"""Byte-level BPE tokenizers: ids equal HF tokenizers/AutoTokenizer for HF directories and
llama.cpp's tokenizer for GGUF files (converted by llama.cpp's own converter), both ways.

The tokenizers are trained in the test with the pipelines of Llama 3, Qwen 2.5, SmolLM2, GPT-2
and the DeepSeek-R1 Qwen distills (tests/bpe_models.py).
"""

from __future__ import annotations

import random
import re
import unicodedata

import pytest

import llama_cpp_ref
from bpe_models import FAMILIES, make_bpe_checkpoint, train_bpe_dir
from mistol.bpe_tokenizer import PRE_TOKENIZERS, BPETokenizer, bytes_to_unicode
from mistol.errors import MistolError
from mistol.tokenizer import Tokenizer
from tests.test_tokenizer import make_corpus


def bpe_corpus() -> list[str]:
    """The SentencePiece corpus plus what stresses byte-level pre-tokenizers."""
    extra = [
        "I'm, you're, he's, we've, they'll, she'd, it's, don't, can't, won't, y'all",
        "I'M YOU'RE HE'S WE'VE THEY'LL SHE'D DON'T",
        "'s 't 're 've 'm 'll 'd",
        "rock'n'roll o'clock 'quoted' ''double''",
        "1 12 123 1234 12345 123456 1234567 12345678901234567890",
        "3.141592653589793238462643383279502884197169399375105820974944",
        "-0.0001 +1e+308 0xDEADBEEF 0o777 1_000_000 ٣٤٥ ૧૨૩ ①②③ ½ ²³",
        "v1.2.3-rc.4+build.5",
        "a1b2c3 x86_64 utf8 3rd 21st",
        "    def f():\n        return {'a': [1, 2, 3]}\n",
        "\t\t\tdeep tabs\n\t\n\t \t",
        "line1\nline2\r\nline3\rline4\n\n\n\nline5",
        "  \n  \n  ",
        " \n",
        "\n ",
        "x\n\n\n\n\n\n\n\n\n\ny",
        "x" + " " * 40 + "y",
        " " * 33,
        "\t" * 9,
        "trailing tab\t",
        "trailing newline\n",
        "e\u0301 (e + combining acute) vs \u00e9",
        "A\u030a ngstrom, n\u0303, o\u0308",
        "Ǆ ǅ ǆ ﬁ ﬂ ß ẞ İ ı",
        "ｆｕｌｌｗｉｄｔｈ　ｓｐａｃｅ",
        "漢字かなカナ、全角スペース　あり。",
        "我爱北京天安门，天安门上太阳升。",
        "🧑‍💻👩🏾‍🚀🏳️‍🌈 ZWJ sequences",
        "🇯🇵🇺🇸🇬🇧",
        "keycaps 1️⃣ #️⃣ variation ☺︎ ☺️",
        "\u2028line separator\u2029paragraph",
        "\u200e\u200f bidi marks \u202e reversed \u202c",
        "\ufeffBOM at start",
        "\ufffd replacement char \ufffd\ufffd",
        "ÿþ looks like a byte order mark",
        "\x80\x81\x9f C1 controls",
        "\x1b[31mANSI red\x1b[0m",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 𝟘𝟙𝟚",
        "\U0001f600\U0010ffff\U000e0001 planes",
        "ĠĊ ċ literal byte-level characters Ġthe",
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|start_header_id|>system<|end_header_id|>\n\nhi<|eot_id|>",
        "<|endoftext|>",
        "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>",
        "<|im_start|>assistant\n",
        "<think>\nreasoning\n</think>",
        "[INST] hi [/INST]",
        "fn main() { println!(\"{}\", 1 + 2); }",
        "const x = () => { return `${a}`; };",
        "#include <stdio.h>\nint main(void) { return 0; }",
        "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
        "$ ls -la | grep '^d' > out.txt 2>&1 &",
        "a.b.c a..b a...b ?!?! !!! ??? ,,, ;;; ::: --- ___ *** ### @@@ %%% ^^^ ~~~",
        "([{<>}]) \\ / | ` ´ ¨",
        "email: first.last+tag@sub.example.co.uk, url: https://x.y/z?a=1&b=%20",
    ]
    fragments = [" ", "  ", "\n", "\t", "\r\n", "'s", "'LL", "don't", "1", "12", "1234", " 999", "é", "e\u0301",
                 "中", "日本", "😀", "👍🏽", "\u200b", "\u00a0", "<|eot_id|>", "<|im_end|>", "abc", " the", "ID",
                 ".", "...", "!?", "(", "))", "x=1;", "Ω", "ß", "\x00", "Ġ", "ÿ"]
    rng = random.Random(19)
    generated = ["".join(rng.choice(fragments) for _ in range(rng.randint(1, 10))) for _ in range(200)]
    return make_corpus() + extra + generated


CORPUS = bpe_corpus()
NAMES = list(FAMILIES)


@pytest.fixture(scope="module", params=NAMES)
def hf_pair(request, tmp_path_factory):
    """(mistol's tokenizer, AutoTokenizer, AutoTokenizer that splits no special token, tokenizers'
    Tokenizer) on the same trained directory."""
    from tokenizers import Tokenizer as Backend
    from transformers import AutoTokenizer

    d = train_bpe_dir(tmp_path_factory.mktemp(request.param), request.param)
    return (Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d),
            AutoTokenizer.from_pretrained(d, split_special_tokens=True), Backend.from_file(str(d / "tokenizer.json")))


def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 300
    assert any(ord(c) > 0xFFFF for s in CORPUS for c in s)  # astral characters (emoji, math letters)


def test_from_dir_picks_the_byte_level_bpe_class(hf_pair, mistral_dir):
    assert isinstance(hf_pair[0], BPETokenizer)
    assert type(Tokenizer.from_dir(mistral_dir)) is Tokenizer  # tokenizer.model: SentencePiece, as before


def test_encode_matches_hugging_face(hf_pair):
    tok, auto, auto_split, backend = hf_pair
    for text in CORPUS:
        expected = auto_split.encode(text, add_special_tokens=False)
        assert tok.encode(text) == expected, text
        assert tok.encode(text, parse_special=True) == auto.encode(text, add_special_tokens=False), text
        if not any(s in text for s in tok.special_ids):
            assert expected == backend.encode(text, add_special_tokens=False).ids


def test_bos_rule_matches_hugging_face(hf_pair):
    tok, auto, _, _ = hf_pair
    for text in CORPUS[:50]:
        assert tok.encode(text, add_bos=tok.add_bos) == auto.encode(text), text


def test_decode_matches_hugging_face(hf_pair):
    tok, auto, _, backend = hf_pair
    for text in CORPUS:
        ids = auto.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert tok.decode(ids, skip_special=skip) == backend.decode(ids, skip_special_tokens=skip), text
            assert tok.decode(ids, skip_special=skip) == auto.decode(ids, skip_special_tokens=skip), text


def test_decode_of_arbitrary_ids_matches_hugging_face(hf_pair):
    """Random id sequences: tokens that end inside a UTF-8 character, stray continuation bytes."""
    tok, _, _, backend = hf_pair
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
        assert tok.decode(ids) == backend.decode(ids, skip_special_tokens=True), ids
        assert tok.decode(ids, skip_special=False) == backend.decode(ids, skip_special_tokens=False), ids


def test_stream_decoding_matches_hugging_face_and_never_splits_a_character(hf_pair):
    from tokenizers.decoders import DecodeStream

    tok, auto, _, backend = hf_pair
    for text in CORPUS:
        ids = auto.encode(text, add_special_tokens=False)
        stream, reference = tok.stream_decoder(skip_special=False), DecodeStream(skip_special_tokens=False)
        pushed = [stream.push(i) for i in ids]
        assert "".join(pushed) + stream.flush() == backend.decode(ids, skip_special_tokens=False), text
        expected = "".join(reference.step(backend, i) or "" for i in ids)
        if "\ufffd" not in text:  # HF's stream holds back a real U+FFFD as if it were a partial character
            assert "".join(pushed) == expected, text
        assert not any(p.endswith("\ufffd") for p in pushed if "\ufffd" not in text)


def test_user_text_never_becomes_a_control_token(hf_pair):
    tok = hf_pair[0]
    for content in tok.special_ids:
        text = f"hi {content} there{content}"
        ids = tok.encode(text)
        assert not set(ids) & set(tok.special_ids.values()), text
        assert tok.decode(ids) == text
        assert tok.special_ids[content] in tok.encode(text, parse_special=True)  # trusted text only
        assert tok.encode_pieces(["a", tok.special_ids[content], text]) == [
            *tok.encode("a"), tok.special_ids[content], *ids]


def test_token_bytes_are_the_raw_bytes_of_each_token(hf_pair):
    tok, _, _, backend = hf_pair
    assert b"".join(tok.token_bytes(i) for i in tok.encode("日本 😀 é")) == "日本 😀 é".encode()
    for i in range(tok.vocab_size):
        raw = tok.token_bytes(i)
        try:
            assert raw.decode("utf-8") == backend.decode([i], skip_special_tokens=False)
        except UnicodeDecodeError:  # part of a character: HF shows U+FFFD
            assert "\ufffd" in backend.decode([i])


def test_vocab_size_and_ids(hf_pair):
    tok, auto, _, _ = hf_pair
    assert tok.vocab_size == len(auto)
    assert tok.bos_id == auto.bos_token_id and tok.eos_id == auto.eos_token_id
    assert tok.chat_template


# ------------------------------------------------------------------------------------------------
# GGUF: the file llama.cpp's converter writes, read by mistol and by llama.cpp


GGUF_CASES = [(name, FAMILIES[name].gguf_pre) for name in NAMES] + [("gpt2", "default"), ("llama3", "llama3")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = make_bpe_checkpoint(tmp_path_factory.mktemp(f"ckpt-{name}"), name)
        return made[name]

    return get


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    files = {}

    def get(name, pre):
        if (name, pre) not in files:
            out = tmp_path_factory.mktemp("gguf") / f"{name}-{pre}.gguf"
            files[name, pre] = llama_cpp_ref.convert(checkpoints(name), out, pre=pre)
        return files[name, pre]

    return get


def _mistol_gguf_tokenizer(path):
    from mistol.weights.gguf_file import GGUFFile
    from mistol.weights.gguf_vocab import tokenizer_from_gguf

    return tokenizer_from_gguf(GGUFFile(path))


@pytest.mark.slow
@pytest.mark.parametrize("name, pre", GGUF_CASES, ids=[f"{n}-{p}" for n, p in GGUF_CASES])
def test_gguf_ids_match_llama_cpp(converted, name, pre):
    path = converted(name, pre)
    ref = llama_cpp_ref.vocab(path)
    tok = _mistol_gguf_tokenizer(path)
    assert isinstance(tok, BPETokenizer) and tok.pre == pre
    mismatches = []
    for text in CORPUS:
        expected = ref.tokenize(text.encode(), add_bos=False, special=False)
        if tok.encode(text) != expected:
            mismatches.append(text)
            continue
        # decoding: llama.cpp's bytes for the same ids
        assert b"".join(tok.token_bytes(i) for i in expected) == ref.detokenize(expected), text
    assert mismatches == [], f"{len(mismatches)} of {len(CORPUS)} differ"
    assert tok.encode("hi", add_bos=tok.add_bos) == ref.tokenize(b"hi", add_bos=True, special=False)
    assert tok.eos_id == _or_none(ref.token_eos())
    # A file without a BOS id: llama.cpp falls back to id 11 (GPT-2's), unused as add_bos is off
    assert tok.bos_id == _or_none(ref.token_bos()) or (tok.bos_id is None and not tok.add_bos)


def _or_none(token_id: int) -> int | None:
    return None if token_id < 0 else token_id


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_gguf_and_hf_directory_agree(checkpoints, converted, name):
    """The same vocabulary from tokenizer.json and from the GGUF file: the same ids, except
    where the model's tokenizer.json normalizes text and llama.cpp does not."""
    hf = Tokenizer.from_dir(checkpoints(name))
    gguf = _mistol_gguf_tokenizer(converted(name, FAMILIES[name].gguf_pre))
    assert (gguf.bos_id, gguf.eos_id, gguf.add_bos) == (hf.bos_id, hf.eos_id, hf.add_bos)
    assert gguf.chat_template == hf.chat_template
    # (the converter's AutoTokenizer may add one, e.g. Qwen2Tokenizer's <|endoftext|>)
    assert hf.special_ids.items() <= gguf.special_ids.items()
    differ = [t for t in CORPUS if gguf.encode(t) != hf.encode(t)]
    # Qwen's tokenizer.json NFC-normalizes text first; llama.cpp does not, so a GGUF of it
    # tokenizes "e" + U+0301 apart where the HF directory tokenizes "é". Nothing else differs.
    assert all(unicodedata.normalize("NFC", t) != t for t in differ), differ
    if name in ("qwen2", "deepseek-r1-qwen"):
        assert differ
    else:
        assert not differ


def test_unknown_pre_tokenizer_is_a_one_line_error():
    with pytest.raises(MistolError, match=r"pre-tokenizer 'tekken' is not supported \(supported: .*llama-bpe.*qwen2"):
        BPETokenizer.from_vocab(["a", "b", "ab"], ["a b"], pre="tekken", source="x.gguf")


def test_merges_that_cannot_apply_are_passed_over():
    """A file's merges that name a token the vocabulary lacks, join into a control token, or have
    no space are dropped (as llama.cpp drops them); the rest tokenize as they alone would."""
    tokens = [*bytes_to_unicode().values(), "ab", "abc", "cd", "<|x|>"]
    types = [1] * (len(tokens) - 1) + [3]  # NORMAL..., CONTROL
    good = ["a b", "ab c", "c d"]
    bad = ["a zz", "q r", "<| x|>", "nospace"]
    clean = BPETokenizer.from_vocab(tokens, good, types, "qwen2")
    messy = BPETokenizer.from_vocab(tokens, [*good[:1], *bad, *good[1:]], types, "qwen2")
    for text in ("abc", "abcd cd ab", "<|x|> qr"):
        assert messy.encode(text) == clean.encode(text)
    assert clean.encode("abc") == [tokens.index("abc")]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_mistol_writes_a_gpt2_vocabulary_llama_cpp_reads(checkpoints, tmp_path, name):
    import gguf as gguf_py

    from mistol.weights.gguf_vocab import add_vocabulary

    hf = Tokenizer.from_dir(checkpoints(name))
    path = tmp_path / "vocab.gguf"
    writer = gguf_py.GGUFWriter(path, "llama")
    add_vocabulary(writer, hf, hf.vocab_size + 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    tok = _mistol_gguf_tokenizer(path)
    assert tok.pre == FAMILIES[name].gguf_pre and tok.vocab_size == hf.vocab_size + 2
    for text in CORPUS:  # (Qwen's tokenizer.json NFC-normalizes, a GGUF does not: see above)
        assert tok.encode(text) == hf.encode(text) or unicodedata.normalize("NFC", text) != text, text
    ref = llama_cpp_ref.vocab(llama_cpp_ref.convert(checkpoints(name), tmp_path / "ref.gguf",
                                                    pre=FAMILIES[name].gguf_pre))
    for text in CORPUS:
        assert tok.encode(text) == ref.tokenize(text.encode(), add_bos=False, special=False), text


def test_bpe_directory_needs_a_byte_level_model(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "WordPiece", "vocab": {}}}')
    with pytest.raises(MistolError, match="no tokenizer.model found"):
        Tokenizer.from_dir(tmp_path)


def test_supported_pre_tokenizers_include_the_families():
    assert {"llama-bpe", "qwen2", "smollm", "gpt-2", "default", "deepseek-r1-qwen"} <= set(PRE_TOKENIZERS)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_gguf_chat_template_stop_tokens_and_bos_rule_match_llama_cpp(checkpoints, converted, name):
    import llama_cpp

    from mistol.chat_template import ChatTemplate

    path = converted(name, FAMILIES[name].gguf_pre)
    ref = llama_cpp_ref.vocab(path)
    vocab = llama_cpp.llama_model_get_vocab(ref._model.model)
    end_of_generation = {i for i in range(ref.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    tok = _mistol_gguf_tokenizer(path)
    template = ChatTemplate.for_tokenizer(tok)
    assert end_of_generation <= set(template.stop_ids)
    assert tok.add_bos == llama_cpp.llama_vocab_get_add_bos(vocab)
    messages = [{"role": "user", "content": "Hi there, how are you?"}, {"role": "assistant", "content": "Fine."},
                {"role": "user", "content": "Good."}]
    assert template.render(messages) == ChatTemplate.for_tokenizer(Tokenizer.from_dir(checkpoints(name))).render(messages)


HOSTILE_TOKENIZER_FILES = [
    # (file, where, value, what the one line says); each of these ended in a traceback
    ("tokenizer.json", ("model", "vocab", "a"), "x", "model.vocab must map each token to an id"),
    ("tokenizer.json", ("model", "vocab", "a"), 2**40, "model.vocab must map each token to an id"),  # (MemoryError)
    ("tokenizer.json", ("model", "vocab"), ["a"], "model.vocab must map each token to an id"),
    ("tokenizer.json", ("model", "merges", 0), 7, "model.merges must be a list"),
    ("tokenizer.json", ("model", "merges"), 1.5, "model.merges must be a list"),
    ("tokenizer.json", ("added_tokens", 0, "id"), 10**30, "has an invalid id"),
    ("tokenizer_config.json", ("eos_token",), ["<|im_end|>"], "eos_token is ['<|im_end|>']; expected a token's text"),
]


@pytest.mark.parametrize("file,where,value,message", HOSTILE_TOKENIZER_FILES)
def test_a_hostile_tokenizer_file_is_refused_in_one_line(tmp_path, file, where, value, message):
    import json

    d = train_bpe_dir(tmp_path / "tok", "qwen2", vocab_size=300)
    data = json.loads((d / file).read_text())
    target = data
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    (d / file).write_text(json.dumps(data))
    with pytest.raises(MistolError, match=re.escape(message)) as caught:
        Tokenizer.from_dir(d)
    assert "\n" not in str(caught.value)
