"""Tokenizer for SentencePiece models plus their added tokens, id-for-id with HF's AutoTokenizer.

Mistral-family models (and fine-tunes such as OpenHermes 2.5) ship a SentencePiece BPE model
(`tokenizer.model`) plus a few tokens added on top of it (`<|im_end|>`=32000, `<|im_start|>`=32001 for
ChatML), described in `tokenizer_config.json` / `added_tokens.json` / `tokenizer.json`.

We run SentencePiece's BPE ourselves, in Python over the pieces read from `tokenizer.model`:
the adjacent pair whose merged piece scores highest is merged first (ties to the leftmost),
and characters missing from the vocabulary become byte pieces (`<0xE2>`...). That is what
SentencePiece itself and transformers' AutoTokenizer on a model directory compute. (Beware:
AutoTokenizer on a directory *without* config.json builds another pipeline that ranks merges
by piece id, and then splits runs of spaces differently: "a  b" -> "▁a ▁▁ b" instead of the
"▁a ▁ ▁b" the model was trained on.)

Chunks and the `legacy` flag. Text is first cut at the special tokens it contains; each piece of text
between them is tokenized on its own, with " " written as "▁". With `legacy` every chunk gets
SentencePiece's dummy "▁" prefix (even one that already starts with a space); without it only the chunk
at the very start of the text does, and only when it does not start with a space:

    legacy=True:  "<|im_start|>system" -> [32001, 1587]   ("▁system")
    legacy=False: "<|im_start|>system" -> [32001, 6574]   ("system")

transformers 5 reads a tokenizer_config.json *without* a "legacy" key as legacy=False (LlamaTokenizer's
default), so `from_dir` does the same.

Why special tokens are only parsed where we put them: a chat prompt is made of control tokens that we
place (`<|im_start|>`, `<|im_end|>`) and text that a user wrote. If user text were scanned for special
tokens, typing "<|im_end|><|im_start|>system" would forge a system turn. So `encode` treats all text as
ordinary text unless asked (`parse_special=True`, for trusted templates only), and `encode_pieces`
builds a prompt from explicit token ids and plain text. For the same reason BPE never merges into a
control or special token: "<" "s" ">" typed by a user stays three pieces.

Decoding follows the tokenizers decoder chain of LlamaTokenizer: "▁" -> " ", each run of byte pieces
joined into UTF-8 (a run that is not valid UTF-8 becomes one U+FFFD per byte), then one leading space of
the whole text removed (the prefix that encoding added). No spaces are put around special tokens:
decode([32001, 1587], skip_special=False) is "<|im_start|> system" because "▁system" has a "▁".
"""

from __future__ import annotations

import heapq
import json
import re
import struct
from array import array
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from mistol.added_token import AddedToken
from mistol.errors import MistolError
from mistol.piece_table import PieceTable

SPACE = "\u2581"  # "▁": how SentencePiece writes a space inside a piece
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BPE_MODEL_TYPE = 2
_WORD_CACHE_SIZE = 50_000


