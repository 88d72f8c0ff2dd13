"""Byte-level BPE tokenizers (GPT-2's scheme: Llama 3, Qwen 2.5, SmolLM2, DeepSeek-R1 distills).

Text is cut into words by a pre-tokenizer (regexes that differ per model family), each word's
UTF-8 bytes are written as printable characters (GPT-2's byte-to-unicode table, " " -> "Ġ"),
and BPE merges them by rank. The BPE itself runs in Hugging Face's `tokenizers` library; we
only build its pipeline:

- from an HF directory's `tokenizer.json` (the pipeline as the model ships it), or
- from GGUF metadata (`tokenizer.ggml.model = gpt2`: tokens, merges, token types and a
  pre-tokenizer *name*, `tokenizer.ggml.pre`). The name selects the regexes llama.cpp applies
  for it, one after another, each splitting the pieces the previous one left (`PRE_TOKENIZERS`).

The pipeline we build holds no added tokens: `encode` sees every character of user text as
text, so "<|im_start|>" or "<|begin_of_text|>" typed by a user stays text. Control tokens
enter a prompt only as ids (`encode_pieces`) or from trusted text (`parse_special=True`).

Decoding works on bytes: each id has its raw bytes (`token_bytes`), the bytes of the ids are
joined and read as UTF-8, a malformed sequence becoming U+FFFD, as tokenizers' ByteLevel
decoder does. The stream decoder holds back a character split across tokens until it is
complete.
"""

from __future__ import annotations

import codecs
import json
import re
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .added_token import AddedToken
from .chat_template import END_OF_TURN
from .errors import MistolError
from .piece_table import PieceTable

# GGUF token types (llama.cpp's llama_token_type; the SentencePiece piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


