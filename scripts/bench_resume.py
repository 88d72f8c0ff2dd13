"""Time to the first token of a resumed chat turn: restoring the saved KV cache against
running the history through the model again (what a resume costs without the file).

    .venv/bin/python scripts/bench_resume.py [--shape 1b] [--format int8] [--history 2000] [--threads N]

A random-weight model of the shape (speed does not depend on the values), the real Mistral
tokenizer, a history of about --history tokens; prints both times, their ratio and the file's size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from mistol.bench.models import QUANT_FORMATS, mistol_model
from mistol.bench.shapes import SHAPES, model_config
from mistol.engine import DTYPES, Engine
from mistol.errors import run_script
from mistol.llm import LocalLLM
from mistol.sampling import SamplingParams
from mistol.tokenizer import Tokenizer


def mistral_tokenizer() -> Tokenizer:
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    return Tokenizer.from_sentencepiece(path, {"<|im_end|>": 32000, "<|im_start|>": 32001})


def history(tokenizer: Tokenizer, tokens: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    sentence = "The quick brown fox jumps over the lazy dog while the committee reviews the budget. "
    per_sentence = len(tokenizer.encode(sentence))
    turn = sentence * max(1, (tokens // 6) // per_sentence)
    while sum(len(tokenizer.encode(m["content"])) for m in messages) < tokens:
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": turn}]
    return messages + [{"role": "user", "content": "Sum it up."}]


def first_token_seconds(llm: LocalLLM, messages: list[dict]) -> float:
    params = SamplingParams(temperature=0, max_tokens=1)
    start = time.perf_counter()
    for _ in llm.chat(messages, params):
        pass
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b", choices=list(SHAPES))
    ap.add_argument("--format", default="int8", choices=[*QUANT_FORMATS, *DTYPES],
                    help="the linear layers' format (default: int8)")
    ap.add_argument("--history", type=int, default=2000, help="tokens of conversation before the resumed turn")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = replace(model_config(args.shape), vocab_size=32002)  # with ChatML's two tokens, as OpenHermes
    tokenizer = mistral_tokenizer()
    engine = Engine(mistol_model(config, args.format), tokenizer, name=f"random-{args.shape}-{args.format}")
    messages = history(tokenizer, args.history)
    context = 4096
    print(f"shape {args.shape}, {args.format}, {torch.get_num_threads()} threads, "
          f"history {len(LocalLLM(engine, context).prompt_ids(messages))} tokens")

    first = LocalLLM(engine, max_context=context)
    first_token_seconds(first, messages[:-1] + [{"role": "user", "content": "Hello."}])  # the chat before
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.kv"
        start = time.perf_counter()
        size = first.save_cache(path)
        save_s = time.perf_counter() - start

        rerun = first_token_seconds(LocalLLM(engine, max_context=context), messages)
        resumed_llm = LocalLLM(engine, max_context=context)
        start = time.perf_counter()
        why_not = resumed_llm.restore_cache(path)
        restore_s = time.perf_counter() - start
        assert why_not is None, why_not
        resumed = restore_s + first_token_seconds(resumed_llm, messages)
    print(f"KV file {size / 1e6:.1f} MB, saved in {save_s:.2f} s")
    print(f"first token after re-running the history: {rerun:.2f} s")
    print(f"first token after restoring the cache:    {resumed:.2f} s (restore {restore_s:.2f} s)")
    print(f"ratio: {resumed / rerun:.1%} of a re-run")


if __name__ == "__main__":
    run_script(main)
