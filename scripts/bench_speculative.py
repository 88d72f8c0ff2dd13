"""Speculative decoding, measured: what a verify pass costs, and what it gains on real replies.

    .venv/bin/python scripts/bench_speculative.py [--shape 7b] [--formats int8,int4,FILE.gguf] [--max-rows 16]
                                                  [--threads N] [--skip-cost] [--skip-replies]
                                                  [--context 64] [--layers compiled,pytorch]

1. Verify cost. A random-weight model of --shape (speed does not depend on the values), or a GGUF
   file named in --formats (`mistol bench --kquants` makes llama.cpp's k-quant files), holds a
   64-token context (or --context tokens of random keys and values); one forward pass over
   n = 1..--max-rows new positions (what verifying n-1 guesses costs) is timed against a plain
   one-token decode step, and rolled back each time. `--layers compiled,pytorch` times each
   pass on the compiled C layers (as shipped) and on the PyTorch layers, in turns.
2. Replies. On the demo model (`--model demo`), greedy replies to fresh arithmetic questions
   (its code blocks restate the question's numbers, its answer restates the output) and to
   code-editing requests (a code block shown, one change asked for: the evaluation's, see
   scripts/eval_demo.py; the reply copies the block but for the change): tokens/s with
   speculation off, prompt lookup as shipped (adaptive), and prompt lookup at a fixed depth,
   in the same run, with the share of guesses kept. The outputs must be identical.

Every figure is a same-run ratio: absolute speeds on a shared machine drift.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mistol.bench.models import QUANT_FORMATS
from mistol.bench.shapes import SHAPES
from mistol.demo_problems import make_problem
from mistol.engine import Engine
from mistol.errors import run_script
from mistol.llm import LocalLLM
from mistol.model import backend
from mistol.sandbox.code_turn import CODE_SYSTEM_PROMPT, code_turn
from mistol.sampling import SamplingParams
from mistol.speculative import Speculation

CONTEXT = 64


# -- 1. verify cost ------------------------------------------------------------------------------
LAYERS = ("compiled", "pytorch")


@contextlib.contextmanager
def layers_for_passes(layers: str):
    """Passes of several tokens on the compiled C layers, as shipped, or on the PyTorch
    layers; a one-token decode step stays on the compiled layers."""
    saved = backend.FUSED_MAX_ROWS
    if layers == "pytorch":
        backend.FUSED_MAX_ROWS = 1
    try:
        yield
    finally:
        backend.FUSED_MAX_ROWS = saved


def verify_cost(shape: str, fmt: str, max_rows: int, repeats: int, context: int = CONTEXT,
                layers: Sequence[str] = ("compiled",)) -> tuple[float, dict[str, list[tuple[int, float]]]]:
    """(one decode step's seconds, {layers: [(rows, the pass's cost in decode steps)]}) for
    rows = 1..max_rows; the step is the fused one-token path."""
    from mistol.bench.models import fill_random_context, mistol_model
    from mistol.bench.shapes import model_config

    if fmt.endswith(".gguf"):  # a GGUF file (its k-quants stay the file's blocks, as `mistol` loads them)
        engine = Engine.load(fmt, dtype="f32", progress=False)
    else:
        engine = Engine(mistol_model(model_config(shape), fmt))
    session = engine.new_session(max_context=context + max_rows + 8)
    ids = random.Random(0).choices(range(100, 30000), k=context + max_rows)
    if context > CONTEXT:  # random keys and values: a prefill of thousands of tokens would take minutes
        fill_random_context(session, context, torch.Generator().manual_seed(0))
    else:
        session.feed(ids[:context])

    def once(rows: int, on: str = "compiled") -> float:
        with layers_for_passes(on):
            start = time.perf_counter()
            if rows == 0:
                session.step(ids[context])
            else:
                session.verify(ids[context : context + rows])
            seconds = time.perf_counter() - start
        session.truncate(context)
        return seconds

    once(0)  # warm up each path
    for on in layers:
        once(4, on)
    # Each pass is timed right after a plain step and counted in that step's time: a shared
    # machine's speed drifts by half within minutes, and a ratio of neighbours does not.
    steps: list[float] = []
    costs = {on: {rows: [] for rows in range(1, max_rows + 1)} for on in layers}
    for _ in range(repeats):
        for rows in range(1, max_rows + 1):
            for on in layers:
                steps.append(once(0))
                costs[on][rows].append(once(rows, on) / steps[-1])
    curves = {on: [(rows, statistics.median(c)) for rows, c in by_rows.items()] for on, by_rows in costs.items()}
    engine = session = None  # free the model before the next format
    return statistics.median(steps), curves


def print_cost(shape: str, fmt: str, step: float, curves: dict[str, list[tuple[int, float]]], context: int) -> None:
    what = fmt if fmt.endswith(".gguf") else f"{shape} {fmt}"  # (a file has its own shape)
    print(f"\nverify cost, {what}, {context} tokens of context: one decode step {step * 1e3:.0f} ms (median)")
    print("rows (k+1)  x step (median of each pass over the step timed just before it)")
    print(f"{'':>10}" + "".join(f"  {on:>8}" for on in curves))
    for i, (rows, _) in enumerate(next(iter(curves.values()))):
        print(f"{rows:>10}" + "".join(f"  {curve[i][1]:>8.2f}" for curve in curves.values()))


def derived_speedups(curve: list[tuple[int, float]], acceptances=(0.3, 0.5, 0.7)) -> dict[float, tuple[int, float]]:
    """Expected speed-up over plain decoding at per-guess acceptance a, for the best depth k:
    tokens per pass (1 + a + ... + a^k) over the pass's cost in steps (derived, not measured)."""
    result = {}
    for a in acceptances:
        best = (0, 1.0)  # k = 0: plain decoding
        for rows, cost in curve:
            k = rows - 1
            gain = sum(a**i for i in range(k + 1)) / cost
            if k > 0 and gain > best[1]:
                best = (k, gain)
        result[a] = best
    return result


