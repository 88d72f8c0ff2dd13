"""Options several commands share, and what they turn into: an engine, a remote LLM,
sampling parameters.

Imported by every command's `register`, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse

DEFAULT_MODEL = "teknium/OpenHermes-2.5-Mistral-7B"
QUANT_CHOICES = ["auto", "f32", "bf16", "f16", "int8", "int4"]


def add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--model", "-m", required=required, default=None if required else DEFAULT_MODEL,
        help="a model directory (Hugging Face layout), a llama.cpp .gguf file or a Hugging Face repo id"
        + ("" if required else f" (default: {DEFAULT_MODEL})"),
    )
    p.add_argument("--quant", default="auto", choices=QUANT_CHOICES,
                   help="weight format. auto (the default): on CPU, int8 for checkpoints of 2 GiB or more "
                   "(a 7B model), exact f32 for smaller ones; a .gguf file's own types; bf16 on CUDA. "
                   "int8/int4: linear layers quantized as they load (llama.cpp Q8_0/Q4_0 blocks; "
                   "2x/4x less memory than bf16 and faster decoding on CPU), the rest in f32 on CPU")
    # The option's former name, still accepted; not shown in --help.
    p.add_argument("--dtype", dest="quant", choices=QUANT_CHOICES, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")


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


def load_engine(args, model: str | None = None):
    from ..engine import Engine

    if args.quant in ("int8", "int4"):  # f32 for what stays unquantized: small, and fast on CPU
        dtype = "f32" if args.device == "cpu" else "auto"
        return Engine.load(model or args.model, dtype=dtype, device=args.device, quant=args.quant)
    return Engine.load(model or args.model, dtype=args.quant, device=args.device)
