"""One engine, one format, measured in a process of its own: `python -m mistol.bench.engines SPEC`.

Each measurement runs in a fresh process so that its peak RSS is its own and its memory
is gone before the next starts. It prints one JSON object as its last line of output.

What is measured (the same for every engine, on the same random token ids):
- prefill tok/s: a fresh context fed an n-token prompt in one call, for each n asked;
- time to first token: a fresh context, the shortest prompt, until the first greedy token;
- decode tok/s: the median time of each following greedy step (each step is one token);
- peak RSS: the process's high-water mark (VmHWM), and its RSS before the model existed.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Spec:
    engine: str  # "mistol", "transformers" or "llama.cpp"
    fmt: str  # mistol/transformers: int8, int4, bf16, f16, f32; llama.cpp: the GGUF's (int8 = Q8_0, ...)
    shape: str
    prompts: list[int] = field(default_factory=lambda: [64, 512])
    steps: int = 32
    threads: int = 0  # 0: all cores
    gguf: str | None = None  # llama.cpp: the file to load
    seed: int = 0


def prompt_ids(n: int, seed: int, vocab: int = 32000) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(300, vocab) for _ in range(n - 1)]


def memory_status() -> dict[str, int]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


class _Timer:
    """Run the three measurements with engine-specific `prefill(ids) -> logits`, `step(token) -> logits`
    and `reset()` callables."""

    def __init__(self, spec: Spec, prefill, step, reset, argmax):
        self.spec, self.prefill, self.step, self.reset, self.argmax = spec, prefill, step, reset, argmax

    def run(self) -> dict:
        spec = self.spec
        ids = prompt_ids(max(spec.prompts), spec.seed)
        # Warm up (first-call allocations, thread pools, lazy initialisation) with the same shapes.
        for n in sorted(spec.prompts):
            self.reset()
            token = self.argmax(self.prefill(ids[:n]))
        for _ in range(2):
            token = self.argmax(self.step(token))
        prefill = {}
        for n in sorted(spec.prompts):
            self.reset()
            t0 = time.perf_counter()
            self.prefill(ids[:n])
            prefill[str(n)] = n / (time.perf_counter() - t0)
        self.reset()
        n = min(spec.prompts)
        t0 = time.perf_counter()
        token = self.argmax(self.prefill(ids[:n]))
        ttft = time.perf_counter() - t0
        steps = []
        for _ in range(spec.steps):
            t0 = time.perf_counter()
            token = self.argmax(self.step(token))
            steps.append(time.perf_counter() - t0)
        median = statistics.median(steps)
        return {"prefill_tok_s": prefill, "ttft_s": ttft, "decode_tok_s": 1.0 / median,
                "decode_best_tok_s": 1.0 / min(steps), "decode_steps": len(steps)}


def measure_mistol(spec: Spec) -> dict:
    import torch

    from ..engine import Engine
    from .models import mistol_model
    from .shapes import model_config

    config = model_config(spec.shape)
    t0 = time.perf_counter()
    engine = Engine(mistol_model(config, spec.fmt, spec.seed), name=f"random {spec.shape}")
    load_s = time.perf_counter() - t0
    context = max(spec.prompts) + spec.steps + 8
    state = {}

    def reset():
        state["session"] = engine.new_session(max_context=context)

    def prefill(ids):
        return state["session"].feed(ids)

    def step(token):
        from ..engine import decode_step

        return decode_step([state["session"]], [token])[0]

    with torch.inference_mode():
        result = _Timer(spec, prefill, step, reset, lambda logits: int(logits.argmax())).run()
    from .. import kernels

    model = engine.model
    held = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    return {**result, "load_s": load_s, "kernels": kernels.impl_name() if spec.fmt in ("int8", "int4") else "torch",
            "model_bytes": held, "kv_bytes": state["session"].cache.nbytes}


def measure_transformers(spec: Spec) -> dict:
    import torch
    from transformers import DynamicCache

    from .models import transformers_model
    from .shapes import hf_config

    t0 = time.perf_counter()
    model = transformers_model(hf_config(spec.shape), spec.fmt, spec.seed)
    load_s = time.perf_counter() - t0
    state = {}

    def reset():
        state["cache"] = DynamicCache()
        state["length"] = 0

    import inspect

    # The cache argument was renamed in transformers 5 ("cache"; "past_key_values" before).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run(ids):
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1, **{cache_arg: state["cache"]})
        state["length"] += len(ids)
        return out.logits[0, -1]

    with torch.inference_mode():
        result = _Timer(spec, run, lambda token: run([token]), reset, lambda logits: int(logits.argmax())).run()
    import transformers

    held = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    return {**result, "load_s": load_s, "version": transformers.__version__, "model_bytes": held,
            "kv_bytes": _kv_bytes(spec, 2 if spec.fmt in ("bf16", "f16") else 4)}


def measure_llama_cpp(spec: Spec) -> dict:
    import llama_cpp
    import numpy as np

    threads = spec.threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec.gguf, n_ctx=max(spec.prompts) + spec.steps + 16, n_batch=512,
                          n_ubatch=512, n_threads=threads, n_threads_batch=threads, logits_all=False,
                          verbose=False)
    load_s = time.perf_counter() - t0

    n_vocab = llm.n_vocab()

    def run(ids):
        llm.eval(ids)  # without logits_all, llama-cpp-python keeps no scores: read the context's
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    result = _Timer(spec, run, lambda token: run([token]), llm.reset, lambda logits: int(np.argmax(logits))).run()
    return {**result, "load_s": load_s, "version": llama_cpp.__version__,
            "model_bytes": os.path.getsize(spec.gguf), "kv_bytes": _kv_bytes(spec, 2, llm.n_ctx())}


def _kv_bytes(spec: Spec, element_bytes: int, context: int | None = None) -> int:
    """A cache of `context` positions (default: what the measurement uses) for every layer."""
    from .shapes import model_config

    config = model_config(spec.shape)
    context = context or max(spec.prompts) + spec.steps + 8
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * context * element_bytes


MEASURE = {"mistol": measure_mistol, "transformers": measure_transformers, "llama.cpp": measure_llama_cpp}


def measure(spec: Spec) -> dict:
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    before = memory_status()["VmRSS"]
    result = MEASURE[spec.engine](spec)
    memory = memory_status()
    return {**asdict(spec), **result, "base_rss": before, "peak_rss": memory["VmHWM"],
            "threads_used": spec.threads or torch.get_num_threads()}


def main(argv: list[str]) -> int:
    spec = Spec(**json.loads(argv[0]))
    try:
        result = measure(spec)
    except Exception as e:  # reported in the table, not as a traceback
        result = {**asdict(spec), "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
