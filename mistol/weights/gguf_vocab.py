"""The tokenizer in GGUF metadata, both ways: building a `Tokenizer` from it, writing one into it.

A llama-architecture GGUF carries its SentencePiece vocabulary as three parallel arrays,
`tokenizer.ggml.tokens` / `scores` / `token_type` (SentencePiece's piece types), plus the
ids of BOS/EOS/UNK, `add_bos_token` and the chat template. A byte-level BPE vocabulary
(`tokenizer.ggml.model = gpt2`: Llama 3, Qwen 2.5...) has `merges` and a pre-tokenizer name
instead of scores; it becomes a `BPETokenizer`. Tokens that Hugging Face adds on
top of the SentencePiece model (OpenHermes' `<|im_end|>`=32000, `<|im_start|>`=32001) are
in the same arrays, typed CONTROL when special and USER_DEFINED otherwise; we turn those
back into added tokens, so that trusted text (a chat template) can name them.

llama.cpp's SentencePiece tokenizer gives each run of text after a special token the "▁"
prefix, as Hugging Face's `legacy=True` does; a tokenizer with `legacy=False` written here
tokenizes the legacy way once read back (by us or by llama.cpp).
"""

from __future__ import annotations

from ..bpe_tokenizer import PRE_TOKENIZERS, BPETokenizer
from ..errors import MistolError
from ..tokenizer import BYTE, CONTROL, NORMAL, SPACE, UNKNOWN, UNUSED, USER_DEFINED, AddedToken, Tokenizer
from .gguf_file import GGUFFile

_ADDED_SCORE = -1000.0  # what convert_hf_to_gguf.py gives added tokens
_PAD_SCORE = -10000.0  # and the "[PADn]" filler of ids the tokenizer has no piece for


def tokenizer_from_gguf(gf: GGUFFile) -> Tokenizer | BPETokenizer | None:
    """The file's tokenizer, or None when it carries none."""
    kind = gf.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind == "gpt2":
        return _bpe_from_gguf(gf)
    if kind != "llama":
        raise MistolError(
            f"{gf.path}: tokenizer {kind!r} is not supported; mistol reads SentencePiece ('llama': Mistral, "
            "Llama 2) and byte-level BPE ('gpt2': Llama 3, Qwen 2.5, SmolLM2) vocabularies"
        )
    if gf.get("tokenizer.ggml.add_space_prefix", True) is False:
        raise MistolError(f"{gf.path}: tokenizers without the SentencePiece space prefix are not supported")
    tokens = _array_of(gf, "tokenizer.ggml.tokens", str, needed=True)
    n = len(tokens)
    types = _array_of(gf, "tokenizer.ggml.token_type", int) or [NORMAL] * n
    scores = _array_of(gf, "tokenizer.ggml.scores", (int, float))
    if len(types) != n or (scores is not None and len(scores) != n):
        raise MistolError(f"{gf.path}: the tokenizer's tokens, scores and token types differ in length")
    added = [AddedToken(tokens[i], i, special=_special(tokens[i], t)) for i, t in enumerate(types)
             if t in (CONTROL, USER_DEFINED)]

    def token(key: str) -> str | None:
        i = gf.get(key)
        if i is None:
            return None
        if not 0 <= i < n:
            raise MistolError(f"{gf.path}: {key} {i} is outside the vocabulary of {n} tokens")
        return tokens[i]

    pad = token("tokenizer.ggml.padding_token_id")
    return Tokenizer(
        tokens,
        types,
        added,
        scores=scores,
        legacy=True,
        add_bos=bool(gf.get("tokenizer.ggml.add_bos_token", True)),
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        special_tokens=[pad] if pad is not None else [],
        chat_template=gf.get("tokenizer.chat_template"),
        source=str(gf.path),
    )


