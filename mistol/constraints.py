"""Output constrained to a JSON schema, a regular expression or a grammar, token by token.

The work is done by llguidance (Microsoft's constrained-decoding library, in Rust): given the
bytes of every token, it computes before each step which tokens can extend the text so that it
still matches, and the sampler sees every other token's logit at -inf. What the caller asks for
(`Constraint`) is compiled once per request into llguidance's grammar (`Grammars.compile`, which
refuses a bad schema, regex or grammar with a `ConstraintError` naming it), and each request then
walks it with its own `TokenGrammar`: `mask` before sampling, `advance` with the sampled token.

Ending. The text may end (a stop token may be sampled) only where the grammar accepts it; once
the grammar can take nothing more (`finished`), the reply ends there. A reply cut by max_tokens
ends wherever it is, as OpenAI's does.

Vocabulary. llguidance sees each id as the bytes it adds to the text (`Tokenizer.token_bytes`:
"▁" is a space, `<0x0A>` is the byte 0x0A); special and control tokens are marked special, so no
grammar ever produces one as text (a JSON string holding "</s>" is spelled in ordinary tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import MistolError

if TYPE_CHECKING:
    import torch

KINDS = ("json_object", "json_schema", "regex", "grammar", "lark")
# JSON as OpenAI writes it: no free whitespace (which a model could repeat without end); a
# schema's own "x-guidance" options still apply over these.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(MistolError):
    """A schema, regex or grammar that cannot be compiled; the message says what is wrong."""


@dataclass(frozen=True)
class Constraint:
    """What the output must match. `source`: the JSON schema (a dict) for "json_schema", the
    pattern for "regex", a GBNF (llama.cpp) or Lark grammar for "grammar", a Lark grammar in
    llguidance's dialect (which embeds JSON schemas: `%json {...}`) for "lark", unused for "json_object"."""

    kind: str
    source: Any = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConstraintError(f"unknown constraint {self.kind!r}; expected one of {', '.join(KINDS)}")


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise MistolError("constrained output needs the llguidance package: pip install llguidance") from None
    return llguidance


class Grammars:
    """One tokenizer's vocabulary as llguidance sees it; compiles constraints into grammars for it."""

    def __init__(self, tokenizer):
        llg = _llguidance()
        import torch

        self.vocab_size = tokenizer.vocab_size
        vocab = tokenizer.vocab_bytes() if hasattr(tokenizer, "vocab_bytes") else [
            tokenizer.token_bytes(i) for i in range(self.vocab_size)]
        # never produced as text: control and special tokens, and every added token (a chat
        # template's markers), whichever of these the tokenizer tells
        special = set(getattr(tokenizer, "control_ids", ()))
        special |= set(getattr(tokenizer, "special_ids", {}).values())
        special |= {i for i in (getattr(tokenizer, "bos_id", None), tokenizer.eos_id) if i is not None}
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else next(iter(special), 0)
        wrapper = _Vocabulary(vocab, special, eos, getattr(tokenizer, "bos_id", None))
        self.llg_tokenizer = llg.LLTokenizer(wrapper, n_vocab=self.vocab_size)
        wrapper.tokenize = self.llg_tokenizer.greedy_tokenize
        self.eos_id = eos  # the token llguidance allows where the text may end
        self._bits = torch.tensor([1 << b for b in range(32)], dtype=torch.int64).to(torch.int32)

    def compile(self, constraint: Constraint) -> str:
        """The llguidance grammar for `constraint`; a `ConstraintError` if it is not valid."""
        llg = _llguidance()
        kind, source = constraint.kind, constraint.source
        try:
            if kind == "json_object":
                grammar = llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
            elif kind == "json_schema":
                if source is False:
                    raise ConstraintError("invalid JSON schema: false matches nothing")
                if not isinstance(source, (dict, bool)):
                    raise ConstraintError("a JSON schema must be a JSON object")
                source = {} if source is True else source  # true: any JSON value
                grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(source), defaults=JSON_DEFAULTS)
            elif kind == "regex":
                if not isinstance(source, str) or not source:
                    raise ConstraintError("a regex must be a non-empty string")
                grammar = llg.LLMatcher.grammar_from_regex(source)
            elif kind == "lark":
                grammar = llg.LLMatcher.grammar_from_lark(source)
            else:
                if not isinstance(source, str) or not source.strip():
                    raise ConstraintError("a grammar must be a non-empty string (GBNF or Lark)")
                grammar = llg.grammar_from("grammar", source)
        except ValueError as e:
            raise ConstraintError(f"invalid {_names[kind]}: {_one_line(e)}") from None
        error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.llg_tokenizer)
        if error:
            raise ConstraintError(f"invalid {_names[kind]}: {_one_line(messages[0])}")
        return grammar

    def start(self, grammar: str) -> TokenGrammar:
        """A fresh walk of a compiled grammar, for one reply."""
        llg = _llguidance()
        matcher = llg.LLMatcher(self.llg_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"invalid grammar: {_one_line(matcher.get_error())}")
        return TokenGrammar(self, matcher)

    def allowed(self, bitmask: torch.Tensor, width: int) -> torch.Tensor:
        """llguidance's bitmask (int32 words, bit i of word w = token 32w + i) as a bool for each
        of `width` logits; the model's logits past the tokenizer's vocabulary (padding) are never allowed."""
        import torch

        bits = (bitmask.unsqueeze(-1) & self._bits).ne(0).flatten()[: min(self.vocab_size, width)]
        if width > bits.numel():
            bits = torch.cat([bits, bits.new_zeros(width - bits.numel())])
        return bits


