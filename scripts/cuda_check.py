"""Check mistol on a CUDA GPU in one run: exactness, memory bandwidth, decode speed against it.

    python scripts/cuda_check.py [--out results.json] [--shape 7b|tiny] [--device cuda|cpu]
                                 [--max-minutes 8] [--compile auto|inductor|eager|off]

Parts, in order (each reports on its own; a failure in one does not stop the others; parts
left when `--max-minutes` has passed are skipped and say so):

- bandwidth: the device's memory read bandwidth (a large reduction, timed with CUDA events)
  and copy bandwidth; every decode figure below is also given as a share of the ceiling it
  implies (bytes one step reads: weights + keys and values, divided by the read bandwidth).
- parity_f32_and_bf16: a random Mistral checkpoint (sliding window 16, GQA) saved by
  transformers: logits of both engines in float32 and bf16, greedy generation past the
  window, CUDA graphs against eager steps, batched decode against sessions alone.
- quantized_layers: int8/int4 `QuantizedLinear` on the device against the same layer's
  dequantized weight, and one decode-sized product (1 row) timed against bf16, with the
  route mistol takes (`backend.quantized_route`) and torch's `_weight_int8pack_mm` beside it.
- sampling: `Session.generate` with temperature > 0 and a seed, and `sample_next` on the
  device's logits with a generator on the device: ids in range, same seed, same ids.
- mistol_single: one stream of `--shape` in bf16 (random weights): decode tok/s with CUDA
  graphs and eagerly, time to first token after a warm-up of the same prompt length.
- mistol_batched: 1, 4 and 16 streams per step (tok/s in total), and whether the step
  replayed CUDA graphs (counted by the profiler: cudaGraphLaunch against kernel launches).
- transformers_eager: transformers' model, DynamicCache, eager attention path.
- transformers_static_compiled: a StaticCache and its one-token forward under
  `torch.compile(mode="reduce-overhead", fullgraph=True)` (transformers' fastest documented
  setup; on a CPU compiling is off unless `--compile` asks for it).
- summary: each decode figure as a share of its bandwidth ceiling, mistol over transformers.

`--device cpu --shape tiny` goes through every part in seconds (RAM bandwidth), so the
script itself is tested without a GPU (tests/test_cuda_check.py).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mistol.engine import Engine, decode_step  # noqa: E402
from mistol.sampling import SamplingParams, sample_next  # noqa: E402

# Per shape: prompt tokens, timed decode steps, timed batched steps, session context,
# bytes the bandwidth test reads, the quantized layer's [out, in].
SIZES = {
    "7b": dict(prompt=512, steps=32, batch_steps=16, context=1024, bandwidth_bytes=4 << 30, layer=(14336, 4096)),
    "tiny": dict(prompt=32, steps=4, batch_steps=2, context=128, bandwidth_bytes=256 << 20, layer=(512, 256)),
}
BATCHES = (1, 4, 16)
TARGET_SHARE = 0.75  # of the bandwidth ceiling, for one stream

RESULTS: dict = {}
PARTS: dict = {}  # name -> the part's function, in the order they run


class Run:
    """What every part shares: the device, the shape's sizes, the deadline, the output file."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.shape = args.shape
        self.size = SIZES[args.shape]
        self.deadline = time.perf_counter() + 60 * args.max_minutes
        self.out = args.out
        self.compile = args.compile if args.compile != "auto" else ("inductor" if self.cuda else "off")
        self.models: dict = {}  # the shape's mistol model, built once for several parts

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        self.models.clear()
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def save(self) -> None:
        if self.out:  # after every part: a run cut short still leaves what it measured
            self.out.write_text(json.dumps(RESULTS, indent=2))


RUN: Run | None = None