# -- 2. replies ----------------------------------------------------------------------------------
def code_edits(count: int) -> list:
    """The evaluation's code-edit requests (scripts/eval_demo.py): a short block shown, one
    change asked for; a model that follows it writes the block again with that change."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eval_demo import edit_item

    rng = random.Random(2024)
    return [edit_item(rng) for _ in range(count)]


def simulate_lookup(tokenizer, depth: int, edits: list) -> tuple[float, float]:
    """Prompt lookup on the code edits as a model that writes the expected blocks would see
    them (each reply taken as given, token by token: no model runs): (share of guesses kept,
    tokens per pass)."""
    from mistol.speculative import PromptLookup

    params = SamplingParams(temperature=0)
    passes = guessed = kept = tokens = 0
    for edit in edits:
        prompt = tokenizer.encode(f"<|im_start|>user\n{edit.request}<|im_end|>\n<|im_start|>assistant\n",
                                  add_bos=True, parse_special=True)
        reply = tokenizer.encode(f"```python\n{edit.expected}\n```")
        lookup = PromptLookup(prompt)
        i = 0
        while i < len(reply):
            lookup.extend([reply[i]])
            proposal = lookup.propose(min(depth, len(reply) - i - 1), params, None)
            guesses = proposal.tokens if proposal else []
            right = 0
            while right < len(guesses) and guesses[right] == reply[i + 1 + right]:
                right += 1
            lookup.extend(reply[i + 1 : i + 1 + right])
            passes, guessed, kept, i = passes + 1, guessed + len(guesses), kept + right, i + 1 + right
        tokens += len(reply)
    return kept / max(guessed, 1), tokens / passes


def workloads(questions: int, edits: int) -> dict[str, list[str]]:
    rng = random.Random(2024)
    arithmetic = [make_problem(rng).question for _ in range(questions)]
    return {"arithmetic": arithmetic, "code edit": [edit.request for edit in code_edits(edits)]}


def run_code(block) -> str:
    done = subprocess.run([sys.executable, "-c", block.code], capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


def run_replies(engine: Engine, questions: list[str], speculation, max_tokens: int):
    """Each question as a chat turn of its own (code blocks run, their output shown to the
    model, as `mistol chat --yes` does), on one session, as a chat's turns share one."""
    engine.speculation = speculation
    llm = LocalLLM(engine)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outputs, tokens, seconds, guessed, kept = [], 0, 0.0, 0, 0
    for question in questions:
        messages = [{"role": "system", "content": CODE_SYSTEM_PROMPT}, {"role": "user", "content": question},
                    {"role": "assistant", "content": ""}]
        turn = code_turn(llm, messages, params, run_code)
        tokens, seconds = tokens + turn.completion_tokens, seconds + turn.decode_seconds
        guessed, kept = guessed + turn.draft_tokens, kept + turn.accepted_tokens
        outputs.append(messages[-1]["content"])
    return outputs, tokens / seconds, (kept / guessed if guessed else 0.0), tokens


