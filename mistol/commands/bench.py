"""`mistol bench --shape 7b [--quant int8,int4,bf16] [--engines mistol,transformers,llama.cpp] [--json]`.

The measuring (worker processes, turns, the report) is in mistol/bench/; this module reads
the options and prints the report.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..bench.engines import ENGINES, FORMATS
from ..bench.shapes import SHAPES
from ..errors import MistolError
from . import COMMANDS


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help=COMMANDS["bench"],
        description="Build random-weight models of a named shape in each format (quantized ones in memory; GGUF "
        "files for llama.cpp and a safetensors checkpoint per float format, which mistol and transformers both map, "
        "written once into --cache-dir) and measure, in one run: prefill tok/s (each --prompts length), time to first token, decode tok/s (median over --steps "
        "greedy steps) and peak RSS, for mistol (each --quant), transformers (its float formats) and llama.cpp "
        "through llama-cpp-python on a GGUF of the same shape (Q8_0 for int8, Q4_0 for int4). Engines that are "
        "not installed, and formats that do not fit in memory, are skipped with a notice. Decode speed is "
        "compared with the bandwidth ceiling measured in the same run. Compare figures of one run only: "
        "other processes on the machine change them.",
    )
    p.add_argument("--shape", default="7b", choices=list(SHAPES), help="model shape (default: 7b, Mistral 7B)")
    p.add_argument("--quant", default="int8,int4,bf16,f32",
                   help="formats to measure, comma-separated, from int8,int4,bf16,f16,f32 (default: "
                   "int8,int4,bf16,f32); transformers runs the float ones, llama.cpp the quantized ones")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated (default: {','.join(ENGINES)})")
    p.add_argument("--prompts", default="64,512", help="prompt lengths for prefill (default: 64,512)")
    p.add_argument("--steps", type=int, default=32, help="decode steps, at least 32 (default: 32)")
    p.add_argument("--threads", type=int, default=0, help="threads for every engine (default: all cores)")
    p.add_argument("--cache-dir", "--gguf-dir", dest="cache_dir", type=Path, default=None,
                   help="where the model files are written and kept for the next run: GGUF files for llama.cpp, "
                   "a safetensors checkpoint per float format for mistol and transformers (default: "
                   "~/.cache/mistol/bench)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.set_defaults(run=cmd_bench)
    return p


def _list(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise MistolError(f"--{what}: {', '.join(bad) or 'nothing given'} (choose from {', '.join(allowed)})")
    return items


def cmd_bench(args) -> int:
    from ..bench.run import report_table, run_bench

    formats = _list(args.quant, FORMATS, "quant")
    engines = _list(args.engines, ENGINES, "engines")
    try:
        prompts = sorted({int(n) for n in args.prompts.split(",") if n.strip()})
    except ValueError:
        raise MistolError(f"--prompts: comma-separated token counts, not {args.prompts!r}") from None
    if not prompts or prompts[0] < 8:
        raise MistolError("--prompts: each prompt needs at least 8 tokens")
    if args.steps < 1:
        raise MistolError("--steps must be at least 1 (32 or more for a stable median)")
    if args.threads < 0:
        raise MistolError("--threads must be 0 (all cores) or more")
    cache_dir = args.cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mistol" / "bench"
    report = run_bench(args.shape, formats, engines, prompts, args.steps, args.threads, cache_dir)
    print(json.dumps(report, indent=2) if args.json else report_table(report))
    return 0