@dataclass(frozen=True)
class PreTokenizer:
    """llama.cpp's pre-tokenizer for one `tokenizer.ggml.pre` name."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a token is taken whole (Llama 3)
    add_bos: bool = False  # when the file has no tokenizer.ggml.add_bos_token


_LLAMA3 = PreTokenizer(
    (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    ignore_merges=True,
    add_bos=True,
)
_QWEN2 = PreTokenizer(
    (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
)
_SMOLLM = PreTokenizer((r"\p{N}", _GPT2))
_GPT2_PRE = PreTokenizer((_GPT2,))
# llama.cpp's fallback for "default" (and for a file that names no pre-tokenizer)
_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))

# The regexes of llama.cpp's src/llama-vocab.cpp for these names.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "smollm": _SMOLLM,
    "starcoder": _SMOLLM,
    "gpt-2": _GPT2_PRE,
    "default": _DEFAULT,
}

# The pre-tokenizers of the models' own tokenizer.json, by the GGUF name llama.cpp gives them;
# used to name an HF tokenizer's pre-tokenizer when writing it into a GGUF file.
_HF_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_HF_QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte as a printable character (printable Latin-1 bytes as themselves,
    the others shifted to U+0100 and up), so that byte strings can be BPE'd as text."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


# Each byte character to the Latin-1 character of its byte (which encodes as that byte), and
# a search for any other character: whole tokens convert in C, not a character at a time.
_LATIN1_OF_CHAR = str.maketrans({c: chr(b) for b, c in bytes_to_unicode().items()})
_NOT_A_BYTE_CHAR = re.compile(f"[^{re.escape(''.join(bytes_to_unicode().values()))}]")


def token_text_bytes(token: str) -> bytes:
    """The raw bytes a token string stands for, as tokenizers' ByteLevel decoder reads it: byte
    characters mapped back, and a token with any other character (an added token such as
    "<think>\\n" written plainly) taken as its UTF-8."""
    if _NOT_A_BYTE_CHAR.search(token):
        return token.encode("utf-8")
    return token.translate(_LATIN1_OF_CHAR).encode("latin-1")


class BPETokenizer:
    """Encode text to ids and back with a byte-level BPE vocabulary. Build one with `from_dir`
    or `from_vocab` (the pieces of a GGUF file)."""

    def __init__(
        self,
        backend,
        tokens: Sequence[str | None],
        token_types: Sequence[int],
        merges: Sequence[str],
        added_tokens: Iterable,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        eot_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        pre: str | None = None,
        source: str = "tokenizer",
    ):
        self._backend = backend  # a tokenizers.Tokenizer without added tokens or post-processor
        # Byte-level token strings by id (GGUF form; "" where an id has no token) and the merges,
        # for writing the vocabulary out again, held compactly (`PieceTable`).
        self.tokens: PieceTable[str] = PieceTable(t if t is not None else "" for t in tokens)
        self.token_types: array[int] = array("i", token_types)
        self.merges: PieceTable[str] = PieceTable(merges)
        self.vocab_size: int = len(self.tokens)
        self.bos_id, self.eos_id, self.eot_id, self.pad_id = bos_id, eos_id, eot_id, pad_id
        self.unk_id: int | None = None
        self.add_bos: bool = bool(add_bos)
        self.chat_template: str | None = chat_template
        self.pre: str | None = pre
        self.source = source
        self.added_tokens: tuple = tuple(added_tokens)
        self.special_ids: dict[str, int] = {t.content: t.id for t in self.added_tokens}
        for t in self.added_tokens:
            if not 0 <= t.id < self.vocab_size:
                raise MistolError(f"{source}: added token {t.content!r} has id {t.id} outside the vocabulary")
        self._skip = frozenset(t.id for t in self.added_tokens if t.special)
        added_bytes = {t.id: token_text_bytes(t.content) for t in self.added_tokens}
        self._bytes: PieceTable[bytes] = PieceTable(
            (added_bytes[i] if i in added_bytes else token_text_bytes(t) for i, t in enumerate(self.tokens)), b"")

        # Added tokens are cut out of trusted text only; longest first (leftmost-longest, as tokenizers).
        alternatives, self._match_ids = [], []
        for t in sorted(self.added_tokens, key=lambda t: len(t.content), reverse=True):
            if not t.content:
                continue
            pattern = (r"\s*" if t.lstrip else "") + re.escape(t.content) + (r"\s*" if t.rstrip else "")
            alternatives.append(f"(?P<t{len(self._match_ids)}>{pattern})")
            self._match_ids.append(t.id)
        self._special_re = re.compile("|".join(alternatives)) if alternatives else None

    # ----------------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def from_dir(cls, path: str | Path) -> BPETokenizer:
        """An HF directory: tokenizer.json (a byte-level BPE model) plus tokenizer_config.json."""
        d = Path(path)
        source = d / "tokenizer.json"
        data = _read_json(source)
        model = data.get("model") or {}
        if not isinstance(model, dict) or model.get("type") != "BPE" or not _is_byte_level(data):
            raise MistolError(f"{source}: only byte-level BPE tokenizers are supported here")
        config = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}

        added: dict[int, AddedToken] = {}
        for entry in data.get("added_tokens") or []:
            token = _added(entry, entry.get("id") if isinstance(entry, dict) else None, source)
            added[token.id] = token
        for i, entry in (config.get("added_tokens_decoder") or {}).items():
            token = _added(entry, i, d / "tokenizer_config.json")
            added[token.id] = token

        vocab = model.get("vocab") or {}
        if not (isinstance(vocab, dict) and all(_token_id(i) for i in vocab.values())):
            raise MistolError(f"{source}: model.vocab must map each token to an id from 0 to 2^24")
        size = max([0, *(i + 1 for i in vocab.values()), *(i + 1 for i in added)])
        tokens: list[str | None] = [None] * size
        types = [UNUSED] * size
        for piece, i in vocab.items():
            tokens[i], types[i] = piece, NORMAL
        for t in added.values():
            tokens[t.id] = t.content
            types[t.id] = CONTROL if t.special else USER_DEFINED
        merges = model.get("merges") or []
        if not (isinstance(merges, list) and all(isinstance(m, str) or _pair_of_strings(m) for m in merges)):
            raise MistolError(f"{source}: model.merges must be a list of \"left right\" strings or [left, right] pairs")
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]

        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_str(json.dumps(dict(data, added_tokens=[], post_processor=None)))
            # The post-processor alone (on an empty model): does the model's pipeline put BOS first?
            framing = Backend.from_str(json.dumps(dict(data, model={"type": "BPE", "vocab": {}, "merges": []})))
        except Exception as e:
            raise MistolError(f"{source}: the tokenizers library cannot build it ({e})") from None

        ids_of = {t.content: t.id for t in added.values()} | dict(vocab)

        def named(key: str) -> int | None:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is None:
                return None
            if not isinstance(value, str):
                raise MistolError(f"{d / 'tokenizer_config.json'}: {key} is {value!r}; expected a token's text")
            if value not in ids_of:
                raise MistolError(f"{d / 'tokenizer_config.json'}: {key} {value!r} is not in the vocabulary")
            return ids_of[value]

        bos_id, eos_id = named("bos_token"), named("eos_token")
        # Whether the model's own pipeline puts BOS first: tokenizer.json's post-processor says so
        # (Llama 3's does, Qwen's does not). transformers 5 follows it too, whatever add_bos_token says.
        add_bos = bos_id is not None and framing.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        # Mark bos/eos/pad special even when the files do not.
        for i in (bos_id, eos_id, named("pad_token")):
            if i is not None and i in added and not added[i].special:
                added[i] = AddedToken(added[i].content, i, True, added[i].lstrip, added[i].rstrip)
                types[i] = CONTROL
        return cls(
            backend, tokens, types, merges, added.values(),
            bos_id=bos_id, eos_id=eos_id, pad_id=named("pad_token"), add_bos=bool(add_bos),
            chat_template=_chat_template(config), pre=_hf_pre_name(data.get("pre_tokenizer")), source=str(source),
        )

    @classmethod
    def from_vocab(
        cls,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int] | None = None,
        pre: str | None = None,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        eot_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool | None = None,
        chat_template: str | None = None,
        source: str = "tokenizer",
    ) -> BPETokenizer:
        """From the pieces a GGUF file holds: byte-level token strings, "left right" merges, token
        types, and the name of the pre-tokenizer (`PRE_TOKENIZERS`; None means llama.cpp's default)."""
        from tokenizers import Regex, decoders, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        name = "default" if pre is None else pre
        if name not in PRE_TOKENIZERS:
            raise MistolError(
                f"{source}: pre-tokenizer {name!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})"
            )
        spec = PRE_TOKENIZERS[name]
        n = len(tokens)
        types = list(token_types) if token_types is not None else [NORMAL] * n
        if len(types) != n:
            raise MistolError(f"{source}: the tokenizer's tokens and token types differ in length")
        # Only ordinary tokens are BPE targets: text never becomes a control or added token.
        vocab: dict[str, int] = {}
        for i, (token, kind) in enumerate(zip(tokens, types)):
            if kind in (NORMAL, BYTE):
                vocab.setdefault(token, i)
        try:
            model = _bpe_model(vocab, merges, spec.ignore_merges)
        except Exception as e:
            raise MistolError(f"{source}: cannot build the BPE model ({e})") from None
        backend = Backend(model)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
        added = [
            # llama.cpp takes the end-of-turn tokens for control tokens whatever their type
            AddedToken(tokens[i], i, special=kind == CONTROL or tokens[i] in END_OF_TURN)
            for i, kind in enumerate(types) if kind in (CONTROL, USER_DEFINED)
        ]
        for role, i in (("bos", bos_id), ("eos", eos_id), ("eot", eot_id), ("pad", pad_id)):
            if i is not None and not 0 <= i < n:
                raise MistolError(f"{source}: {role} token id {i} is outside the vocabulary of {n} tokens")
        return cls(
            backend, tokens, types, merges, added,
            bos_id=bos_id, eos_id=eos_id, eot_id=eot_id, pad_id=pad_id,
            add_bos=spec.add_bos if add_bos is None else add_bos,
            chat_template=chat_template, pre=name, source=source,
        )

    # ----------------------------------------------------------------------------------------------
    # Encoding

    def token_id(self, content: str) -> int | None:
        """The id of an added/special token such as "<|eot_id|>", or None."""
        return self.special_ids.get(content)

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids for `text`; with `add_bos`, BOS first. Added tokens are cut out of the text only
        with parse_special=True (text we wrote ourselves, never a user's)."""
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        if not parse_special or self._special_re is None:
            return ids + self._encode_text(text)
        pos = 0
        for match in self._special_re.finditer(text):
            ids += self._encode_text(text[pos : match.start()])
            ids.append(self._match_ids[int(match.lastgroup[1:])])
            pos = match.end()
        return ids + self._encode_text(text[pos:])

    def encode_pieces(self, pieces: Iterable[str | int], add_bos: bool = False) -> list[int]:
        """A prompt from token ids we place and text we never scan for special tokens: ints are
        emitted as they are, each run of strings is encoded as ordinary text."""
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        run: list[str] = []
        for piece in [*pieces, None]:
            if isinstance(piece, str):
                run.append(piece)
                continue
            ids += self._encode_text("".join(run))
            run = []
            if piece is not None:
                if not 0 <= piece < self.vocab_size:
                    raise ValueError(f"token id {piece} is outside the vocabulary ({self.vocab_size})")
                ids.append(int(piece))
        return ids

    def _encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        return self._backend.encode(text, add_special_tokens=False).ids

    # ----------------------------------------------------------------------------------------------
    # Decoding

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a token may hold part of a UTF-8 character)."""
        if not 0 <= token_id < self.vocab_size:
            return b""
        return self._bytes[token_id]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text for `ids`, as tokenizers' decode(ids, skip_special_tokens=skip_special) gives it."""
        return b"".join(self._kept_bytes(ids, skip_special)).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True) -> BPEStreamDecoder:
        """A decoder that turns ids into text one at a time, for streaming a reply."""
        return BPEStreamDecoder(self, skip_special)

    def _kept_bytes(self, ids: Iterable[int], skip_special: bool):
        for token_id in ids:
            token_id = int(token_id)
            if 0 <= token_id < self.vocab_size and not (skip_special and token_id in self._skip):
                yield self._bytes[token_id]

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pre={self.pre!r}, added={len(self.special_ids)})")