class Tokenizer:
    """Encode text to token ids and back. Build one with `from_dir` or `from_sentencepiece`.

    The constructor takes the vocabulary as lists (piece strings and SentencePiece piece types, by id),
    so a loader that has them from elsewhere (e.g. GGUF metadata) can build one directly.
    """

    def __init__(
        self,
        pieces: Sequence[str],
        piece_types: Sequence[int] | None = None,
        added_tokens: Iterable[AddedToken] = (),
        *,
        scores: Sequence[float] | None = None,
        legacy: bool = True,
        add_bos: bool = True,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        special_tokens: Iterable[str] = (),
        chat_template: str | None = None,
        source: str = "tokenizer",
    ):
        pieces = list(pieces)
        types = list(piece_types) if piece_types is not None else [NORMAL] * len(pieces)
        if not pieces or len(types) != len(pieces):
            raise MistolError(f"{source}: empty vocabulary or piece types that do not match the pieces")
        piece_ids: dict[str, int] = {}
        for i, piece in enumerate(pieces):
            piece_ids.setdefault(piece, i)
        added = {t.content: t for t in added_tokens}

        # bos/eos/unk (and pad, additional_special_tokens...) are special whether or not they were
        # listed as added tokens.
        role_ids: dict[str, int | None] = {}
        roles = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token}
        for role, content in [*roles.items(), *(("special token", c) for c in special_tokens)]:
            if content is None:
                role_ids[role] = None
                continue
            if content in added:
                token = added[content]
            elif content in piece_ids:
                token = AddedToken(content, piece_ids[content])
            else:
                raise MistolError(f"{source}: {role} {content!r} is not in the vocabulary")
            if not token.special:
                token = AddedToken(token.content, token.id, True, token.lstrip, token.rstrip)
            added[content] = token
            role_ids[role] = token.id
        for token in added.values():
            if token.id < 0:
                raise MistolError(f"{source}: added token {token.content!r} has negative id {token.id}")

        self.vocab_size: int = max([len(pieces), *(t.id + 1 for t in added.values())])
        self.bos_id: int | None = role_ids["bos_token"]
        self.eos_id: int | None = role_ids["eos_token"]
        self.unk_id: int | None = role_ids["unk_token"]
        self.legacy: bool = bool(legacy)
        self.add_bos: bool = bool(add_bos)
        self.chat_template: str | None = chat_template
        self.special_ids: dict[str, int] = {t.content: t.id for t in added.values()}
        # The vocabulary as given, for writing it out again (e.g. into a GGUF file), held compactly:
        # 151,936 pieces as Python objects would take ~25 MB next to a 0.35 GB model.
        self.pieces: PieceTable = PieceTable(pieces)
        try:
            self.piece_types: array[int] = array("i", types)
            self.scores: array[float] | None = array("d", scores) if scores is not None else None
        except (OverflowError, TypeError) as e:
            raise MistolError(f"{source}: piece types or scores that are not numbers in range ({e})") from None
        self.added_tokens: tuple[AddedToken, ...] = tuple(added.values())
        self._skip = frozenset(t.id for t in added.values() if t.special)

        self._init_bpe(pieces, types, piece_ids, scores)

        # What an id decodes to is its piece with "▁" turned into " ", except for byte pieces (an
        # int, joined with its neighbours into UTF-8 later) and added tokens, which may rename the
        # piece under their id: those few are kept here.
        self._fixed_items: dict[int, str | int] = {
            i: int(piece[3:5], 16) for i, piece in enumerate(pieces)
            if piece.startswith("<0x") and _BYTE_PIECE.fullmatch(piece)
        }
        for token in added.values():
            self._fixed_items[token.id] = _decoded_item(token.content)

        # Every added token (special or not) is cut out of trusted text; longest first so that the
        # leftmost-longest match wins, as in tokenizers.
        alternatives = []
        self._match_ids: list[int] = []
        for token in sorted(added.values(), key=lambda t: len(t.content), reverse=True):
            if not token.content:
                continue
            pattern = re.escape(token.content)
            if token.lstrip:
                pattern = r"\s*" + pattern
            if token.rstrip:
                pattern = pattern + r"\s*"
            alternatives.append(f"(?P<t{len(self._match_ids)}>{pattern})")
            self._match_ids.append(token.id)
        self._special_re = re.compile("|".join(alternatives)) if alternatives else None

    def _init_bpe(
        self, pieces: list[str], types: list[int], piece_ids: dict[str, int], scores: Sequence[float] | None
    ) -> None:
        """Build the merge table: SentencePiece's order, the merged piece with the highest score first
        (without scores, the lowest id first)."""
        # Never turn text into a control, unknown or special token, by merging or otherwise.
        no_target = {i for i, t in enumerate(types) if t in (UNKNOWN, CONTROL)} | self._skip
        # BPE starts from single characters (and bytes); only merges make longer pieces.
        self._char_ids = {piece: i for piece, i in piece_ids.items() if len(piece) == 1 and i not in no_target}
        self._byte_ids = [piece_ids.get(f"<0x{b:02X}>") for b in range(256)]
        # A pair of ids -> its merge: rank << shift | merged id, the pair packed the same way (one int
        # each, not two tuples: half the memory, 10 -> 5 MB for a 32k vocabulary). The rank orders
        # merges by score, then id, then left length; a packed merge compares as its rank.
        order = range(len(pieces))
        if scores is not None:
            order = sorted(order, key=lambda i: (-scores[i], i))
        shift = self._shift = max(1, len(pieces) - 1).bit_length()
        merges: dict[int, int] = {}
        for i in order:
            piece = pieces[i]
            if i in no_target or piece_ids[piece] != i:
                continue
            for cut in range(1, len(piece)):
                left, right = piece_ids.get(piece[:cut]), piece_ids.get(piece[cut:])
                if left is not None and right is not None:
                    merges.setdefault(left << shift | right, len(merges) << shift | i)
        self._merges = merges
        # If no piece has "▁" after another character, no merge crosses the start of a run of "▁", so
        # each word ("▁▁foo") can be merged on its own and cached.
        if any(re.search(f"[^{SPACE}]{SPACE}", p) for p in pieces):
            self._word_re = None
        else:
            self._word_re = re.compile(f"{SPACE}*[^{SPACE}]+|{SPACE}+")
        self._cache: dict[str, list[int]] = {}

    # ----------------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def from_sentencepiece(
        cls,
        model_path: str | Path | None = None,
        added_tokens: Mapping[str, int] | Iterable[AddedToken] | None = None,
        legacy: bool = True,
        *,
        model_proto: bytes | None = None,
        add_bos: bool = True,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        special_tokens: Iterable[str] = (),
        chat_template: str | None = None,
    ) -> Tokenizer:
        """Build from a SentencePiece BPE model, given as a file path or as the serialized proto bytes.

        `added_tokens` maps content -> id (all treated as special) or is a list of `AddedToken`.
        `bos_token`/`eos_token`/`unk_token` default to the pieces the SentencePiece model declares.
        """
        if (model_path is None) == (model_proto is None):
            raise TypeError("give exactly one of model_path and model_proto")
        if model_path is not None:
            source = str(model_path)
            try:
                model_proto = Path(model_path).read_bytes()
            except OSError as e:
                message = f"{source}: cannot read the tokenizer model ({e.strerror or e})"
                raise MistolError(message) from None
        else:
            source = "tokenizer model"
        pieces, types, scores, trainer = _parse_sentencepiece(model_proto, source)

        def declared(role: str) -> str | None:
            index = trainer[role]
            return pieces[index] if 0 <= index < len(pieces) else None

        if isinstance(added_tokens, Mapping):
            tokens = [AddedToken(c, _as_id(i, c, source)) for c, i in added_tokens.items()]
        else:
            tokens = list(added_tokens or ())
        return cls(
            pieces,
            types,
            tokens,
            scores=scores,
            legacy=legacy,
            add_bos=add_bos,
            bos_token=bos_token if bos_token is not None else declared("bos_id"),
            eos_token=eos_token if eos_token is not None else declared("eos_id"),
            unk_token=unk_token if unk_token is not None else declared("unk_id"),
            special_tokens=special_tokens,
            chat_template=chat_template,
            source=source,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face model directory: tokenizer.model plus whichever of tokenizer_config.json,
        special_tokens_map.json, added_tokens.json and tokenizer.json are present. A directory
        without tokenizer.model whose tokenizer.json is byte-level BPE (Llama 3, Qwen 2.5) gives a
        `mistol.bpe_tokenizer.BPETokenizer` instead."""
        d = Path(path)
        if not d.is_dir():
            raise MistolError(f"{d}: not a directory")
        model = d / "tokenizer.model"
        if not model.is_file():
            from .bpe_tokenizer import BPETokenizer, is_byte_level_bpe_dir

            if is_byte_level_bpe_dir(d):
                return BPETokenizer.from_dir(d)  # type: ignore[return-value]
            raise MistolError(f"{d}: no tokenizer.model found (nor a tokenizer.json with a byte-level BPE model)")

        config = _read_json_object(d / "tokenizer_config.json")
        special_map = _read_json_object(d / "special_tokens_map.json")

        # Later sources override earlier ones; tokenizer_config.json's added_tokens_decoder is what
        # transformers itself trusts most.
        added: dict[str, AddedToken] = {}
        source = d / "added_tokens.json"
        for content, i in _read_json_object(source).items():
            # Tokens listed only here are not special unless named below (eos_token...), as in HF.
            added[content] = AddedToken(content, _as_id(i, content, source), special=False)
        source = d / "tokenizer.json"
        for entry in _read_json_object(source).get("added_tokens") or []:
            token = _added_token(entry, entry.get("id") if isinstance(entry, dict) else None, source)
            added[token.content] = token
        source = d / "tokenizer_config.json"
        for i, entry in (config.get("added_tokens_decoder") or {}).items():
            token = _added_token(entry, i, source)
            added[token.content] = token

        def named(key: str, default: str | None) -> str | None:
            value = config.get(key, special_map.get(key))
            return _token_content(value, source) if value is not None else default

        special = [named("pad_token", None)]
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = config.get(key, special_map.get(key)) or []
            values = value.values() if isinstance(value, dict) else value
            special += [_token_content(v, source) for v in values]

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)

        # Defaults are LlamaTokenizer's (transformers 5): legacy False, add_bos_token True.
        return cls.from_sentencepiece(
            model,
            list(added.values()),
            legacy=bool(config.get("legacy", False)),
            add_bos=bool(config.get("add_bos_token", True)),
            bos_token=named("bos_token", "<s>"),
            eos_token=named("eos_token", "</s>"),
            unk_token=named("unk_token", "<unk>"),
            special_tokens=[s for s in special if s],
            chat_template=template if isinstance(template, str) else None,
        )

    # ----------------------------------------------------------------------------------------------
    # Encoding

    def token_id(self, content: str) -> int | None:
        """The id of an added/special token such as "<|im_start|>", or None."""
        return self.special_ids.get(content)

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids for `text`; with `add_bos`, BOS first.

        With parse_special=False (the default) the whole text is ordinary text: "<|im_start|>" typed by a
        user becomes "<", "|", "im", ... never the control token. parse_special=True cuts out the added
        tokens, like AutoTokenizer's encode: only for text we wrote ourselves.
        """
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        if not parse_special or self._special_re is None:
            ids += self._encode_chunk(text, at_start=True)
            return ids
        pos = 0
        for match in self._special_re.finditer(text):
            ids += self._encode_chunk(text[pos : match.start()], at_start=pos == 0)
            ids.append(self._match_ids[int(match.lastgroup[1:])])
            pos = match.end()
        ids += self._encode_chunk(text[pos:], at_start=pos == 0)
        return ids

    def encode_pieces(self, pieces: Iterable[str | int], add_bos: bool = False) -> list[int]:
        """Build a prompt from token ids we place and text we never scan for special tokens.

        Ints are emitted as they are; each run of strings is encoded as ordinary text, with the "▁"
        prefix rules of a chunk at that position. When the text holds no special-token strings, the
        result equals `encode(rendered, parse_special=True)` of the same prompt written out in full.
        Text right after an ordinary (non-special) token id continues that text: it gets no "▁"
        prefix (this is how tool output is appended to the tokens a model generated).
        """
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        special = set(self.special_ids.values())
        run: list[str] = []
        at_start = True
        continuation = False
        for piece in [*pieces, None]:
            if isinstance(piece, str):
                run.append(piece)
                continue
            text = "".join(run)
            ids += self._encode_chunk(text, at_start, continuation)
            at_start = at_start and not text
            run = []
            if piece is not None:
                if not 0 <= piece < self.vocab_size:
                    raise ValueError(f"token id {piece} is outside the vocabulary ({self.vocab_size})")
                ids.append(int(piece))
                at_start = False
                continuation = int(piece) not in special
        return ids

    def _encode_chunk(self, text: str, at_start: bool, continuation: bool = False) -> list[int]:
        """Encode text that holds no special tokens, as one chunk of the tokenizers pipeline."""
        if not text:
            return []
        # " " -> "▁". legacy: every chunk gets SentencePiece's dummy "▁" prefix, even one that
        # starts with a space; otherwise only the chunk at offset 0, and only if it has no space.
        text = text.replace(" ", SPACE)
        if not continuation and (self.legacy or (at_start and not text.startswith(SPACE))):
            text = SPACE + text
        if self._word_re is None:
            return self._bpe(text)
        ids: list[int] = []
        cache = self._cache
        for word in self._word_re.findall(text):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._bpe(word)
                if len(cache) >= _WORD_CACHE_SIZE:
                    cache.clear()
                cache[word] = word_ids
            ids += word_ids
        return ids

    def _bpe(self, word: str) -> list[int]:
        """tokenizers' BPE on one word: merge the best-ranked adjacent pair (leftmost on ties) until
        none is left. A linked list over the symbols plus a heap of candidate merges; stale heap
        entries are skipped when popped."""
        symbols: list[int | None] = []
        for char in word:
            i = self._char_ids.get(char)
            if i is not None:
                symbols.append(i)
                continue
            byte_ids = [self._byte_ids[b] for b in char.encode("utf-8")]
            if None not in byte_ids:
                symbols += byte_ids  # byte fallback
            elif self.unk_id is not None and not (symbols and symbols[-1] == self.unk_id):
                symbols.append(self.unk_id)  # no byte pieces: one fused unknown
        n = len(symbols)
        if n < 2:
            return symbols  # type: ignore[return-value]
        merges, shift = self._merges, self._shift
        id_mask = (1 << shift) - 1
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        for pos in range(n - 1):
            merge = merges.get(symbols[pos] << shift | symbols[pos + 1])
            if merge is not None:
                heap.append((merge, pos))
        heapq.heapify(heap)
        while heap:
            merge, pos = heapq.heappop(heap)
            right = nxt[pos]
            if symbols[pos] is None or right == -1:
                continue
            if merges.get(symbols[pos] << shift | symbols[right]) != merge:
                continue  # stale: one side has changed since this pair was queued
            new_id = merge & id_mask
            symbols[pos] = new_id
            symbols[right] = None
            after = nxt[right]
            nxt[pos] = after
            if after != -1:
                prv[after] = pos
                merge = merges.get(new_id << shift | symbols[after])
                if merge is not None:
                    heapq.heappush(heap, (merge, pos))
            before = prv[pos]
            if before != -1:
                merge = merges.get(symbols[before] << shift | new_id)
                if merge is not None:
                    heapq.heappush(heap, (merge, before))
        return [s for s in symbols if s is not None]

    # ----------------------------------------------------------------------------------------------
    # Decoding

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text for `ids`, as AutoTokenizer.decode(ids, skip_special_tokens=skip_special) gives it."""
        text = _join_items(self._kept_items(ids, skip_special))
        # The Strip decoder: drop the one space that the "▁" prefix of the first chunk turned into.
        return text[1:] if text.startswith(" ") else text

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to the text, as a grammar sees them: "▁" as a space, a byte piece
        as its byte, a special or control token as its text (b"" for an id with no token). Unlike
        `decode`, no leading space is stripped: these bytes concatenate to exactly what the model wrote."""
        item = self._item(token_id, skip_special=False)
        if item is None:
            return b""
        return bytes([item]) if isinstance(item, int) else item.encode("utf-8")

    def vocab_bytes(self) -> list[bytes]:
        """`token_bytes` of every id, in id order."""
        return [self.token_bytes(i) for i in range(self.vocab_size)]

    @property
    def control_ids(self) -> frozenset[int]:
        """Ids that stand for no text (special, control and unknown tokens): never part of constrained text."""
        types = self.piece_types
        return self._skip | {i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)}

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        """A decoder that turns ids into text one at a time, for streaming a reply."""
        return StreamDecoder(self, skip_special)

    def _item(self, token_id: int, skip_special: bool) -> str | int | None:
        # Ids without a token are dropped, as tokenizers does.
        if not 0 <= token_id < self.vocab_size or (skip_special and token_id in self._skip):
            return None
        item = self._fixed_items.get(token_id)
        if item is None and token_id < len(self.pieces):
            item = self.pieces[token_id].replace(SPACE, " ")
        return item

    def _kept_items(self, ids: Iterable[int], skip_special: bool):
        for token_id in ids:
            item = self._item(token_id, skip_special)
            if item is not None:
                yield item

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"legacy={self.legacy}, added={len(self.special_ids)})"
        )


