"""One engine, one format, in a process of its own: `python -m mistol.bench.engines SPEC`.

Each engine runs in a process of its own so that its peak RSS is its own and its memory is
gone when it exits. The process loads the model, then answers requests read from stdin,
one JSON object per line, with one JSON line on stdout each:

- {"do": "prompts"}: prefill tok/s (a fresh context fed an n-token prompt in one call, for
  each n asked) and time to first token (a fresh context, the shortest prompt, until the
  first greedy token); the context is left there for decoding;
- {"do": "decode", "steps": n}: n more greedy steps, each one token: their times;
- {"do": "finish"}: what it held (bytes of the model and KV cache) and its memory: the
  high-water mark of the RSS (VmHWM) and the RSS before the model existed; then it exits.

So the caller can let two engines take turns decoding, a few steps each, and compare them
under the same load from the rest of the machine. Every engine sees the same token ids.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..util import cpu_flags

ENGINES = ("mistol", "transformers", "llama.cpp")
FORMATS = ("int8", "int4", "bf16", "f16", "f32")  # llama.cpp: the GGUF type of the same bits (shapes.GGUF_TYPES)


@dataclass
class Spec:
    engine: str  # "mistol", "transformers" or "llama.cpp"
    fmt: str  # mistol/transformers: int8, int4, bf16, f16, f32; llama.cpp: the GGUF's (int8 = Q8_0, ...)
    shape: str
    prompts: list[int] = field(default_factory=lambda: [64, 512])
    steps: int = 32
    threads: int = 0  # resolved once by the caller, the same for every engine (0: the engine's default)
    pages: str = "huge"  # "huge": transparent huge pages for every engine's weights; "small": 4 KiB pages
    gguf: str | None = None  # llama.cpp: the file to load; mistol too when measuring a GGUF file
    checkpoint: str | None = None  # mistol/transformers float formats: a model directory to map (else built here)
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


def huge_page_bytes() -> int:
    """Bytes of this process's memory in transparent huge pages now (0 where unknown)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def page_environment(pages: str) -> dict[str, str]:
    """The environment that gives an engine's process the page setting `pages`.

    torch's CPU allocator asks for huge pages when THP_MEM_ALLOC_ENABLE is 1 (mistol sets it
    on import); llama.cpp allocates its weights with malloc (it is given no mmap here), and
    glibc's malloc asks for huge pages with the `glibc.malloc.hugetlb=1` tunable. Both only
    ask (madvise): the kernel decides, and each row reports what it got."""
    if pages == "huge":
        return {"THP_MEM_ALLOC_ENABLE": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    return {"THP_MEM_ALLOC_ENABLE": "0", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}


@dataclass
class Runner:
    """One loaded engine: `prefill(ids) -> logits` on the current context, `step(token) ->
    logits`, `reset()` to an empty context, `argmax(logits) -> int`, and what to report."""

    spec: Spec
    prefill: Callable
    step: Callable
    reset: Callable
    argmax: Callable
    info: dict  # load_s, version, model_bytes, kv_bytes (a callable: read at the end), ...
    token: int = 0

    def prompts(self) -> dict:
        spec = self.spec
        ids = prompt_ids(max(spec.prompts), spec.seed, min(32000, spec_config(spec).vocab_size))
        # Warm up (first-call allocations, thread pools, lazy initialisation) with the same shapes.
        for n in sorted(spec.prompts):
            self.reset()
            self.token = self.argmax(self.prefill(ids[:n]))
        for _ in range(2):
            self.token = self.argmax(self.step(self.token))
        prefill = {}
        for n in sorted(spec.prompts):
            self.reset()
            t0 = time.perf_counter()
            self.prefill(ids[:n])
            prefill[str(n)] = n / (time.perf_counter() - t0)
        self.reset()
        t0 = time.perf_counter()
        self.token = self.argmax(self.prefill(ids[: min(spec.prompts)]))
        return {"prefill_tok_s": prefill, "ttft_s": time.perf_counter() - t0}

    def decode(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.token = self.argmax(self.step(self.token))
            times.append(time.perf_counter() - t0)
        return times


def context_length(spec: Spec) -> int:
    """Positions a measurement needs: the longest prompt, or the shortest one and every
    decode step (each turn of decoding takes one step more than it times)."""
    return max(max(spec.prompts), min(spec.prompts) + 2 * spec.steps + 2) + 8


def load_mistol(spec: Spec) -> Runner:
    import torch

    from .. import kernels
    from ..engine import Engine, decode_step
    from ..model.backend import BF16_MIN_ROWS, TILES_INT8_MIN_ROWS, bf16_prefill_rows, int8_prefill_rows
    from .models import mistol_model
    from .shapes import model_config

    t0 = time.perf_counter()
    if spec.gguf:  # a GGUF file, as `mistol` loads it (k-quants stay the file's blocks)
        engine = Engine.load(spec.gguf, dtype="f32", progress=False)
    else:
        if spec.checkpoint:
            from ..engine import DTYPES
            from ..weights.checkpoint import load_model

            model = load_model(spec.checkpoint, dtype=DTYPES[spec.fmt], progress=False)
        else:
            model = mistol_model(model_config(spec.shape), spec.fmt, spec.seed)
        engine = Engine(model, name=f"random {spec.shape}")
    load_s = time.perf_counter() - t0
    state = {}

    def reset():
        state["session"] = engine.new_session(max_context=context_length(spec))

    @torch.inference_mode()
    def prefill(ids):
        return state["session"].feed(ids)

    @torch.inference_mode()
    def step(token):
        return decode_step([state["session"]], [token])[0]

    model = engine.model
    # a file's RSS is set against its size, as llama.cpp's is (what the person downloaded);
    # a model made in memory, against what it holds
    held = os.path.getsize(spec.gguf) if spec.gguf else sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    quantized = any(b.dtype == torch.uint8 for b in model.buffers())
    # from how many rows a prefill requantizes to int8 or multiplies bf16 (dequantized)
    # weights, per format held
    # (the linear layers': an embedding's blocks are looked up, and a tied head multiplies
    # one row of a prompt)
    fmts = {m.fmt for m in model.modules() if hasattr(m, "fmt") and hasattr(m, "in_features")}
    int8_from = {f: n for f in sorted(fmts) if (n := int8_prefill_rows(f))}
    bf16_from = {f: n for f in sorted(fmts & BF16_MIN_ROWS.keys()) if (n := bf16_prefill_rows(f)) is not None}
    in_tiles = bool(int8_from.keys() & TILES_INT8_MIN_ROWS.keys()) and kernels.int8_tiles()
    info = {"load_s": load_s, "kernels": kernels.impl_name() if quantized else "torch", "bf16_prefill_rows": bf16_from,
            "int8_prefill_rows": int8_from, "int8_tiles": in_tiles,
            "model_bytes": held, "kv_bytes": lambda: state["session"].cache.nbytes,
            "kv_element_bytes": lambda: _cache_element_bytes(state["session"].cache), "threads_used": torch.get_num_threads()}
    return Runner(spec, prefill, step, reset, lambda logits: int(logits.argmax()), info)


def _cache_element_bytes(cache) -> float:
    """Bytes per cached key or value element, scales included (q8_0: 1 + 2/32)."""
    return cache.nbytes / (2 * cache.k.numel())


def load_transformers(spec: Spec) -> Runner:
    import inspect

    import torch
    import transformers
    from transformers import DynamicCache

    from ..engine import DTYPES
    from .models import transformers_model
    from .shapes import hf_config

    t0 = time.perf_counter()
    if spec.checkpoint:  # ("torch_dtype" before transformers 4.56)
        transformers.utils.logging.disable_progress_bar()
        version = tuple(int(v) for v in transformers.__version__.split(".")[:2] if v.isdigit())
        dtype_arg = "dtype" if version >= (4, 56) else "torch_dtype"
        model = transformers.AutoModelForCausalLM.from_pretrained(spec.checkpoint, **{dtype_arg: DTYPES[spec.fmt]})
        model = model.eval().requires_grad_(False)
    else:
        model = transformers_model(hf_config(spec.shape), spec.fmt, spec.seed)
    load_s = time.perf_counter() - t0
    state = {}

    def reset():
        state["cache"] = DynamicCache()

    # The cache argument was renamed in transformers 5 ("cache"; "past_key_values" before).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def run(ids):
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1, **{cache_arg: state["cache"]})
        return out.logits[0, -1]

    held = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    info = {"load_s": load_s, "version": transformers.__version__, "model_bytes": held,
            "kv_bytes": _kv_bytes(spec, 2 if spec.fmt in ("bf16", "f16") else 4), "threads_used": torch.get_num_threads(),
            "kv_element_bytes": 2 if spec.fmt in ("bf16", "f16") else 4}
    return Runner(spec, run, lambda token: run([token]), reset, lambda logits: int(logits.argmax()), info)


def cpu_has_amx() -> bool:
    """Whether this CPU reports Intel AMX's int8 tiles (Linux's /proc/cpuinfo)."""
    return "amx_int8" in cpu_flags()


LLAMA_CPP_AMX_NOTE = ("llama.cpp: its extra buffer types off on this AMX CPU (its AMX matrix product crashes with a "
                      "general protection fault on such Xeons in VMs, ggml-org/llama.cpp#20824), and with them its "
                      "repacked Q4_0/IQ4_NL layouts (a llama.cpp built without AMX, -DGGML_AMX_INT8=OFF, keeps them)")


def llama_cpp_build_has_amx(system_info: str) -> bool:
    """Whether a llama.cpp build has its AMX kernels, from its system info line."""
    return "AMX_INT8 = 1" in system_info


@contextlib.contextmanager
def llama_cpp_models_without_amx():
    """llama.cpp models loaded within this block leave its extra buffer types unused on a CPU
    with AMX, where the llama.cpp build has AMX kernels (LLAMA_CPP_AMX_NOTE): llama-cpp-python's
    Llama() takes no argument for them, so the model defaults it starts from have them off. A
    build without AMX keeps them: its repacked layouts then run as on any other CPU."""
    if not cpu_has_amx():
        yield
        return
    import llama_cpp

    if not llama_cpp_build_has_amx(llama_cpp.llama_print_system_info().decode(errors="replace")):
        yield
        return
    import llama_cpp.llama_cpp as api

    defaults = api.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    api.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        api.llama_model_default_params = defaults


def load_llama_cpp(spec: Spec) -> Runner:
    import llama_cpp
    import numpy as np

    threads = spec.threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    # No mmap: the weights in malloc'd memory, where they can have the page setting the other
    # engines' weights have (page_environment); a mapped file's pages are always 4 KiB.
    with llama_cpp_models_without_amx():
        llm = llama_cpp.Llama(model_path=spec.gguf, n_ctx=context_length(spec), n_batch=512, n_ubatch=512,
                              n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False,
                              use_mmap=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def run(ids):
        llm.eval(ids)  # without logits_all, llama-cpp-python keeps no scores: read the context's
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    info = {"load_s": load_s, "version": llama_cpp.__version__, "model_bytes": os.path.getsize(spec.gguf),
            "kv_bytes": _kv_bytes(spec, 2, llm.n_ctx()), "threads_used": threads, "kv_element_bytes": 2,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(" |\n")}
    return Runner(spec, run, lambda token: run([token]), llm.reset, lambda logits: int(np.argmax(logits)), info)


def _kv_bytes(spec: Spec, element_bytes: int, context: int | None = None) -> int:
    """A cache of `context` positions (default: what the measurement uses) for every layer."""
    config = spec_config(spec)
    context = context or context_length(spec)
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * context * element_bytes


def spec_config(spec: Spec):
    """The model's shape: the GGUF file's when measuring one, else the named shape's."""
    if spec.gguf:
        from ..weights.gguf_file import GGUFFile

        return GGUFFile(spec.gguf).config()
    from .shapes import model_config

    return model_config(spec.shape)


LOAD = {"mistol": load_mistol, "transformers": load_transformers, "llama.cpp": load_llama_cpp}


def serve(spec: Spec, requests, reply: Callable[[dict], None]) -> None:
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    before = memory_status()["VmRSS"]
    runner = LOAD[spec.engine](spec)
    reply({"loaded": True})
    for line in requests:
        request = json.loads(line)
        if request["do"] == "prompts":
            reply(runner.prompts())
        elif request["do"] == "decode":
            reply({"steps": runner.decode(request["steps"])})
        elif request["do"] == "finish":
            info = {k: v() if callable(v) else v for k, v in runner.info.items()}
            reply({**info, "base_rss": before, "peak_rss": memory_status()["VmHWM"],
                   "huge_page_bytes": huge_page_bytes()})
            return


def main(argv: list[str]) -> int:
    spec = Spec(**json.loads(argv[0]))

    def reply(message: dict) -> None:
        print(json.dumps(message), flush=True)

    try:
        serve(spec, sys.stdin, reply)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: `mistol bench` says it once
        return 130
    except Exception as e:  # reported in the table, not as a traceback
        reply({"error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