def bench_replies(model: str, questions: int, edits: int, max_tokens: int, show: bool) -> None:
    engine = Engine.load(model)
    print(f"\nreplies of the demo model (greedy, {engine.config.num_layers} layers x {engine.config.hidden_size}; "
          "decode tok/s, the prompts' prefill not counted):")
    print(f"{'workload':<12} {'mode':<22} {'tok/s':>7} {'x plain':>8} {'kept':>6} {'tokens':>7}")
    modes = [("plain", None), ("lookup, adaptive", Speculation()),
             ("lookup, depth 8", Speculation(adaptive=False, max_depth=8))]
    for name, prompts in workloads(questions, edits).items():
        run_replies(engine, prompts[:2], None, 16)  # warm up
        reference = None
        for mode, speculation in modes:
            outputs, rate, acceptance, tokens = run_replies(engine, prompts, speculation, max_tokens)
            if reference is None:
                reference, plain_rate = outputs, rate
                if show:
                    print("\n---\n".join(outputs))
            assert outputs == reference, f"{mode}: the replies differ from plain decoding"
            print(f"{name:<12} {mode:<22} {rate:>7.1f} {rate / plain_rate:>8.2f} {acceptance:>6.0%} {tokens:>7}")
    for depth in (4, 8, 16):
        kept, per_pass = simulate_lookup(engine.tokenizer, depth, code_edits(edits))
        print(f"code edit, the reply as written by a model that follows the request (simulated, no model runs): "
              f"depth {depth}: {kept:.0%} of guesses kept, {per_pass:.2f} tokens per pass")
    engine.speculation = Speculation()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="7b", choices=list(SHAPES))
    p.add_argument("--formats", default="int8,int4", help="int8, int4 (the shape's random weights) or .gguf files")
    p.add_argument("--max-rows", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default="demo", help="the model whose replies are timed (default: demo)")
    p.add_argument("--questions", type=int, default=20)
    p.add_argument("--edits", type=int, default=6, help="code-edit requests (the evaluation's)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--context", type=int, default=CONTEXT, help="tokens of context for the verify cost")
    p.add_argument("--layers", default="compiled",
                   help="the layers a pass runs on: compiled (as shipped), pytorch; comma-separated")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-replies", action="store_true")
    p.add_argument("--show", action="store_true", help="print the replies")
    args = p.parse_args()
    # (checked before the replies' run, so that a typo costs no minutes)
    formats = [fmt.strip() for fmt in args.formats.split(",") if fmt.strip()]
    unknown = [fmt for fmt in formats if not fmt.endswith(".gguf") and fmt not in QUANT_FORMATS]
    if unknown or not formats:
        p.error(f"--formats: int8, int4 or .gguf files, comma-separated, not {args.formats!r}")
    missing = [fmt for fmt in formats if fmt.endswith(".gguf") and not Path(fmt).is_file()]
    if missing:
        p.error(f"--formats: no such file: {', '.join(missing)}")
    if min(args.max_rows, args.repeats, args.questions, args.edits, args.max_tokens, args.context) < 1 or (
            args.threads or 1) < 1:
        p.error("--max-rows, --repeats, --questions, --edits, --max-tokens, --context and --threads must be at least 1")
    layers = [on.strip() for on in args.layers.split(",") if on.strip()]
    if not layers or any(on not in LAYERS for on in layers):
        p.error(f"--layers: {', '.join(LAYERS)}, comma-separated, not {args.layers!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads: {torch.get_num_threads()}")
    if not args.skip_replies:
        bench_replies(args.model, args.questions, args.edits, args.max_tokens, args.show)
    if not args.skip_cost:
        for fmt in formats:
            step, curves = verify_cost(args.shape, fmt, args.max_rows, args.repeats, args.context, layers)
            print_cost(args.shape, fmt, step, curves, args.context)
            for a, (k, gain) in derived_speedups(next(iter(curves.values()))).items():
                print(f"  derived: acceptance {a:.0%} -> best k {k}, {gain:.2f}x plain decoding")


if __name__ == "__main__":
    with torch.inference_mode():
        run_script(main)