class BPEStreamDecoder:
    """Incremental decoding: `push(id)` returns the text the new token completes, `flush()` the
    rest; "".join(pushes) + flush() == decode(ids). A character whose bytes are split over
    tokens is held back until its last byte arrives; malformed bytes become U+FFFD."""

    def __init__(self, tokenizer: BPETokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(b"".join(self._tokenizer._kept_bytes([token_id], self._skip_special)))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# ------------------------------------------------------------------------------------------------


def _bpe_model(vocab: dict[str, int], merges: Sequence[str], ignore_merges: bool):
    """tokenizers' BPE model of `vocab` and the "left right" merges. A well-made file's merges go
    to it as they are, split in C (tokenizers checks them, in Rust); a file with a merge that
    cannot apply, or that starts with a space, gets `_usable_merge_pairs`."""
    from tokenizers import models

    joined = "\n".join(merges)
    if not (joined.startswith(" ") or "\n " in joined):
        try:
            pairs = [tuple(m.split(" ", 1)) for m in merges]
            return models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges)
        except Exception:
            pass
    return models.BPE(vocab=vocab, merges=_usable_merge_pairs(merges, vocab), ignore_merges=ignore_merges)


def _usable_merge_pairs(merges: Sequence[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The merges that can apply to `vocab`: both halves and their join are tokens of it (split
    as llama.cpp splits a merge: at the first space after position 0)."""
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)
        left, right = m[:cut], m[cut + 1 :]
        if cut > 0 and left in vocab and right in vocab and left + right in vocab:
            pairs.append((left, right))
    return pairs


def is_byte_level_bpe_dir(path: Path) -> bool:
    """Whether `path/tokenizer.json` holds a byte-level BPE model."""
    try:
        data = json.loads((Path(path) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and (data.get("model") or {}).get("type") == "BPE" and _is_byte_level(data)


def _is_byte_level(data: dict) -> bool:
    return "ByteLevel" in json.dumps(data.get("pre_tokenizer")) and "ByteLevel" in json.dumps(data.get("decoder"))


def _hf_pre_name(pre: dict | None) -> str | None:
    """The GGUF pre-tokenizer name of a tokenizer.json pre-tokenizer we recognise, else None."""
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return {_HF_LLAMA3_REGEX: "llama-bpe", _HF_QWEN2_REGEX: "qwen2"}.get(regex)
    return None


def _chat_template(config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise MistolError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MistolError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise MistolError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _token_id(value) -> bool:
    """A token id as a file may give one: a whole number from 0 up to (not including) 2^24, far
    past any vocabulary (a hostile 2^40 would size the token list by it)."""
    return type(value) is int and 0 <= value < 2**24


def _pair_of_strings(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _added(entry, token_id, source) -> AddedToken:
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
        raise MistolError(f"{source}: malformed added token {entry!r}")
    try:
        i = int(token_id)
    except (TypeError, ValueError, OverflowError):
        raise MistolError(f"{source}: token {entry['content']!r} has an invalid id {token_id!r}") from None
    if not _token_id(i) or isinstance(token_id, (bool, float)):
        raise MistolError(f"{source}: token {entry['content']!r} has an invalid id {token_id!r}")
    return AddedToken(entry["content"], i, bool(entry.get("special", False)),
                         bool(entry.get("lstrip", False)), bool(entry.get("rstrip", False)))
