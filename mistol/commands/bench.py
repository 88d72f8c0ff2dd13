"""`mistol bench --shape 7b [--quant int8,int4,bf16] [--engines mistol,transformers,llama.cpp] [--json]`.

The measuring (worker processes, turns, the report) is in mistol/bench/; this module reads
the options and prints the report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from ..bench.engines import ENGINES, FORMATS
from ..bench.run import KQUANTS
from ..bench.shapes import LLAMA_CPP_BYTES_PER_WEIGHT, SHAPES
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
    p.add_argument("--threads", type=int, default=0,
                   help="threads for every engine, the same for all (default: mistol's default, one per core)")
    p.add_argument("--pages", default="huge", choices=["huge", "small", "both"],
                   help="memory pages for every engine's weights: transparent huge pages (asked for by each "
                   "engine: torch's allocator, glibc's malloc for llama.cpp), 4 KiB pages, or both, measured in "
                   "turn (default: huge)")
    p.add_argument("--gguf", type=Path, action="append", default=None, metavar="FILE",
                   help="measure mistol and llama.cpp on this GGUF file (repeatable) instead of the shape's "
                   "random models")
    p.add_argument("--kquants", nargs="?", const=",".join(KQUANTS), default=None, metavar="TYPES",
                   help=f"measure mistol and llama.cpp on GGUF files of the shape made by llama.cpp's own "
                   f"quantizer from an F16 file (default types: {','.join(KQUANTS)})")
    p.add_argument("--cache-dir", "--gguf-dir", dest="cache_dir", type=Path, default=None,
                   help="where the model files are written and kept for the next run: GGUF files for llama.cpp, "
                   "a safetensors checkpoint per float format for mistol and transformers (default: "
                   "~/.cache/mistol/bench)")
    p.add_argument("--no-bf16", action="store_true",
                   help="mistol leaves this CPU's bf16 instructions and AMX tiles unused: prompts are multiplied "
                   "by its int8-activation kernels at every length, as on a CPU without AVX512-BF16 or AMX "
                   "(llama.cpp's Q4_0/Q8_0 kernels use int8 dot products either way)")
    p.add_argument("--busy-core", action="store_true",
                   help="also decode each mistol model with one core kept busy (a `yes` running): its default "
                        "threads against 1 and 2, taking turns (three copies of the model in memory)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.set_defaults(run=cmd_bench)
    return p


def _list(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise MistolError(f"--{what}: {', '.join(bad) or 'nothing given'} (choose from {', '.join(allowed)})")
    return items


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise MistolError(f"cannot write the benchmark's model files in {directory}: {e.strerror or e} "
                          "(give --cache-dir DIR, or set XDG_CACHE_HOME)") from None


def _gguf_argument(path: Path) -> Path:
    from ..weights.gguf_file import GGUFFile

    if not path.is_file():
        raise MistolError(f"--gguf {path}: no such file")
    GGUFFile(path).config()  # a file neither engine could run fails here, in one line
    return path.resolve()


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
    if not args.gguf:  # the shape's models (or --kquants' files) are written there: said once, before measuring
        _check_writable(cache_dir)
    pages = ["huge", "small"] if args.pages == "both" else [args.pages]
    ggufs = None
    if args.gguf and args.kquants is not None:
        raise MistolError("--gguf and --kquants: give one of them")
    if args.gguf:
        ggufs = [_gguf_argument(path) for path in args.gguf]
    elif args.kquants is not None:  # (`--kquants=` is nothing given, not the shape's own models)
        ftypes = _list(args.kquants, tuple(LLAMA_CPP_BYTES_PER_WEIGHT), "kquants")
        if importlib.util.find_spec("llama_cpp") is None:
            raise MistolError("--kquants needs llama.cpp's quantizer: pip install llama-cpp-python")
        from ..bench.run import default_threads, kquant_files

        try:
            ggufs = kquant_files(cache_dir, args.shape, ftypes, args.threads or default_threads(),
                                 lambda text: print(text, file=sys.stderr, flush=True))
        except OSError as e:
            raise MistolError(f"--kquants: {e}") from None
    if args.no_bf16:
        os.environ["MISTOL_BF16_PREFILL"] = "0"  # (read by mistol's engine processes)
        os.environ["MISTOL_AMX"] = "0"  # (AMX comes with bf16: its int8 tiles too)
    report = run_bench(args.shape, formats, engines, prompts, args.steps, args.threads, cache_dir, pages, ggufs,
                       busy_core=args.busy_core)
    print(json.dumps(report, indent=2) if args.json else report_table(report))
    return 0