def _bpe_from_gguf(gf: GGUFFile) -> BPETokenizer:
    """A `gpt2` vocabulary: byte-level tokens, merges, and the pre-tokenizer named by `pre`."""
    tokens = _array_of(gf, "tokenizer.ggml.tokens", str, needed=True)
    merges = _array_of(gf, "tokenizer.ggml.merges", str)
    if merges is None:
        raise MistolError(f"{gf.path}: a 'gpt2' tokenizer without tokenizer.ggml.merges")
    add_bos = gf.get("tokenizer.ggml.add_bos_token")
    return BPETokenizer.from_vocab(
        tokens,
        merges,
        _array_of(gf, "tokenizer.ggml.token_type", int),
        gf.get("tokenizer.ggml.pre"),
        bos_id=gf.get("tokenizer.ggml.bos_token_id"),
        eos_id=gf.get("tokenizer.ggml.eos_token_id"),
        eot_id=gf.get("tokenizer.ggml.eot_token_id"),
        pad_id=gf.get("tokenizer.ggml.padding_token_id"),
        add_bos=None if add_bos is None else bool(add_bos),
        chat_template=gf.get("tokenizer.chat_template"),
        source=str(gf.path),
    )


def _array_of(gf: GGUFFile, key: str, kind: type | tuple[type, ...], needed: bool = False) -> list | None:
    """A metadata array whose elements are all of `kind` (token types: 32-bit ints), or None
    when absent; a hostile or broken file gets a one-line error here, not a traceback later."""
    value = gf.need(key) if needed else gf.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise MistolError(f"{gf.path}: metadata {key!r} is not an array of {names}")
    if kind is int and value and not -(2**31) <= min(value) <= max(value) < 2**31:
        raise MistolError(f"{gf.path}: metadata {key!r} holds values outside 32 bits")
    return value


def _special(token: str, kind: int) -> bool:
    # Older converters typed every added token USER_DEFINED, ChatML's included; llama.cpp's
    # converter takes "<|...|>" for a control token, and so do we.
    return kind == CONTROL or (token.startswith("<|") and token.endswith("|>"))


def add_vocabulary(writer, tokenizer: Tokenizer | BPETokenizer, vocab_size: int) -> None:
    """Write `tokenizer` into a `gguf.GGUFWriter` as convert_hf_to_gguf.py does for a
    SentencePiece model: `vocab_size` (the model's) entries, added tokens in place."""
    if isinstance(tokenizer, BPETokenizer):
        _add_bpe_vocabulary(writer, tokenizer, vocab_size)
        return
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [_PAD_SCORE] * vocab_size
    types = [UNUSED] * vocab_size
    for i, piece in enumerate(tokenizer.pieces[:vocab_size]):
        tokens[i] = piece
        scores[i] = float(tokenizer.scores[i]) if tokenizer.scores is not None else 0.0
        kind = tokenizer.piece_types[i]
        types[i] = kind if kind in (UNKNOWN, CONTROL, UNUSED, BYTE) else NORMAL
    for t in tokenizer.added_tokens:
        if t.id >= vocab_size:
            continue  # the model has no embedding for it
        # llama.cpp matches user-defined tokens against text with spaces, not "▁"
        tokens[t.id] = t.content if t.special else t.content.replace(SPACE, " ")
        scores[t.id] = _ADDED_SCORE
        types[t.id] = CONTROL if t.special else USER_DEFINED

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.unk_id is not None:
        writer.add_unk_token_id(tokenizer.unk_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _add_bpe_vocabulary(writer, tokenizer: BPETokenizer, vocab_size: int) -> None:
    """A `gpt2` vocabulary as convert_hf_to_gguf.py writes one: byte-level tokens (added tokens
    as their text), merges, token types, and the pre-tokenizer's name."""
    if tokenizer.pre is None:
        raise MistolError(
            f"{tokenizer.source}: its pre-tokenizer is none that llama.cpp names "
            f"({', '.join(PRE_TOKENIZERS)}), so it cannot be written into a GGUF file"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for i, (token, kind) in enumerate(zip(tokenizer.tokens[:vocab_size], tokenizer.token_types)):
        if token:  # "" where the tokenizer has no token for the id
            tokens[i], types[i] = token, kind
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(tokenizer.merges)
    for key, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("eot", tokenizer.eot_id),
                   ("pad", tokenizer.pad_id)):
        if i is not None and i < vocab_size:
            getattr(writer, f"add_{key}_token_id")(i)
    writer.add_add_bos_token(tokenizer.add_bos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
