"""Options several commands share, and what they turn into: an engine, a remote LLM,
sampling parameters.

Imported by every command's `register`, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_MODEL = "teknium/OpenHermes-2.5-Mistral-7B"
MODEL_HELP = ("demo (a tiny arithmetic model inside mistol: works offline), a model directory (Hugging Face "
              "layout), a llama.cpp .gguf file, or a Hugging Face repo id (downloaded once)")
QUANT_CHOICES = ["auto", "f32", "bf16", "f16", "int8", "int4"]


def add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--model", "-m", required=required, default=None if required else DEFAULT_MODEL,
        help=MODEL_HELP + ("" if required else f" (default: {DEFAULT_MODEL}, a 14 GB download)"),
    )
    p.set_defaults(prepare=fetch_models)
    p.add_argument("--download", action="store_true",
                   help="download a Hugging Face model larger than 1 GiB without asking first")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the model (default: $MISTOL_THREADS, else one per idle core)")
    p.add_argument("--quant", default="auto", choices=QUANT_CHOICES,
                   help="weight format. auto (the default): on CPU, int8 for checkpoints of 2 GiB or more "
                   "(a 7B model) where mistol's kernels have SIMD int8 code for the CPU (x86 AVX2, ARM NEON), "
                   "else floats; exact f32 for smaller ones; a .gguf file's own types; bf16 on CUDA, f16 on mps. "
                   "int8/int4: linear layers quantized as they load (llama.cpp Q8_0/Q4_0 blocks; "
                   "2x/4x less memory than bf16 and faster decoding on CPU), the rest in f32 on CPU")
    # The option's former name, still accepted; not shown in --help.
    p.add_argument("--dtype", dest="quant", choices=QUANT_CHOICES, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N or mps (Apple's GPU through PyTorch's Metal backend; untested) "
                   "(default: cpu)")
    p.add_argument("--kv-cache", default="auto", choices=["auto", "f16", "f32", "q8_0"],
                   help="what the KV cache holds (a 7B model's cache per 1k tokens of context in brackets). "
                   "f32: 4 bytes per value (256 MiB). "
                   "f16: 2 bytes per value (128 MiB). "
                   "q8_0: 1.0625 bytes per value, int8 with a float16 scale per 32 as llama.cpp's -ctk/-ctv q8_0 "
                   "(68 MiB; needs a head size that is a multiple of 32). "
                   "auto (the default): f16 for a quantized model on CPU, else the model's dtype")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"most tokens to generate (default: {max_tokens})")
    g.add_argument("--temperature", "-t", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="keep the K most likely tokens, 0 = off (default: 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, 1 = off (default: 0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="drop tokens below P x the top probability (default: 0.05)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default: 1.0)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")


def add_speculation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (same output, several tokens per forward pass)")
    g.add_argument("--no-speculate", action="store_true",
                   help="decode one token per pass (default: guesses copied from the context are verified "
                   "several at a time, while they are right often enough to pay)")
    g.add_argument("--draft", metavar="MODEL", default=None,
                   help="guess with this smaller model of the same tokenizer instead of the context")


def add_api_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("remote server (instead of the local engine)")
    g.add_argument("--api", metavar="URL", default=None,
                   help="use an OpenAI-compatible server (mistol serve, llama.cpp, vLLM, ollama), "
                   "e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--api-key", default=None, help="the server's API key")
    g.add_argument("--api-model", default=None, help="the model name on the server (default: its first)")


def sampling_params(args, stop_token_ids: list[int]):
    from ..sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
        stop_token_ids=stop_token_ids, stop=list(args.stop),
    )


def remote_llm(args):
    from ..remote import OpenAICompatibleLLM

    return OpenAICompatibleLLM(args.api, api_key=args.api_key, model=args.api_model)


def download_confirmation(args):
    """What `hub.resolve_model` calls before a large download: ask the person, or go ahead when
    they passed --download (or --yes), or stop with the ways out when nobody can be asked."""

    def confirm(repo_id: str, total: int, cache_dir: str) -> bool:
        what = f"{repo_id} is not downloaded yet: {total / 1e9:.1f} GB from Hugging Face into {cache_dir}"
        if args.download or getattr(args, "yes", False):
            print(f"mistol: {what}; downloading", file=sys.stderr)
            return True
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            from ..errors import MistolError

            raise MistolError(f"{what}. Pass --download to fetch it, or try --model demo (works offline)")
        try:
            answer = input(f"mistol: {what}. Download it now? [y/N] ")
        except EOFError:
            answer = ""
        return answer.strip().lower() in ("y", "yes")

    return confirm


def fetch_models(args) -> None:
    """Make sure the models the command will run are here, before it imports torch: a missing
    download is found (and asked about, or refused offline) within a second or two."""
    threads(args)  # a bad --threads or $MISTOL_THREADS stops here, before anything starts
    if getattr(args, "api", None):
        return
    from ..hub import resolve_model

    for spec in dict.fromkeys(models_to_run(args)):
        if spec:
            resolve_model(spec, confirm=download_confirmation(args))


def models_to_run(args) -> list[str | None]:
    """--model, unless `duo --model-a X --model-b Y` gives each agent its own, and --draft."""
    a, b = getattr(args, "model_a", None), getattr(args, "model_b", None)
    main = None if a and b else getattr(args, "model", None)
    return [main, a, b, getattr(args, "draft", None)]


def threads(args) -> int | None:
    """--threads, else $MISTOL_THREADS, else None (torch's default: one per core)."""
    from ..errors import MistolError

    value = args.threads if getattr(args, "threads", None) is not None else os.environ.get("MISTOL_THREADS")
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except ValueError:
        raise MistolError(f"MISTOL_THREADS={value!r}: expected a number of threads") from None
    if n < 1:
        raise MistolError(f"--threads {n}: expected 1 or more")
    return n


def apply_threads(args) -> int:
    """Set the threads the model runs on (torch's and the C kernels', which follow torch's)."""
    import torch

    n = threads(args)
    if n is not None:
        why = "--threads" if getattr(args, "threads", None) is not None else "MISTOL_THREADS"
    else:
        from ..threads import default_threads

        n, why = default_threads(torch.get_num_threads())
    torch.set_num_threads(n)
    if getattr(args, "verbose", False):
        print(f"mistol: {n} thread{'s' if n > 1 else ''} ({why})", file=sys.stderr)
    return n


def load_engine(args, model: str | None = None):
    """The engine of --model (or `model`), with the speculative decoding the options ask for."""
    apply_threads(args)
    engine = _load(args, model or args.model)
    from ..speculative import Speculation, check_draft

    if getattr(args, "no_speculate", False):
        engine.speculation = None
    elif getattr(args, "draft", None):
        draft = _load(args, args.draft, draft=True)
        check_draft(engine, draft)
        engine.speculation = Speculation(draft=draft)
    return engine


def _load(args, model: str, draft: bool = False):
    """One model's engine. --kv-cache applies to the draft model where its heads allow; where
    they do not, the draft keeps the default cache (its cache is small) and says so with -v."""
    from ..engine import Engine
    from ..errors import MistolError

    if args.quant in ("int8", "int4"):  # f32 for what stays unquantized: small, and fast on CPU
        dtype = "f32" if args.device == "cpu" else "auto"
        engine = Engine.load(model, dtype=dtype, device=args.device, quant=args.quant)
    else:
        engine = Engine.load(model, dtype=args.quant, device=args.device)
    kv_cache = getattr(args, "kv_cache", "auto")
    if kv_cache != "auto":
        from ..engine import KV_CACHE_DTYPES
        from ..model.kv_cache import check_kv_type

        try:
            check_kv_type(engine.config, KV_CACHE_DTYPES[kv_cache])
        except MistolError as e:
            if not draft:
                raise
            if getattr(args, "verbose", False):
                print(f"mistol: the draft model {model} keeps its default KV cache ({e})", file=sys.stderr)
            return engine
        engine.kv_dtype = KV_CACHE_DTYPES[kv_cache]
    return engine
