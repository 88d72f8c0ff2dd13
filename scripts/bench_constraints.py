"""Per-token cost of constrained decoding on the CPU: llguidance, xgrammar and outlines-core.

For each library and vocabulary, a JSON schema is compiled, then replies are generated from
random logits: before each token the library computes which tokens are allowed, the logits
are masked, a token is sampled and the library advances. Printed per library: compile time,
the mean and 95th percentile of one token's mask (computing it and applying it to the logits),
and how many finished replies validate against the schema (`jsonschema`).

Vocabularies: the Mistral 7B SentencePiece tokenizer (32,000 ids, shipped in mistral-common)
and a synthetic 150,000-id one of the same kinds of byte strings (the 32k pieces, their
capitalised and spaced variants and joined pairs), as large as Qwen's or Llama 3's.

The mask is then set against one decode step of a model (`--shape`, default the 1b one of
`mistol bench`, random int8 weights, `--steps` greedy steps after a 64-token prompt): the
figure that must stay under 10%.

    python scripts/bench_constraints.py [--tokens 400] [--libraries llguidance,xgrammar,outlines-core]
                                        [--shape 1b] [--quant int8] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from mistol.errors import run_script

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "email", "tags", "active", "role", "score"],
    "additionalProperties": False,
}


def mistral_vocab() -> tuple[list[bytes], int]:
    import mistral_common

    from mistol.tokenizer import Tokenizer

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    tok = Tokenizer.from_sentencepiece(path)
    vocab = tok.vocab_bytes()
    for i in tok.control_ids:
        vocab[i] = b""  # never text
    return vocab, tok.eos_id


def large_vocab(base: list[bytes], size: int = 150_000) -> tuple[list[bytes], int]:
    rng = random.Random(0)
    seen, vocab = set(), []
    for b in [bytes([i]) for i in range(256)] + [b for b in base if b]:
        if b not in seen:
            seen.add(b)
            vocab.append(b)
    words = [b for b in base if len(b) > 1]
    while len(vocab) < size - 1:
        w = rng.choice(words)
        kind = rng.random()
        if kind < 0.25:
            cand = w.capitalize()
        elif kind < 0.5:
            cand = b" " + w.strip()
        elif kind < 0.6:
            cand = w.upper()
        else:
            cand = w + rng.choice(words).strip()
        if cand not in seen:
            seen.add(cand)
            vocab.append(cand)
    vocab.append(b"")  # the EOS id, last
    return vocab, len(vocab) - 1


class LLGuidance:
    name = "llguidance"

    def __init__(self, vocab, eos):
        import llguidance as llg

        class Wrapper:
            tokens, special_token_ids, eos_token_id, bos_token_id = vocab, [eos], eos, None
            is_tokenizer_wrapper = True

            def __call__(self, text):
                return greedy(text)

        self.tok = llg.LLTokenizer(Wrapper(), n_vocab=len(vocab))
        greedy = self.tok.greedy_tokenize
        self.llg = llg
        self.words = torch.zeros((len(vocab) + 31) // 32, dtype=torch.int32)
        self.bits = torch.tensor([1 << b for b in range(32)], dtype=torch.int64).to(torch.int32)

    def compile(self, schema):
        self.grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})

    def start(self):
        self.m = self.llg.LLMatcher(self.tok, self.grammar, log_level=0)

    def mask(self, logits):
        self.m.unsafe_compute_mask_ptr(self.words.data_ptr(), self.words.numel() * 4)
        allowed = (self.words.unsqueeze(-1) & self.bits).ne(0).flatten()[: logits.numel()]
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token):
        assert self.m.consume_token(token), self.m.get_error()

    def done(self):
        return self.m.is_stopped()


class XGrammar:
    name = "xgrammar"

    def __init__(self, vocab, eos):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.bitmask = xgr.allocate_token_bitmask(1, len(vocab))

    def compile(self, schema):
        self.compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def start(self):
        self.m = self.xgr.GrammarMatcher(self.compiled)

    def mask(self, logits):
        self.m.fill_next_token_bitmask(self.bitmask)
        logits = logits.unsqueeze(0).clone()
        self.xgr.apply_token_bitmask_inplace(logits, self.bitmask)
        return logits[0]

    def advance(self, token):
        assert self.m.accept_token(token)

    def done(self):
        return self.m.is_terminated()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, vocab, eos):
        import outlines_core as oc

        self.oc = oc
        table: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab):
            if b and i != eos:
                table.setdefault(b, []).append(i)
        self.vocabulary = oc.Vocabulary(eos, table)
        self.words = torch.zeros((len(vocab) + 31) // 32, dtype=torch.int32)
        self.bits = torch.tensor([1 << b for b in range(32)], dtype=torch.int64).to(torch.int32)

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        self.index = self.oc.Index(regex, self.vocabulary)

    def start(self):
        self.m = self.oc.Guide(self.index)

    def mask(self, logits):
        self.words.zero_()
        self.m.write_mask_into(self.words.data_ptr(), self.words.numel(), 4)
        allowed = (self.words.unsqueeze(-1) & self.bits).ne(0).flatten()[: logits.numel()]
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token):
        self.m.advance(token, return_tokens=False)

    def done(self):
        return self.m.is_finished()


LIBRARIES = {c.name: c for c in (LLGuidance, XGrammar, OutlinesCore)}


def run(library_cls, vocab, eos, n_tokens: int) -> dict:
    import jsonschema

    t0 = time.perf_counter()
    lib = library_cls(vocab, eos)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    lib.compile(SCHEMA)
    compile_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    times, finished, valid = [], 0, 0
    while len(times) < n_tokens:
        lib.start()
        out, ended = [], False
        for _ in range(300):
            logits = torch.randn(len(vocab), generator=gen) * 3
            t0 = time.perf_counter()
            masked = lib.mask(logits)
            times.append(time.perf_counter() - t0)
            token = int(torch.multinomial(torch.softmax(masked, -1), 1, generator=gen))
            if token == eos:
                ended = True
                break
            lib.advance(token)
            out.append(token)
            if lib.done():
                ended = True
                break
        if not ended:
            continue  # cut by the length limit: JSON unfinished, as with max_tokens
        finished += 1
        try:
            jsonschema.validate(json.loads(b"".join(vocab[t] for t in out)), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    times.sort()
    return dict(setup_s=setup, compile_s=compile_s, mean_us=statistics.mean(times) * 1e6,
                p95_us=times[int(0.95 * len(times))] * 1e6, finished=finished, valid=valid)


def decode_step_seconds(shape: str, fmt: str, steps: int) -> float:
    """The median time of one greedy decode step of a random-weight model of `shape`."""
    from mistol.bench.models import mistol_model
    from mistol.bench.shapes import model_config
    from mistol.engine import Engine, decode_step

    engine = Engine(mistol_model(model_config(shape), fmt), name=f"random {shape}")
    times = []
    with torch.inference_mode():
        session = engine.new_session(max_context=256)
        token = int(session.feed(list(range(100, 164))).argmax())
        for _ in range(steps):
            t0 = time.perf_counter()
            token = int(decode_step([session], [token])[0].argmax())
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=400, help="masked tokens per library and vocabulary")
    ap.add_argument("--libraries", default=",".join(LIBRARIES))
    ap.add_argument("--shape", default="1b", help="the model whose decode step the mask is set against ('' for none)")
    ap.add_argument("--quant", default="int8", help="its weights' format (int8, int4, bf16, f32)")
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    unknown = [name for name in args.libraries.split(",") if name not in LIBRARIES]
    if unknown:
        ap.error(f"--libraries: comma-separated, of {', '.join(LIBRARIES)}; not {', '.join(unknown)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the mask is computed on the engine's thread, one row after another
    small, eos = mistral_vocab()
    vocabs = {"32k (Mistral)": (small, eos), "150k (synthetic)": large_vocab(small)}
    print(f"{'library':<14} {'vocabulary':<17} {'setup s':>8} {'compile s':>10} {'mask µs':>9} {'p95 µs':>8} "
          f"{'valid/finished':>14}")
    masks: dict[str, float] = {}
    for name in args.libraries.split(","):
        for vname, (vocab, eos_id) in vocabs.items():
            try:
                r = run(LIBRARIES[name], vocab, eos_id, args.tokens)
            except Exception as e:  # noqa: BLE001 - a library that fails is reported, the others go on
                print(f"{name:<14} {vname:<17} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
            print(f"{name:<14} {vname:<17} {r['setup_s']:8.2f} {r['compile_s']:10.3f} {r['mean_us']:9.0f} "
                  f"{r['p95_us']:8.0f} {r['valid']:>3}/{r['finished']:<3}")
            masks.setdefault(name, r["mean_us"])  # the 32k figure: the vocabulary of the shapes
    if args.shape and masks:
        torch.set_num_threads(threads)
        step = decode_step_seconds(args.shape, args.quant, args.steps)
        print(f"\ndecode step, shape {args.shape} {args.quant}, {threads} threads: {step * 1e3:.1f} ms (median of "
              f"{args.steps}); a 32k mask is " + ", ".join(f"{100 * us / 1e6 / step:.2f}% ({name})"
                                                         for name, us in masks.items()) + " of it")


if __name__ == "__main__":
    run_script(main)