class TokenGrammar:
    """One reply's position in its grammar."""

    def __init__(self, grammars: Grammars, matcher):
        import torch

        self.grammars = grammars
        self.matcher = matcher
        self._words = torch.zeros((grammars.vocab_size + 31) // 32, dtype=torch.int32)

    @property
    def accepting(self) -> bool:
        """The text so far is a complete match: the reply may end here."""
        return self.matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """Nothing more can follow: the reply ends here."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None

    def mask(self, logits: torch.Tensor, stop_ids=()) -> torch.Tensor:
        """`logits` (one row) with every token the grammar forbids at -inf; `stop_ids` are allowed
        exactly when the text so far is accepted."""
        words = self._words
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        allowed = self.grammars.allowed(words, logits.shape[-1])
        if stop_ids:
            eos = self.grammars.eos_id
            accepting = (eos < allowed.numel() and bool(allowed[eos])) or self.matcher.is_accepting()
            allowed[[i for i in stop_ids if i < allowed.numel()]] = accepting
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> None:
        """Take the sampled token (not a stop token: the reply ends there)."""
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} does not fit the grammar: {self.matcher.get_error()}")


class _Vocabulary:
    """The tokenizer as llguidance's TokenizerWrapper reads it."""

    def __init__(self, vocab: list[bytes], special: set[int], eos: int, bos: int | None):
        self.tokens = vocab
        self.special_token_ids = sorted(special)
        self.eos_token_id = eos
        self.bos_token_id = bos
        self.is_tokenizer_wrapper = True
        self.tokenize = None  # set once llguidance has the vocabulary

    def __call__(self, text) -> list[int]:
        # llguidance re-tokenizes bytes the grammar forces; their tokens must spell exactly those
        # bytes, which the model's own tokenizer (adding SentencePiece's leading "▁") would not
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenize(text)


_names = {"json_object": "JSON object", "json_schema": "JSON schema", "regex": "regex", "grammar": "grammar",
          "lark": "grammar"}


def _one_line(error) -> str:
    """llguidance's message in one line: its first line, plus the line saying what is wrong
    when that comes below a drawing of where (as the regex parser's messages do)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    text = lines[0]
    detail = next((line[len("error:"):].strip() for line in lines[1:] if line.startswith("error:")), None)
    if detail:
        text = f"{text.rstrip(':')}: {detail}"
    return text if len(text) <= 300 else text[:297] + "..."