def part(name, always: bool = False):
    """A part of the check: its result (or error) goes to RESULTS[name] and is printed; once
    `--max-minutes` has passed it is skipped, unless `always` (an instant one)."""
    def wrap(fn):
        def run(*args):
            t0 = time.perf_counter()
            if t0 > RUN.deadline and not always:
                RESULTS[name] = {"ok": False, "skipped": "--max-minutes reached before this part"}
            else:
                try:
                    RESULTS[name] = {"ok": True, **fn(*args)}
                except Exception as e:
                    RESULTS[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            RESULTS[name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(name, json.dumps(RESULTS[name], indent=1), flush=True)
            RUN.save()
        PARTS[name] = run
        return run
    return wrap


def median_seconds(fn, reps: int) -> float:
    """Median wall time of `fn()` (the device synchronized around each call)."""
    times = []
    for _ in range(reps):
        RUN.sync()
        t0 = time.perf_counter()
        fn()
        RUN.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- memory bandwidth ---------------------------------------------------------------------------
@part("bandwidth")
def bandwidth() -> dict:
    n = RUN.size["bandwidth_bytes"] // 4
    x = torch.ones(n, dtype=torch.float32, device=RUN.device)
    y = torch.empty_like(x)

    def timed(fn, reps=10) -> float:
        fn()  # warm-up
        if not RUN.cuda:
            return median_seconds(fn, reps)
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    read_s = timed(lambda: torch.sum(x))
    copy_s = timed(lambda: y.copy_(x))
    out = {"bytes": 4 * n, "timer": "cuda events" if RUN.cuda else "perf_counter",
           "read_GB_s": 4 * n / read_s / 1e9, "copy_GB_s": 2 * 4 * n / copy_s / 1e9}  # a copy reads and writes
    if RUN.cuda:
        out["device"] = torch.cuda.get_device_name(RUN.device)
    x = y = None  # free the device memory
    RUN.free()
    return out


def read_bandwidth() -> float | None:
    """Bytes per second the bandwidth part measured (None if it did not run)."""
    part_result = RESULTS.get("bandwidth", {})
    return part_result["read_GB_s"] * 1e9 if part_result.get("ok") else None


def step_bytes(streams: int, context: int, weights_fmt: str = "bf16", kv_bytes: int = 2) -> float:
    """Bytes one decode step of the shape reads: the weights once, each stream's keys and values."""
    from mistol.bench.shapes import bytes_per_token, model_config

    config = model_config(RUN.shape)
    weights = bytes_per_token(config, weights_fmt, 0)
    kv = bytes_per_token(config, weights_fmt, context, kv_bytes) - weights
    return weights + streams * kv


def share_of_ceiling(tok_s: float, streams: int, context: int) -> dict:
    """tok/s (all streams together) as a share of what the read bandwidth allows."""
    bw = read_bandwidth()
    if bw is None:
        return {"share_of_ceiling": None}
    ceiling = streams * bw / step_bytes(streams, context)
    return {"ceiling_tok_s": ceiling, "share_of_ceiling": tok_s / ceiling}


# -- exactness ---------------------------------------------------------------------------------
def make_checkpoint(path: Path) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                           num_attention_heads=8, num_key_value_heads=2, sliding_window=16,
                           max_position_embeddings=512, tie_word_embeddings=False)
    MistralForCausalLM(config).save_pretrained(path)
    return path


@part("parity_f32_and_bf16")
def parity() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return parity_of(make_checkpoint(Path(tmp) / "mistral"))


def parity_of(model_dir: Path) -> dict:
    from transformers import MistralForCausalLM

    device = RUN.device
    out = {}
    ids = torch.randint(3, 1000, (1, 60), generator=torch.Generator().manual_seed(1))
    for dtype_name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        ref = MistralForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").to(device).eval()
        engine = Engine.load(model_dir, dtype=dtype_name, device=str(device), progress=False)
        with torch.inference_mode():
            ref_logits = ref(ids.to(device)).logits[0].float()
            session = engine.new_session(max_context=256)
            ours = session.feed(ids[0].tolist(), all_logits=True).float()
        err = (ours - ref_logits).abs().max().item()
        scale = ref_logits.abs().max().item()
        out[f"{dtype_name}_max_abs_err"] = err
        out[f"{dtype_name}_rel_err"] = err / scale
        out[f"{dtype_name}_top1_agree"] = (ours.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        if dtype_name == "f32":
            with torch.inference_mode():
                gen = ref.generate(ids[:, :8].to(device), max_new_tokens=40, do_sample=False, min_new_tokens=40)[0, 8:]
            mine = list(engine.new_session(max_context=256).generate(ids[0, :8].tolist(),
                                                                    SamplingParams(temperature=0, max_tokens=40)))
            out["greedy_40_identical"] = mine == gen.tolist()
            # CUDA graphs (the default) against eager steps: 300 greedy tokens, several key buckets
            # (on a CPU both runs take the same path: a few tokens only).
            n_graphed = 300 if RUN.cuda else 40
            params = SamplingParams(temperature=0, max_tokens=n_graphed)
            engine.cuda_graphs = False
            eager = list(engine.new_session(max_context=400).generate(ids[0, :20].tolist(), params))
            engine.cuda_graphs = True
            session = engine.new_session(max_context=400)
            graphed = list(session.generate(ids[0, :20].tolist(), params))
            out["graphs_equal_eager"] = graphed == eager
            out["graphs_vs_eager_tokens"] = n_graphed
            out["graph_buckets"] = sorted(session._graphed._graphs) if session._graphed else []
            # Three sessions decoded in one batch equal each decoded alone.
            sessions = [engine.new_session(max_context=256) for _ in range(3)]
            for n, s in enumerate(sessions):
                s.feed(ids[0, : 10 + 7 * n].tolist())
            with torch.inference_mode():
                batched = decode_step(sessions, [5, 6, 7])
                alone = [engine.new_session(max_context=256) for _ in range(3)]
                rows = []
                for n, s in enumerate(alone):
                    s.feed(ids[0, : 10 + 7 * n].tolist())
                    rows.append(decode_step([s], [5 + n])[0])
            out["batched_vs_alone_max_err"] = (batched - torch.stack(rows)).abs().max().item()
        ref = engine = None  # free the device memory
        RUN.free()
    out["pass"] = (out["f32_max_abs_err"] < 1e-3 and out["greedy_40_identical"] and out["bf16_top1_agree"] > 0.9
                   and out["graphs_equal_eager"])
    return out


# -- quantized layers --------------------------------------------------------------------------
@part("quantized_layers")
def quantized() -> dict:
    from mistol.model import backend
    from mistol.quant import quantize_linear

    device = RUN.device
    out = {}
    w = torch.randn(1000, 512) * 0.02
    x = torch.randn(5, 512)
    for fmt in ("int8", "int4"):
        layer = quantize_linear(w, fmt)
        reference = x @ layer.dequantize().T
        on_device = layer.to(device)
        out[f"{fmt}_route"] = backend.quantized_route(x.shape[0], device, fmt)
        out[f"{fmt}_max_err_vs_dequantized"] = (on_device(x.to(device)).cpu() - reference).abs().max().item()
        out[f"{fmt}_bf16_max_err"] = (on_device(x.to(device).bfloat16()).float().cpu() - reference).abs().max().item()
    # On a GPU the layer multiplies by its dequantized weight: exact to float rounding. A CPU's
    # kernels quantize the activations to int8 per block of 32 (about 1% of the output's scale).
    tolerance = 1e-4 if RUN.cuda else 0.02 * reference.abs().max().item()
    out["pass"] = all(out[f"{fmt}_max_err_vs_dequantized"] < tolerance for fmt in ("int8", "int4"))
    out["speed_1_row"] = quantized_speed()
    return out


def quantized_speed() -> dict:
    """One row times a [out, in] weight (a decode step's product): bf16, int8, int4 in mistol's
    layer, and torch's int8 weight-only kernel (per-channel scales) for comparison."""
    from mistol.model import backend
    from mistol.quant import quantize_linear

    device = RUN.device
    n, k = RUN.size["layer"]
    w = (torch.randn(n, k) * 0.02).bfloat16()
    x = torch.randn(1, k, dtype=torch.bfloat16, device=device)
    reps = 50 if RUN.cuda else 5
    bw = read_bandwidth()
    out = {"shape_out_in": [n, k]}

    def timed(name: str, fn, weight_bytes: int, path: str) -> None:
        fn()
        seconds = median_seconds(fn, reps)
        out[name] = {"path": path, "us": seconds * 1e6, "weight_GB_s": weight_bytes / seconds / 1e9}
        if bw is not None:
            out[name]["share_of_bandwidth"] = weight_bytes / seconds / bw

    w_dev = w.to(device)
    timed("bf16", lambda: torch.nn.functional.linear(x, w_dev), w.numel() * 2, "torch F.linear")
    for fmt in ("int8", "int4"):
        layer = quantize_linear(w, fmt).to(device)
        route = backend.quantized_route(1, device, fmt)
        path = {"dequantized": "dequantize to the input's dtype by slabs, then matmul",
                "kernels": "mistol C kernels", "bf16": "dequantize to bf16, matmul"}.get(route, route)
        timed(fmt, lambda: layer(x), layer.weight_nbytes, f"mistol QuantizedLinear: {path}")
        layer = None  # free the device memory
    try:  # torch's own weight-only int8 kernel, for comparison (not used by mistol)
        scales = (w.float().abs().amax(1) / 127).clamp(min=1e-8)
        w8 = (w.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8).to(device)
        s = scales.to(device, torch.bfloat16)
        timed("torch_weight_int8pack_mm", lambda: torch._weight_int8pack_mm(x, w8, s), w8.numel() + 2 * n,
              "torch._weight_int8pack_mm (per-channel scales)")
    except Exception as e:  # noqa: BLE001  (an op a build may lack)
        out["torch_weight_int8pack_mm"] = {"error": f"{type(e).__name__}: {e}"}
    for fmt in ("int8", "int4"):
        out[f"{fmt}_speedup_over_bf16"] = out["bf16"]["us"] / out[fmt]["us"]
    return out


# -- the shape's mistol model ------------------------------------------------------------------
def prompt_ids() -> list[int]:
    n = RUN.size["prompt"]
    return [1] + [int(t) for t in torch.randint(300, 32000, (n - 1,), generator=torch.Generator().manual_seed(0))]


def mistol_engine() -> Engine:
    if "engine" not in RUN.models:
        from mistol.bench.models import mistol_model
        from mistol.bench.shapes import model_config

        t0 = time.perf_counter()
        engine = Engine(mistol_model(model_config(RUN.shape), "bf16", device=str(RUN.device)))
        engine.speculation = None  # one token per step: what the timings below mean
        RUN.models["engine"] = engine
        RUN.models["build_s"] = time.perf_counter() - t0
    return RUN.models["engine"]


def mistol_setup(engine: Engine, session) -> dict:
    cache = session.cache
    return {"engine": "mistol", "dtype": str(engine.model.dtype), "device": str(engine.model.device),
            "cache": f"KVCache {cache.dtype}, {cache.capacity} slots preallocated" + (
                f", rolling window {cache.window}" if cache.window else ""),
            "compile": False, "cuda_graphs": engine.backend.graphs, "speculation": engine.speculation is not None}


def timed_decode(prefill, step, prompt: list[int], steps: int) -> dict:
    """Time to first token of `prompt` after a warm-up prefill of the same length, then
    `steps` single-token steps (each ends with the next token on the host)."""
    token = int(prefill(prompt).argmax())  # warm-up: the same shape as the timed prefill
    for _ in range(3):
        token = int(step(token).argmax())
    RUN.sync()
    t0 = time.perf_counter()
    token = int(prefill(prompt).argmax())
    ttft = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        token = int(step(token).argmax())
        times.append(time.perf_counter() - t0)
    tok_s = 1 / statistics.median(times)
    context = len(prompt) + steps // 2
    return {"ttft_s": ttft, "prompt_tokens": len(prompt), "decode_tok_s": tok_s, "decode_best_tok_s": 1 / min(times),
            **share_of_ceiling(tok_s, 1, context)}


@part("mistol_single")
def mistol_single() -> dict:
    engine = mistol_engine()
    prompt, size = prompt_ids(), RUN.size
    out = {"build_s": RUN.models["build_s"], "step_bytes": step_bytes(1, len(prompt))}
    state = {}

    def prefill(ids):  # one session, emptied: its CUDA graphs are captured once, in the warm-up
        if "s" not in state:
            state["s"] = engine.new_session(max_context=size["context"])
        state["s"].reset()
        return state["s"].feed(ids)

    def step(token):
        return decode_step([state["s"]], [token])[0]

    with torch.inference_mode():
        engine.cuda_graphs = False
        out["eager"] = timed_decode(prefill, step, prompt, size["steps"])
        out["eager"]["setup"] = mistol_setup(engine, state["s"])
        engine.cuda_graphs = True
        state.clear()
        out["graphs"] = timed_decode(prefill, step, prompt, size["steps"])
        out["graphs"]["setup"] = mistol_setup(engine, state["s"])
        out["graphs"]["launches"] = one_step_launches(step)
    best = out["graphs"]
    out["target_share"] = TARGET_SHARE
    out["meets_target"] = None if best["share_of_ceiling"] is None else best["share_of_ceiling"] >= TARGET_SHARE
    return out


def step_launches(fn) -> dict | None:
    """CUDA graph replays and kernel launches of one call, as the profiler counts them."""
    if not RUN.cuda:
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        RUN.sync()
    names = [e.name for e in prof.events()]
    return {"cudaGraphLaunch": sum("cudaGraphLaunch" in n for n in names),
            "kernel_launches": sum(n.startswith(("cudaLaunchKernel", "cuLaunchKernel")) for n in names)}


def one_step_launches(step) -> dict | None:
    try:
        return step_launches(lambda: step(5))
    except Exception as e:  # noqa: BLE001  (the measurement stands without the count)
        return {"error": f"{type(e).__name__}: {e}"}


def replays_graphs(launches: dict | None, expected: bool) -> bool:
    """Whether a step replayed CUDA graphs: as the profiler saw it, else as the code says."""
    return launches["cudaGraphLaunch"] > 0 if launches and "cudaGraphLaunch" in launches else expected


@part("mistol_batched")
def mistol_batched() -> dict:
    engine = mistol_engine()
    engine.cuda_graphs = True
    prompt, size = prompt_ids(), RUN.size
    out = {}
    with torch.inference_mode():
        for batch in BATCHES:
            sessions = [engine.new_session(max_context=size["context"]) for _ in range(batch)]
            for s in sessions:
                s.feed(prompt)
            tokens = [5] * batch
            for _ in range(2):
                decode_step(sessions, tokens)
            seconds = median_seconds(lambda: decode_step(sessions, tokens), size["batch_steps"])
            tok_s = batch / seconds
            launches = one_step_launches(lambda token: decode_step(sessions, [token] * batch))
            # Today's engine: one session's step replays its graph; several run the PyTorch layers.
            graphs = replays_graphs(launches, engine.backend.graphs and batch == 1)
            out[f"batch{batch}"] = {
                "tok_s_total": tok_s, "step_ms": seconds * 1e3, "cuda_graphs": graphs,
                "path": "CUDA graph replay" if graphs else "eager PyTorch layers", "launches": launches,
                **share_of_ceiling(tok_s, batch, len(prompt) + 3 + size["batch_steps"] // 2)}
            sessions = None
            RUN.sync()
    out["graphs_per_batch_bucket"] = all(out[f"batch{b}"]["cuda_graphs"] for b in BATCHES if b > 1)
    if not out["graphs_per_batch_bucket"]:
        out["note"] = "several streams per step run eagerly (no CUDA graphs per batch size)"
    return out


# -- sampling on the device --------------------------------------------------------------------
@part("sampling")
def sampling() -> dict:
    engine = mistol_engine()
    vocab = engine.config.vocab_size
    prompt = prompt_ids()[:16]
    out = {"device": str(RUN.device)}
    for name, params in (("filters_default", SamplingParams(temperature=0.8, seed=1234, max_tokens=12)),
                         ("filters_off", SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0,
                                                        seed=99, max_tokens=12))):
        runs = [list(engine.new_session(max_context=64).generate(prompt, params)) for _ in range(2)]
        out[f"generate_{name}"] = {"ids": runs[0], "in_range": all(0 <= t < vocab for t in runs[0]),
                                   "same_seed_same_ids": runs[0] == runs[1], "length": len(runs[0])}
    # sample_next on the device's logits with a generator on the device
    with torch.inference_mode():
        logits = engine.new_session(max_context=64).feed(prompt)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    draws = []
    for _ in range(2):
        generator = torch.Generator(device=RUN.device).manual_seed(7)
        draws.append([sample_next(logits, params, generator) for _ in range(8)])
    out["sample_next_device_generator"] = {"logits_device": str(logits.device), "generator_device": str(generator.device),
                                           "ids": draws[0], "in_range": all(0 <= t < vocab for t in draws[0]),
                                           "same_seed_same_ids": draws[0] == draws[1]}
    checks = [out[k] for k in out if k.startswith(("generate_", "sample_next"))]
    out["pass"] = all(c["in_range"] and c["same_seed_same_ids"] for c in checks)
    return out


# -- transformers ------------------------------------------------------------------------------
def transformers_reference(full_attention: bool = False):
    """transformers' model of the shape in bf16; `full_attention` drops a sliding window that
    the check's contexts never reach (the same logits): transformers' sliding-window
    StaticCache keeps its length as a Python int, which a compiled step then guards on."""
    from mistol.bench.models import transformers_model
    from mistol.bench.shapes import hf_config

    config = hf_config(RUN.shape)
    if full_attention and (config.get("sliding_window") or 1 << 62) >= RUN.size["context"]:
        config = {**config, "sliding_window": None}
    with torch.device(RUN.device):
        return transformers_model(config, "bf16")


def compile_counts() -> dict:
    """Graphs torch.compile has made in this process so far, and the compiled graphs that
    inductor ran without CUDA graphs (`cudagraph_skips`)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def cache_argument(model) -> str:
    """The forward's name for the cache: `cache` (transformers 5) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def static_cache(model, slots: int):
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=slots)
    except TypeError:  # transformers 4: the batch size, device and dtype up front
        return StaticCache(config=model.config, max_batch_size=1, max_cache_len=slots, device=RUN.device,
                           dtype=model.dtype)


@part("transformers_eager")
def transformers_eager() -> dict:
    from transformers import DynamicCache

    RUN.free()  # mistol's model leaves the device first
    ref = transformers_reference()
    arg = cache_argument(ref)
    cache = {}

    def prefill(ids):
        cache["c"] = DynamicCache()
        return ref(input_ids=torch.tensor([ids], device=RUN.device), use_cache=True, logits_to_keep=1,
                   **{arg: cache["c"]}).logits[0, -1]

    def step(token):
        return ref(input_ids=torch.tensor([[token]], device=RUN.device), use_cache=True, logits_to_keep=1,
                   **{arg: cache["c"]}).logits[0, -1]

    with torch.inference_mode():
        out = timed_decode(prefill, step, prompt_ids(), RUN.size["steps"])
    out["setup"] = {"engine": "transformers", "dtype": str(ref.dtype), "cache": "DynamicCache", "compile": False,
                    "cuda_graphs": False, "attention": ref.config._attn_implementation,
                    "sliding_window": getattr(ref.config, "sliding_window", None)}
    ref = None  # free the device memory
    RUN.free()
    return out


@part("transformers_static_compiled")
def transformers_static() -> dict:
    """transformers' fastest documented single-stream setup: a StaticCache (fixed shapes) and
    the one-token forward compiled with CUDA graphs (`mode="reduce-overhead"`); the prompt
    runs uncompiled, as its shape differs."""
    from mistol.bench.shapes import hf_config

    RUN.free()  # mistol's model leaves the device first
    ref = transformers_reference(full_attention=True)
    prompt, size = prompt_ids(), RUN.size
    cache = static_cache(ref, size["context"])
    arg = cache_argument(ref)
    # transformers 4 takes the slots to write (`cache_position`); 5 counts them in the cache
    takes_slots = "cache_position" in inspect.signature(ref.forward).parameters
    forward = ref.forward
    compiled = RUN.compile != "off"
    kwargs = {"mode": "reduce-overhead"} if RUN.compile == "inductor" else {"backend": RUN.compile}
    if compiled:
        forward = torch.compile(ref.forward, fullgraph=True, **kwargs)
    state = {"position": 0}

    def run(fn, ids):
        n = len(ids)
        positions = torch.arange(state["position"], state["position"] + n, device=RUN.device)
        state["position"] += n
        extra = {"cache_position": positions} if takes_slots else {}
        return fn(input_ids=torch.tensor([ids], device=RUN.device), position_ids=positions[None], use_cache=True,
                  logits_to_keep=1, **{arg: cache}, **extra).logits[0, -1]

    def prefill(ids):
        cache.reset()
        state["position"] = 0
        return run(ref.forward, ids)

    def step(token):
        if compiled and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten
        return run(forward, [token]).clone()

    t0 = time.perf_counter()
    before = compile_counts()
    with torch.inference_mode():
        step(int(prefill(prompt).argmax()))  # the compilation happens here
        first_s = time.perf_counter() - t0
        compiled_first = compile_counts()
        out = timed_decode(prefill, step, prompt, size["steps"])
        after = compile_counts()
        out["launches"] = one_step_launches(step)
    out["first_step_with_compile_s"] = first_s
    # More than 0 while timing: recompiles at some step, and the figure is not a compiled step's.
    out["graphs_compiled_first_step"] = compiled_first["graphs"] - before["graphs"]
    out["graphs_compiled_while_timing"] = after["graphs"] - compiled_first["graphs"]
    out["cudagraph_skips"] = after["cudagraph_skips"] - before["cudagraph_skips"]
    out["setup"] = {"engine": "transformers", "dtype": str(ref.dtype), "cache": f"StaticCache, {size['context']} slots",
                    "compile": f"torch.compile({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}, fullgraph=True)"
                    if compiled else False,
                    "cuda_graphs": replays_graphs(out["launches"], RUN.compile == "inductor" and RUN.cuda),
                    "attention": ref.config._attn_implementation,
                    "sliding_window": getattr(ref.config, "sliding_window", None)}
    window = hf_config(RUN.shape).get("sliding_window")
    if window and getattr(ref.config, "sliding_window", None) is None:
        out["window_note"] = (f"sliding window {window} dropped: the contexts here stay below it (same logits), and "
                              "a compiled step over a sliding-window StaticCache guards on its length")
    if not compiled:
        out["note"] = "torch.compile off on a CPU (--compile inductor|eager turns it on): the static cache runs eagerly"
    ref = cache = forward = None  # free the device memory
    RUN.free()
    return out


@part("summary", always=True)
def summary() -> dict:
    def get(*keys):
        value = RESULTS
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    rows = {
        "mistol_graphs": get("mistol_single", "graphs"),
        "mistol_eager": get("mistol_single", "eager"),
        "transformers_eager": get("transformers_eager"),
        "transformers_static_compiled": get("transformers_static_compiled"),
    }
    out = {"read_GB_s": get("bandwidth", "read_GB_s"), "single_stream": {}, "setups": {}, "batched_tok_s": {}}
    for name, row in rows.items():
        if row and row.get("decode_tok_s") is not None:
            out["single_stream"][name] = {k: row.get(k) for k in ("decode_tok_s", "share_of_ceiling", "ttft_s")}
            setup = row.get("setup", {})
            out["setups"][name] = (f"{setup.get('dtype')}, {setup.get('cache')}, compile "
                                   f"{setup.get('compile') or 'off'}, CUDA graphs {'on' if setup.get('cuda_graphs') else 'off'}")
    for batch in BATCHES:
        row = get("mistol_batched", f"batch{batch}")
        if row:
            out["batched_tok_s"][batch] = {k: row[k] for k in ("tok_s_total", "share_of_ceiling", "cuda_graphs")}
    single = out["single_stream"]
    for ref in ("transformers_eager", "transformers_static_compiled"):
        if "mistol_graphs" in single and ref in single:
            out[f"mistol_over_{ref}"] = single["mistol_graphs"]["decode_tok_s"] / single[ref]["decode_tok_s"]
    return out


def main() -> int:
    global RUN
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON (after every part)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    parser.add_argument("--shape", default="7b", choices=sorted(SIZES), help="model shape for the speed parts")
    parser.add_argument("--max-minutes", type=float, default=8.0, help="parts not started by then are skipped")
    parser.add_argument("--compile", default="auto", choices=("auto", "inductor", "eager", "off"),
                        help="transformers' torch.compile backend (auto: inductor on CUDA, off on a CPU)")
    parser.add_argument("--parts", default=None, help="comma-separated parts to run (default: all)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device (use --device cpu --shape tiny for a dry run)", file=sys.stderr)
        return 1
    RUN = Run(args)
    RESULTS["device"] = torch.cuda.get_device_name(RUN.device) if RUN.cuda else "cpu"
    RESULTS["torch"] = torch.__version__
    import transformers

    RESULTS["transformers"] = transformers.__version__
    RESULTS["shape"] = args.shape
    RESULTS["max_minutes"] = args.max_minutes
    chosen = args.parts.split(",") if args.parts else list(PARTS)
    unknown = [name for name in chosen if name not in PARTS]
    if unknown:
        print(f"unknown part(s) {', '.join(unknown)} (choose from {', '.join(PARTS)})", file=sys.stderr)
        return 2
    for name in PARTS:  # in their own order: later parts use earlier ones' results
        if name in chosen:
            PARTS[name]()
    parts = [v for v in RESULTS.values() if isinstance(v, dict)]
    return 0 if all(v.get("ok") for v in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
