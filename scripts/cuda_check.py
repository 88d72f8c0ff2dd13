"""Check mistol on a CUDA GPU: exactness against transformers, quantized layers, decode speed.

    python scripts/cuda_check.py [--out results.json] [--skip-7b]

1. A random Mistral checkpoint (sliding window 16, GQA) saved by transformers: logits of
   mistol and transformers on the GPU in float32 (and bf16), greedy generation past the
   window, batched decode across sessions.
2. int8/int4 `QuantizedLinear` on the GPU (PyTorch ops over the dequantized weight) against
   the same layer on the CPU.
3. Mistral 7B shape in bf16 with random weights: decode tok/s (median of 32 greedy steps)
   of mistol and of transformers, and the time to first token of a 512-token prompt.
Each part reports on its own; a failure in one does not stop the others.
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
from mistol.sampling import SamplingParams  # noqa: E402

RESULTS: dict = {}


def part(name):
    def wrap(fn):
        def run(*args):
            t0 = time.perf_counter()
            try:
                RESULTS[name] = {"ok": True, **fn(*args)}
            except Exception as e:
                RESULTS[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            RESULTS[name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(name, json.dumps(RESULTS[name], indent=1), flush=True)
        return run
    return wrap


def make_checkpoint(path: Path) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                           num_attention_heads=8, num_key_value_heads=2, sliding_window=16,
                           max_position_embeddings=512, tie_word_embeddings=False)
    MistralForCausalLM(config).save_pretrained(path)
    return path


@part("parity_f32_and_bf16")
def parity(model_dir: Path) -> dict:
    from transformers import MistralForCausalLM

    out = {}
    ids = torch.randint(3, 1000, (1, 60), generator=torch.Generator().manual_seed(1))
    for dtype_name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        ref = MistralForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").cuda().eval()
        engine = Engine.load(model_dir, dtype=dtype_name, device="cuda", progress=False)
        with torch.inference_mode():
            ref_logits = ref(ids.cuda()).logits[0].float()
            session = engine.new_session(max_context=256)
            ours = session.feed(ids[0].tolist(), all_logits=True).float()
        err = (ours - ref_logits).abs().max().item()
        scale = ref_logits.abs().max().item()
        out[f"{dtype_name}_max_abs_err"] = err
        out[f"{dtype_name}_rel_err"] = err / scale
        out[f"{dtype_name}_top1_agree"] = (ours.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        if dtype_name == "f32":
            with torch.inference_mode():
                gen = ref.generate(ids[:, :8].cuda(), max_new_tokens=40, do_sample=False, min_new_tokens=40)[0, 8:]
            mine = list(engine.new_session(max_context=256).generate(ids[0, :8].tolist(),
                                                                    SamplingParams(temperature=0, max_tokens=40)))
            out["greedy_40_identical"] = mine == gen.tolist()
            # CUDA graphs (the default) against eager steps: 300 greedy tokens, several key buckets.
            params = SamplingParams(temperature=0, max_tokens=300)
            engine.cuda_graphs = False
            eager = list(engine.new_session(max_context=400).generate(ids[0, :20].tolist(), params))
            engine.cuda_graphs = True
            session = engine.new_session(max_context=400)
            graphed = list(session.generate(ids[0, :20].tolist(), params))
            out["graphs_equal_eager_300"] = graphed == eager
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
        del ref, engine
        gc.collect()
        torch.cuda.empty_cache()
    out["pass"] = (out["f32_max_abs_err"] < 1e-3 and out["greedy_40_identical"] and out["bf16_top1_agree"] > 0.9
                   and out["graphs_equal_eager_300"])
    return out


@part("quantized_layers")
def quantized() -> dict:
    from mistol.quant import quantize_linear

    out = {}
    w = torch.randn(1000, 512) * 0.02
    x = torch.randn(5, 512)
    for fmt in ("int8", "int4"):
        layer = quantize_linear(w, fmt)
        cpu_reference = x @ layer.dequantize().T
        gpu = layer.to("cuda")(x.cuda()).cpu()
        out[f"{fmt}_max_err_vs_dequantized"] = (gpu - cpu_reference).abs().max().item()
        out[f"{fmt}_bf16_max_err"] = (layer.to("cuda")(x.cuda().bfloat16()).float().cpu() - cpu_reference).abs().max().item()
    out["pass"] = out["int8_max_err_vs_dequantized"] < 1e-4 and out["int4_max_err_vs_dequantized"] < 1e-4
    return out


def _timed_decode(prefill, step, prompt: list[int], steps: int = 32) -> dict:
    prefill(prompt[:64])
    token = 0
    for _ in range(3):
        token = int(step(token).argmax())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    token = int(prefill(prompt).argmax())
    ttft = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        token = int(step(token).argmax())
        times.append(time.perf_counter() - t0)
    return {"ttft_512_s": ttft, "decode_tok_s": 1 / statistics.median(times), "decode_best_tok_s": 1 / min(times)}


@part("speed_7b_bf16")
def speed() -> dict:
    from mistol.bench.models import mistol_model, transformers_model
    from mistol.bench.shapes import bytes_per_token, hf_config, model_config

    config = model_config("7b")
    prompt = [1] + [int(t) for t in torch.randint(300, 32000, (511,), generator=torch.Generator().manual_seed(0))]
    out = {"weights_gb": bytes_per_token(config, "bf16", 0) / 1e9}
    t0 = time.perf_counter()
    model = mistol_model(config, "bf16", device="cuda")
    out["mistol_build_s"] = time.perf_counter() - t0
    engine = Engine(model)
    state = {}

    def prefill(ids):
        state["s"] = engine.new_session(max_context=1024)
        return state["s"].feed(ids)

    with torch.inference_mode():
        engine.cuda_graphs = False
        out["mistol_eager"] = _timed_decode(prefill, lambda t: decode_step([state["s"]], [t])[0], prompt)
        engine.cuda_graphs = True
        out["mistol"] = _timed_decode(prefill, lambda t: decode_step([state["s"]], [t])[0], prompt)
        for batch in (4, 16):  # several sessions per step (the server's path): eager
            sessions = [engine.new_session(max_context=1024) for _ in range(batch)]
            for s in sessions:
                s.feed(prompt[:64])
            decode_step(sessions, [5] * batch)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(16):
                decode_step(sessions, [5] * batch)
            torch.cuda.synchronize()
            out[f"mistol_batch{batch}_tok_s"] = 16 * batch / (time.perf_counter() - t0)
            sessions = None
    engine = model = None
    state.clear()
    gc.collect()
    torch.cuda.empty_cache()

    with torch.device("cuda"):
        ref = transformers_model(hf_config("7b"), "bf16")
    from transformers import DynamicCache

    arg = "cache" if "cache" in inspect.signature(ref.forward).parameters else "past_key_values"
    cache = {}

    def hf_prefill(ids):
        cache["c"] = DynamicCache()
        return ref(input_ids=torch.tensor([ids], device="cuda"), use_cache=True, logits_to_keep=1,
                   **{arg: cache["c"]}).logits[0, -1]

    def hf_step(token):
        return ref(input_ids=torch.tensor([[token]], device="cuda"), use_cache=True, logits_to_keep=1,
                   **{arg: cache["c"]}).logits[0, -1]

    with torch.inference_mode():
        out["transformers"] = _timed_decode(hf_prefill, hf_step, prompt)
    out["decode_ratio_mistol_over_transformers"] = out["mistol"]["decode_tok_s"] / out["transformers"]["decode_tok_s"]
    out["roofline_share_at_4_8_TB_s"] = out["mistol"]["decode_tok_s"] * out["weights_gb"] / 4800
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-7b", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    RESULTS["device"] = torch.cuda.get_device_name(0)
    RESULTS["torch"] = torch.__version__
    with tempfile.TemporaryDirectory() as tmp:
        parity(make_checkpoint(Path(tmp) / "mistral"))
    quantized()
    if not args.skip_7b:
        speed()
    if args.out:
        args.out.write_text(json.dumps(RESULTS, indent=2))
    return 0 if all(v.get("ok", True) for v in RESULTS.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