class StreamDecoder:
    """Incremental decoding: `push(id)` returns the text the new token adds, `flush()` the rest.

    The prefix/read-offset technique (as in vLLM and TGI): decode a short window of recent tokens
    twice, without and with the new one, and return the difference. Text is held back while the window
    ends in U+FFFD, i.e. while a character split over byte pieces (emoji, rare CJK) is incomplete.
    For valid UTF-8, "".join(pushes) + flush() == tokenizer.decode(ids). If a model emits malformed
    bytes right after a complete byte-piece character, decode() (like HF) turns that whole byte run
    into U+FFFD, whereas the stream has already shown the complete character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._items: list[str | int] = []  # decodable items of the tokens in the window
        self._read = 0  # items before this have been returned as text (they start the window)
        self._started = False  # whether any text was returned yet (for the leading-space strip)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now complete (often "" or one word)."""
        item = self._tokenizer._item(token_id, self._skip_special)
        if item is None:  # skipped special token: it decodes to nothing
            return ""
        self._items.append(item)
        new_text = _join_items(self._items)
        if new_text.endswith("\ufffd"):  # maybe an incomplete UTF-8 character: wait for more bytes
            return ""
        return self._advance(new_text)

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character becomes U+FFFD, as in decode)."""
        if self._read == len(self._items):
            return ""
        return self._advance(_join_items(self._items))

    def _advance(self, new_text: str) -> str:
        prefix_text = _join_items(self._items[: self._read])
        if new_text.startswith(prefix_text):
            text = new_text[len(prefix_text) :]
        else:  # malformed bytes changed text already returned; we can only show the new part
            text = _join_items(self._items[self._read :])
        # The next window starts at the first item not yet returned (the "prefix offset"); older items
        # are dropped, so each push decodes only a few tokens.
        del self._items[: self._read]
        self._read = len(self._items)
        if not self._started and text:
            self._started = True
            if text.startswith(" "):  # the Strip that decode() applies to the start of the text
                text = text[1:]
        return text


# ------------------------------------------------------------------------------------------------
# Helpers


def _parse_sentencepiece(model_proto: bytes, source: str) -> tuple[list[str], list[int], list[float], dict[str, int]]:
    """Pieces, piece types, scores and the trainer's unk/bos/eos ids from a SentencePiece ModelProto.

    Only these few fields are needed, so we read the protobuf wire format directly rather than
    depend on protobuf and sentencepiece's generated module (sentencepiece_model.proto numbers them:
    ModelProto.pieces=1, .trainer_spec=2; SentencePiece.piece=1, .score=2, .type=3; TrainerSpec.model_type=3,
    .unk_id=40, .bos_id=41, .eos_id=42).
    """
    pieces: list[str] = []
    types: list[int] = []
    scores: list[float] = []
    trainer = {"model_type": 1, "unk_id": 0, "bos_id": 1, "eos_id": 2}  # proto defaults
    trainer_fields = {3: "model_type", 40: "unk_id", 41: "bos_id", 42: "eos_id"}
    try:
        for field, value in _proto_fields(bytes(model_proto)):
            if field == 1 and isinstance(value, bytes):
                piece, kind, score = "", NORMAL, 0.0
                for f, v in _proto_fields(value):
                    if f == 1 and isinstance(v, bytes):
                        piece = v.decode("utf-8")
                    elif f == 2 and isinstance(v, bytes) and len(v) == 4:
                        (score,) = struct.unpack("<f", v)
                    elif f == 3 and isinstance(v, int):
                        kind = v
                pieces.append(piece)
                types.append(kind)
                scores.append(score)
            elif field == 2 and isinstance(value, bytes):
                for f, v in _proto_fields(value):
                    if f in trainer_fields and isinstance(v, int):
                        trainer[trainer_fields[f]] = v - (1 << 64) if v >= 1 << 63 else v  # int32 < 0
    except (ValueError, UnicodeDecodeError) as e:
        raise MistolError(f"{source}: not a valid SentencePiece model ({e})") from None
    if not pieces:
        raise MistolError(f"{source}: not a valid SentencePiece model (no pieces)")
    if trainer["model_type"] != _BPE_MODEL_TYPE:
        raise MistolError(
            f"{source}: only SentencePiece BPE models are supported (model_type {trainer['model_type']})"
        )
    return pieces, types, scores, trainer


def _proto_fields(buf: bytes):
    """(field number, value) for each field of a protobuf message: an int for varints, bytes for
    length-delimited fields and for fixed 32/64-bit ones (which we do not need to interpret)."""
    pos, end = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise ValueError("truncated or overlong varint")
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return result

    while pos < end:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire in (1, 2, 5):
            size = {1: 8, 5: 4}.get(wire) or varint()
            if pos + size > end:
                raise ValueError(f"field {field} runs past the end of the data")
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire} for field {field}")
        if field == 0:
            raise ValueError("field number 0")
        yield field, value


def _decoded_item(piece: str) -> str | int:
    """A piece as the decoder sees it: an int for a byte piece, else text with spaces."""
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        return int(match.group(1), 16)
    return piece.replace(SPACE, " ")


def _join_items(items: Iterable[str | int]) -> str:
    """Concatenate decoded items; each run of bytes becomes UTF-8 text (tokenizers' ByteFallback)."""
    parts: list[str] = []
    run = bytearray()
    for item in items:
        if isinstance(item, int):
            run.append(item)
            continue
        if run:
            parts.append(_bytes_text(run))
            run = bytearray()
        parts.append(item)
    if run:
        parts.append(_bytes_text(run))
    return "".join(parts)


def _bytes_text(run: bytearray) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)  # tokenizers replaces a malformed run byte by byte


def _read_json_object(path: Path) -> dict:
    """The JSON object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MistolError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise MistolError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _token_content(value, source) -> str:
    # tokenizer_config.json writes tokens either as "<s>" or as {"content": "<s>", ...}
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise MistolError(f"{source}: expected a token string, found {value!r}")
    return value


def _as_id(value, content: str, source) -> int:
    if isinstance(value, bool):
        value = None  # JSON true/false is not an id
    try:
        return int(value)
    except (TypeError, ValueError):
        raise MistolError(f"{source}: token {content!r} has an invalid id {value!r}") from None


def _added_token(entry, token_id, source) -> AddedToken:
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
        raise MistolError(f"{source}: malformed added token {entry!r}")
    return AddedToken(
        content=entry["content"],
        id=_as_id(token_id, entry["content"], source),
        special=bool(entry.get("special", False)),
        lstrip=bool(entry.get("lstrip", False)),
        rstrip=bool(entry.get("rstrip", False)),
    )
