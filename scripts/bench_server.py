"""Aggregate decode tokens/s of `mistol serve` at 1, 2, 4 and 8 concurrent streams, in one run;
or, with --stall, how long a running stream waits while a long prompt arrives.

    python scripts/bench_server.py                    # a small random model (f32), under a minute
    python scripts/bench_server.py --shape 7b         # Mistral 7B's shape, random bf16 weights:
                                                      # 15 GB of RAM, about 5 minutes on 2 cores
    python scripts/bench_server.py --shape 0.5b --dtype int4  # Qwen2.5-0.5B's layers, int4
    python scripts/bench_server.py --model FILE.gguf  # a model of yours (any file `mistol serve` takes)
    python scripts/bench_server.py --stall --shape 1b # the longest gap between two tokens of a
                                                      # stream while a 2,000-token prompt arrives,
                                                      # with chunked prefill and with the prompt whole

--stall serves the model twice, with `--prefill-chunk` (default 256) and with a chunk longer
than the prompt (the prompt runs whole: what the server did before chunked prefill), and for
each prints the longest gap, the usual gap (median step) and one chunk's prefill time.

The model is built with random weights directly (no checkpoint, no transformers) and served
by a child process on a loopback port, so the clients here do not share its interpreter.
Each round sends N streaming completions at once (greedy, `ignore_eos`, the same length)
and measures the window in which all N decode together: from the moment the last stream
shows its first token to the moment the first one ends, aggregate tokens/s = the server's
decoded tokens in that window (its /health counter) / the window's length. Prefill and the
ramp up and down are left out. Numbers drift with the machine and collapse when other
processes share the cores: the rounds run as whole sweeps (--repeat), the best of each kept,
and every sweep's figure printed beside it; compare rows of the same run only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from mistol.errors import run_script

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, default dtype)
    "small": (512, 1536, 8, 8, 2, "f32"),
    "0.5b": (896, 4864, 24, 14, 2, "f32"),  # Qwen2.5-0.5B's layers (this script's vocabulary)
    "1b": (2048, 5632, 22, 32, 4, "f32"),  # TinyLlama 1.1B
    "7b": (4096, 14336, 32, 32, 8, "bf16"),  # Mistral 7B / OpenHermes 2.5
}
VOCAB = 32002


# -- the server (child process) --------------------------------------------------------------
def build_engine(shape: str, dtype_name: str):
    import torch
    from torch import nn

    from mistol.engine import DTYPES, Engine
    from mistol.model import ModelConfig, Transformer

    hidden, inter, layers, heads, kv_heads, _ = SHAPES[shape]
    config = ModelConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                         num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
                         # no window: the prompts and replies here are far shorter than Mistral's
                         # 4096, where windowed and full attention do the same work
                         sliding_window=None, max_position_embeddings=32768, rope_theta=10000.0)
    if dtype_name in ("int8", "int4"):  # quantized as `--quant` loads a model: the compiled decode layers
        from mistol.bench.models import mistol_model

        return Engine(mistol_model(config, dtype_name), openhermes_tokenizer(), name=f"random-{shape}")
    dtype = DTYPES[dtype_name]
    model = Transformer(config, device="meta")
    # Random weights, materialized directly: a block of normal noise tiled over each tensor
    # (fast, and every page really written, so memory traffic is that of real weights).
    noise = (torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    for name, param in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        t = torch.empty(param.shape, dtype=dtype)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            flat = t.view(-1)
            for start in range(0, flat.numel(), noise.numel()):
                chunk = flat[start : start + noise.numel()]
                chunk.copy_(noise[: chunk.numel()])
        setattr(module, attr, nn.Parameter(t, requires_grad=False))
    model.eval().requires_grad_(False)
    return Engine(model, openhermes_tokenizer(), name=f"random-{shape}")


def openhermes_tokenizer():
    """The OpenHermes 2.5 tokenizer (Mistral's SentencePiece model, shipped in mistral-common)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import make_openhermes_tokenizer_dir

    from mistol.tokenizer import Tokenizer

    return Tokenizer.from_dir(make_openhermes_tokenizer_dir(Path(tempfile.mkdtemp()) / "tok"))


def serve(args) -> None:
    import uvicorn

    from mistol.server import ServerOptions, create_app

    t0 = time.perf_counter()
    if args.model:
        from mistol.engine import Engine

        engine = Engine.load(args.model, progress=False)
    else:
        engine = build_engine(args.shape, args.dtype)
    print(f"built {engine.name} ({args.model or args.dtype}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr,
          flush=True)
    options = ServerOptions(model_name="random", max_batch=max(args.streams),
                            max_context=max(args.prompt_tokens, args.stall_prompt) + args.tokens + 8,
                            prefill_chunk=args.prefill_chunk)
    uvicorn.run(create_app(engine, options), host="127.0.0.1", port=args.port, log_level="warning")


# -- the clients (this process) --------------------------------------------------------------
def run_round(url: str, n: int, args) -> dict:
    rng = random.Random(n)
    prompts = [[1] + [rng.randrange(100, 30000) for _ in range(args.prompt_tokens - 1)] for _ in range(n)]
    lock = threading.Lock()
    started, finished = [0], [0]
    marks: dict[str, tuple[float, int]] = {}
    results: list[dict] = [{} for _ in range(n)]

    def counter() -> tuple[float, int]:
        return time.perf_counter(), httpx.get(url + "/health").json()["decode_tokens"]

    def stream(i: int) -> None:
        body = {"model": "random", "prompt": prompts[i], "max_tokens": args.tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        first = True
        with httpx.Client(timeout=None) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    results[i] = event["usage"]
                if first:
                    first = False
                    with lock:
                        started[0] += 1
                        if started[0] == n:
                            marks["all_started"] = counter()
        with lock:
            finished[0] += 1
            if finished[0] == 1:
                marks["first_done"] = counter()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    (ta, da), (tb, db) = marks["all_started"], marks["first_done"]
    tokens = sum(r["completion_tokens"] for r in results)
    return {"streams": n, "window_tokens": db - da, "window_s": tb - ta,
            "tok_s": (db - da) / (tb - ta) if tb > ta and db > da else float("nan"),
            "tokens": tokens, "wall_s": wall}


def stall_round(url: str, args) -> dict:
    """One stream decodes; after 10 of its tokens a long prompt arrives. The stream's gaps."""
    rng = random.Random(7)
    long_prompt = [1] + [rng.randrange(100, 30000) for _ in range(args.stall_prompt - 1)]
    chunk_prompt = [1] + [rng.randrange(100, 30000) for _ in range(min(args.prefill_chunk, args.stall_prompt) - 1)]
    start = time.perf_counter()  # one chunk's prefill, alone (plus one step and the HTTP round trip)
    httpx.post(url + "/v1/completions", json={"model": "random", "prompt": chunk_prompt, "max_tokens": 1},
               timeout=None).raise_for_status()
    chunk_s = time.perf_counter() - start
    sent = threading.Event()

    def long_request() -> None:
        sent.wait()
        httpx.post(url + "/v1/completions", json={"model": "random", "prompt": long_prompt, "max_tokens": 1},
                   timeout=None).raise_for_status()

    helper = threading.Thread(target=long_request)
    helper.start()
    body = {"model": "random", "prompt": [1, 500, 600], "max_tokens": args.tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    times: list[float] = []
    with httpx.Client(timeout=None) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())
                if len(times) == 10:
                    sent.set()
    helper.join()
    gaps = [b - a for a, b in zip(times, times[1:])]
    usual = sorted(gaps[:9])[4]
    return {"longest": max(gaps[9:]), "usual": usual, "chunk": chunk_s}


def stall(args, start_server) -> None:
    print(f"shape {args.shape} ({args.dtype}), a {args.stall_prompt}-token prompt arrives while one stream decodes "
          f"({args.tokens} tokens); {os.cpu_count()} CPUs, torch threads: default")
    rows = []
    for chunk in (args.prefill_chunk, args.stall_prompt + 1):
        child, url = start_server(chunk)
        try:
            r = stall_round(url, argparse.Namespace(**{**vars(args), "prefill_chunk": chunk}))
        finally:
            child.terminate()
            child.wait(30)
        label = f"chunks of {chunk}" if chunk <= args.stall_prompt else "whole prompt"
        rows.append((label, r))
        print(f"  {label}: longest gap {r['longest']:.2f} s", file=sys.stderr, flush=True)
    print(f"{'prefill':>16} {'longest gap':>12} {'usual step':>11} {'one chunk':>10} {'bound 2x(step+chunk)':>21}")
    for label, r in rows:
        bound = f"{2 * (r['usual'] + r['chunk']):.2f}s" if label.startswith("chunks") else "-"
        print(f"{label:>16} {r['longest']:>11.2f}s {r['usual']:>10.3f}s {r['chunk']:>9.2f}s {bound:>21}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="small")
    ap.add_argument("--dtype", choices=["f32", "bf16", "int8", "int4"], default=None,
                    help="default: f32, bf16 for 7b")
    ap.add_argument("--model", default=None,
                    help="serve this model (a GGUF file or a model directory, as `mistol serve` takes it) "
                         "instead of --shape's random one")
    ap.add_argument("--streams", default="1,2,4,8", help="concurrent streams per round (default: 1,2,4,8)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per stream (default: 128 small, 32 7b)")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default: 16)")
    ap.add_argument("--repeat", type=int, default=2, help="sweeps over the stream counts; best kept (default: 2)")
    ap.add_argument("--stall", action="store_true",
                    help="measure the gaps of a running stream while a long prompt arrives (see above)")
    ap.add_argument("--stall-prompt", type=int, default=2000, help="the long prompt's tokens (default: 2000)")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="the server's --prefill-chunk (default: 256)")
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    args.dtype = args.dtype or SHAPES[args.shape][5]
    args.tokens = args.tokens or (128 if args.shape == "small" else 32)
    if args.stall:
        args.tokens = max(args.tokens, 400)
    try:
        args.streams = sorted({int(s) for s in str(args.streams).split(",")})
    except ValueError:
        ap.error(f"--streams: comma-separated counts, not {args.streams!r}")
    if args.streams[0] < 1:
        ap.error("--streams: each count must be at least 1")
    if args.model and not Path(args.model).exists():
        ap.error(f"--model: no such file or directory: {args.model}")
    if args.serve:
        return serve(args)
    if args.tokens <= max(args.streams):
        ap.error("--tokens must exceed the largest stream count (streams join one per step)")

    def start_server(prefill_chunk: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        child = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(port), "--shape", args.shape,
                                  "--dtype", args.dtype, "--streams", ",".join(map(str, args.streams)),
                                  "--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens),
                                  "--stall-prompt", str(args.stall_prompt), "--prefill-chunk", str(prefill_chunk),
                                  *(["--model", args.model] if args.model else [])])
        url = f"http://127.0.0.1:{port}"
        while True:
            if child.poll() is not None:
                sys.exit(f"the server exited with status {child.returncode}")
            try:
                httpx.get(url + "/health", timeout=1)
                return child, url
            except httpx.TransportError:
                time.sleep(0.5)

    if args.stall:
        return stall(args, start_server)
    child, url = start_server(args.prefill_chunk)
    try:
        from importlib.metadata import version

        print(f"{args.model or f'shape {args.shape} ({args.dtype})'}, {args.prompt_tokens}-token prompts, "
              f"{args.tokens} tokens per "
              f"stream, torch {version('torch')}, {os.cpu_count()} CPUs, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
        run_round(url, 1, argparse.Namespace(prompt_tokens=args.prompt_tokens, tokens=min(args.tokens, 8)))  # warm up
        rounds: dict[int, list[dict]] = {n: [] for n in args.streams}
        for sweep in range(args.repeat):  # whole sweeps, so that drift touches every row alike
            for n in args.streams:
                r = run_round(url, n, args)
                rounds[n].append(r)
                print(f"  sweep {sweep + 1}: {n} streams {r['tok_s']:.2f} tok/s", file=sys.stderr, flush=True)
        print(f"best of {args.repeat} sweeps:")
        print(f"{'streams':>7} {'agg tok/s':>10} {'per stream':>10} {'vs 1':>6} {'window':>12} {'all sweeps':>24}")
        base = None
        for n in args.streams:
            r = max(rounds[n], key=lambda x: x["tok_s"])
            base = base or (r["tok_s"] if n == 1 else None)
            ratio = f"{r['tok_s'] / base:5.2f}x" if base else "     -"
            every = " ".join(f"{x['tok_s']:.2f}" for x in rounds[n])
            print(f"{n:>7} {r['tok_s']:>10.2f} {r['tok_s'] / n:>10.2f} {ratio:>6} "
                  f"{r['window_tokens']:>4} in {r['window_s']:>5.2f}s {every:>24}", flush=True)
    finally:
        child.terminate()
        child.wait(30)


if __name__ == "__main__":
    run_script(main)
