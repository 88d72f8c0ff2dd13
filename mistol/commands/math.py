"""`mistol math`: solve one problem, evaluate strategies on a data set, or generate problems.

    mistol math "Solve x^2 - 5x + 6 = 0"
    mistol math --data test.jsonl --strategy code,vote --samples 5 --limit 100 --out results.jsonl
    mistol math --generate arithmetic --n 200 --seed 1 > problems.jsonl

The solving and grading are in mistol/mathsolve/; this module reads the options and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import MistolError
from ..mathsolve.choices import DEFAULT_VOTE_TEMPERATURE, SAMPLING, STRATEGIES
from ..mathsolve.datasets import GENERATORS
from ..sandbox.visible import visible
from . import COMMANDS
from .options import (add_api_args, add_model_args, add_sampling_args, add_speculation_args, load_engine,
                      remote_llm, sampling_params)

DESCRIPTION = (
    "Solve a math problem, showing the reasoning, the code the model runs and the final answer; "
    "or evaluate strategies on a data set (GSM8K, MATH/PRM800K or mistol's own JSON Lines) and print "
    "the accuracy with a 95% Wilson interval. Strategies: cot (step by step), code (the model writes "
    "Python that runs in the sandbox, without asking), vote (K sampled solutions, majority answer), "
    "verify (K sampled solutions, each step scored by the model itself; the local engine only)."
)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("math", help=COMMANDS["math"], description=DESCRIPTION)
    add_model_args(p)
    p.add_argument("question", nargs="?", default=None, help="a problem to solve (instead of --data)")
    p.add_argument("--data", metavar="FILE.jsonl", default=None, help="evaluate on this data set")
    p.add_argument("--strategy", default="code", metavar="S[,S...]",
                   help=f"{', '.join(STRATEGIES)}, or several separated by commas (default: code)")
    p.add_argument("--samples", "-k", type=int, default=5, metavar="K",
                   help="solutions per problem for vote and verify (default: 5)")
    p.add_argument("--base", choices=["code", "cot"], default="code",
                   help="how vote and verify sample their solutions (default: code, which lets verify prefer "
                   "an answer the code confirms)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N problems")
    p.add_argument("--out", metavar="FILE.jsonl", default=None,
                   help="append one record per problem and strategy here; a run resumes by skipping "
                   "those already in it")
    g = p.add_argument_group("generating problems (JSON Lines on stdout)")
    g.add_argument("--generate", choices=GENERATORS, default=None,
                   help="arithmetic: the demo model's problems; gsm-symbolic: grade-school word problems "
                   "from reasoning-gym (pip install 'mistol[math]')")
    g.add_argument("--n", type=int, default=100, help="how many problems to generate (default: 100)")
    g = p.add_argument_group("running the model's code (in the sandbox: no network, time and memory limits)")
    g.add_argument("--code-timeout", type=float, default=30.0, help="seconds per block (default: 30)")
    g.add_argument("--code-memory", type=int, default=2048, help="MB of memory per block (default: 2048)")
    g.add_argument("--code-disk", type=int, default=512, help="MB for the files the code writes: its directory and /tmp together (default: 512)")
    g.add_argument("--allow-network", action="store_true", help="let the code use the network")
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens (default: the model's)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_sampling_args(p, max_tokens=1024)
    add_speculation_args(p)
    add_api_args(p)
    for action in p._actions:  # math has its own defaults for these two
        if action.dest == "temperature":
            action.help = (f"default: 0 (greedy) for cot and code, {DEFAULT_VOTE_TEMPERATURE} for vote and verify; "
                           "when given, it applies to all")
        elif action.dest == "seed":
            action.help = "seed for sampling, and for --generate (default: 0, so runs repeat)"
    p.set_defaults(run=cmd_math, temperature=None, seed=0)
    return p


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        if name not in STRATEGIES:
            raise MistolError(f"--strategy {name}: unknown (choose from {', '.join(STRATEGIES)})")
    if not names:
        raise MistolError(f"--strategy: give one of {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


def cmd_math(args) -> int:
    if args.generate:
        from ..mathsolve.datasets import generate

        for record in generate(args.generate, args.n, args.seed if args.seed is not None else 0):
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        return 0
    if args.question is None and args.data is None:
        raise MistolError("mistol math: give a QUESTION, --data FILE.jsonl, or --generate KIND")
    if args.question is not None and args.data is not None:
        raise MistolError("mistol math: give a QUESTION or --data FILE.jsonl, not both")
    names = parse_strategies(args.strategy)
    if "verify" in names and args.api:
        from ..mathsolve.verify import VERIFY_NEEDS_ENGINE

        raise MistolError(VERIFY_NEEDS_ENGINE)
    sampled = [n for n in names if n in SAMPLING]
    if sampled and args.temperature is not None and args.temperature <= 0:
        raise MistolError(f"--strategy {sampled[0]} samples {args.samples} solutions: it needs --temperature > 0 "
                          "(at 0 they would all be the same)")
    problems = None
    if args.data is not None:
        from ..mathsolve.datasets import load_problems

        problems = load_problems(args.data, args.limit)  # before the model loads: a bad file fails fast

    from ..sandbox.code_turn import CodeOptions, CodeRunner
    from ..sandbox.sandbox import SandboxLimits

    progress = args.data is not None and not args.quiet
    llm = remote_llm(args) if args.api else _local_llm(args)
    limits = SandboxLimits(timeout_s=args.code_timeout, memory_mb=args.code_memory, disk_mb=args.code_disk,
                           allow_network=args.allow_network)
    runner = CodeRunner(CodeOptions(auto_yes=True, limits=limits), ask=None, notice=_notice)
    try:
        strategies = make_strategies(names, llm, args, runner)
        if problems is None:
            return solve_one(args.question, strategies, args.seed)
        return evaluate_data(problems, strategies, args, progress)
    finally:
        runner.close()


def _local_llm(args):
    from ..llm import LocalLLM

    return LocalLLM(load_engine(args), max_context=args.ctx)


def _notice(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


def make_strategies(names: list[str], llm, args, runner) -> list:
    from dataclasses import replace

    from ..mathsolve.strategies import Strategy

    scorer = None
    if "verify" in names:
        from ..mathsolve.verify import StepScorer

        scorer = StepScorer(llm)
    base = sampling_params(args if args.temperature is not None else _with_temperature(args, 0.0), [])
    strategies = []
    for name in names:
        params = base
        if args.temperature is None and name in SAMPLING:
            params = replace(base, temperature=DEFAULT_VOTE_TEMPERATURE)
        strategies.append(Strategy(name, llm, params, runner, samples=args.samples, scorer=scorer, base=args.base))
    return strategies


def _with_temperature(args, temperature: float):
    copy = argparse.Namespace(**vars(args))
    copy.temperature = temperature
    return copy


# -- one problem -----------------------------------------------------------------------------
def solve_one(question: str, strategies: list, seed: int | None) -> int:
    color = sys.stdout.isatty()

    def show(text: str, kind: str) -> None:
        text = visible(text)
        if color and kind != "text":
            text = f"\033[2m{text}\033[0m"
        sys.stdout.write(text)
        sys.stdout.flush()

    for strategy in strategies:
        if len(strategies) > 1:
            show(f"\n═══ {strategy.name} ═══\n", "note")
        outcome = strategy.solve(question, seed=seed, show=show)
        if outcome.votes:
            show("votes: " + ", ".join(f"{answer} ×{count}" for answer, count in outcome.votes) + "\n", "note")
        if strategy.name == "verify" and outcome.chosen_index is not None:
            best = outcome.attempts[outcome.chosen_index]
            show(f"best solution: sample {outcome.chosen_index + 1} (score {best.score:.3g}"
                 f"{', code-checked' if best.code_checked else ''})\n", "note")
        prefix = f"Answer ({strategy.name}): " if len(strategies) > 1 else "Answer: "
        print(prefix + (outcome.chosen if outcome.chosen is not None else "(none found)"), flush=True)
    return 0


# -- a data set -------------------------------------------------------------------------------
def evaluate_data(problems: list, strategies: list, args, progress: bool) -> int:
    from ..mathsolve.evaluate import evaluate, format_table, read_records

    out = Path(args.out) if args.out else None
    try:
        summaries = evaluate(problems, strategies, out=out, seed=args.seed, progress=progress)
    except KeyboardInterrupt:
        if out is not None:
            done = len(read_records(out))
            print(f"\n(stopped: {done} record(s) in {out}; run the same command again to go on)", file=sys.stderr)
        raise
    print(f"{args.data}: {len(problems)} problem(s)" + (f", results in {out}" if out else ""))
    print(format_table(summaries))
    return 0
