"""Decode steps on the compiled layer (csrc/mistol_decode.c) against the PyTorch layers."""

from __future__ import annotations

import pytest
import torch

from helpers import kernel_impls
from mistol import kernels, quant
from mistol.bench.models import mistol_model
from mistol.engine import Engine, decode_step
from mistol.model import backend, cpu_decode
from mistol.model.kv_cache import Q8_0
from mistol.model.config import ModelConfig
from mistol.quant import QuantizedLinear, quantize_linear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="mistol's C kernels are not built")


def config(hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=160, window=None, layers=2, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=512, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, sliding_window=window, **kw)


def model(cfg: ModelConfig, fmt: str, seed: int = 0):
    m = mistol_model(cfg, "int4" if fmt == "mixed" else fmt, seed=seed)
    if fmt == "mixed":  # as a Q4_K_M GGUF loads: some matrices int8, the rest int4
        for block in m.layers[::2]:
            down = block.mlp.down_proj
            block.mlp.down_proj = quantize_linear(down.dequantize(), "int8")
            block.self_attn.v_proj = quantize_linear(block.self_attn.v_proj.dequantize(), "int8")
    return m


def teacher_forced_logits(m, tokens: list[int], max_context: int, compiled: bool, monkeypatch,
                          kv_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits after a one-token prompt and then each of `tokens` fed as a decode step. The
    cache is float32 unless asked: the two paths then do the same arithmetic (in float16,
    a 1e-7 difference now and then rounds a key to the neighbouring half, for good)."""
    with monkeypatch.context() as patch:
        if not compiled:
            patch.setattr(cpu_decode.CpuDecoder, "of", classmethod(lambda cls, model: None))
        engine = Engine(m)
        engine.kv_dtype = kv_dtype
        session = engine.new_session(max_context=max_context, chunk_size=4)
        out = [session.feed([1])]
        with torch.inference_mode():
            out += [decode_step([session], [t])[0] for t in tokens]
    return torch.stack(out)


def assert_agree(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """The same float32 arithmetic in another order: a step's logits agree to ~1e-7. Now
    and then a rounding difference moves one activation across an int8 step before a
    matrix product, which shows as ~0.5% in that step's logits and the ones after."""
    rel = (ours - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert (rel < 1e-5).float().mean() >= 0.9 and rel.max() < 0.02, rel


SHAPES = {
    "gqa": config(),
    "no-gqa, odd head size": config(hidden=96, heads=4, kv_heads=4, head_dim=40, ffn=96),
    "one kv head": config(hidden=128, heads=8, kv_heads=1, head_dim=16, ffn=224),
    "sliding window": config(window=8),
    "down projection in tiles": config(ffn=8256),  # rows of 8256 inputs: 3 tiles of 86 blocks
    "q/k/v biases (Qwen2)": config(qkv_bias=True),
    "q/k/v/o biases, tied head": config(qkv_bias=True, o_bias=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", ["int8", "int4", "mixed"])
def test_compiled_decode_matches_the_pytorch_layers(shape, fmt, monkeypatch):
    """40 steps: the sliding-window cache (capacity 12) wraps around several times."""
    m = model(SHAPES[shape], fmt)
    tokens = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = teacher_forced_logits(m, tokens, 64, True, monkeypatch)
    ref = teacher_forced_logits(m, tokens, 64, False, monkeypatch)
    assert_agree(ours, ref)


def test_tiles_change_the_layout_not_the_sums(monkeypatch):
    """Rows cut into tiles (hidden 4160: q/k/v, gate and up in 2 tiles of 65 blocks; ffn
    8256: the down projection in 3 of 86) give the same bits as uncut rows."""
    cfg = config(hidden=4160, ffn=8256, layers=1)
    tokens = list(range(100, 110))
    tiled = model(cfg, "mixed")
    assert tiled.layers[0].mlp.gate_proj.packed.shape[0] == 2 and tiled.layers[0].mlp.down_proj.packed.shape[0] == 3
    with monkeypatch.context() as patch:
        patch.setattr(quant, "TILE_BLOCKS", 10**6)
        whole = model(cfg, "mixed")
    assert whole.layers[0].mlp.down_proj.packed.shape[0] == 1
    ours = teacher_forced_logits(tiled, tokens, 32, True, monkeypatch)
    assert torch.equal(ours, teacher_forced_logits(whole, tokens, 32, True, monkeypatch))


@pytest.mark.parametrize("impl", kernel_impls())
def test_every_kernel_implementation_and_thread_count(impl, monkeypatch):
    m = model(config(window=8), "int4")
    tokens = list(range(100, 120))
    ref = teacher_forced_logits(m, tokens, 32, False, monkeypatch)
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            with kernels.use(impl):
                ours = teacher_forced_logits(m, tokens, 32, True, monkeypatch)
            assert_agree(ours, ref)
    finally:
        torch.set_num_threads(threads)


def count_compiled_layers(monkeypatch) -> list[int]:
    calls = [0]
    real = kernels.decode_layer

    def counting(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(kernels, "decode_layer", counting)
    return calls


def test_steps_and_short_passes_of_one_sequence_take_the_compiled_path(monkeypatch):
    m = model(config(layers=3), "int8")
    calls = count_compiled_layers(monkeypatch)
    engine = Engine(m)
    a, b = engine.new_session(), engine.new_session()
    a.feed([1, 5, 9]), b.feed([1, 7])
    assert calls[0] == 6  # two short prompts: one call per layer each, all of a prompt's tokens at once
    a.feed([1, 5, 9] + list(range(20, 21 + backend.FUSED_MAX_ROWS)))
    assert calls[0] == 6  # more tokens than that: the PyTorch layers
    decode_step([a], [11])
    assert calls[0] == 9
    decode_step([a, b], [12, 13])
    assert calls[0] == 12  # two sequences at once: one call per layer
    engine.kv_dtype = torch.float32 if a.cache.dtype != torch.float32 else torch.float16
    c = engine.new_session()
    c.feed([1, 2])
    assert calls[0] == 15
    decode_step([a, c], [16, 17])
    assert calls[0] == 15  # caches of two types: the PyTorch layers
    with kernels.use("torch"):
        decode_step([a], [14])
    assert calls[0] == 15


TOGETHER_SHAPES = {  # (head size 32: a q8_0 cache's block)
    "gqa": config(head_dim=32),
    "sliding window": config(head_dim=32, window=8),
    "q/k/v/o biases, tied head": config(head_dim=32, qkv_bias=True, o_bias=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize("kv", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("shape", TOGETHER_SHAPES)
def test_tokens_verified_together_get_the_bits_of_one_at_a_time(shape, kv, monkeypatch):
    """A verify pass (or a short prompt) runs its tokens through the compiled layer together:
    logits and cache must be what decode steps of one token each give, bit for bit, so that
    speculative greedy decoding is plain decoding's (the sliding window's cache wraps
    around several times here)."""
    m = model(TOGETHER_SHAPES[shape], "mixed")
    calls = count_compiled_layers(monkeypatch)
    engine = Engine(m)
    engine.kv_dtype = {"f32": torch.float32, "f16": torch.float16, "q8_0": Q8_0}[kv]
    tokens = torch.randint(3, 512, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    one, together = engine.new_session(max_context=96), engine.new_session(max_context=96)
    one.feed([1]), together.feed([1])
    steps = torch.stack([one.step(t) for t in tokens])
    calls[0] = 0
    passes, i = [], 0
    for n in (1, 5, 17, 7, 2, 28):  # (60 tokens; 28: more rows than a kernel takes at once)
        passes.append(together.verify(tokens[i : i + n]))
        i += n
    assert calls[0] == 6 * len(m.layers)  # each pass: one call per layer
    assert torch.equal(torch.cat(passes), steps)
    assert all(torch.equal(a, b) for a, b in zip(one.cache.tensors().values(), together.cache.tensors().values()))


@pytest.mark.parametrize("kv", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("shape", TOGETHER_SHAPES)
def test_sessions_decoded_together_get_the_bits_of_each_alone(shape, kv, monkeypatch):
    """A server's batch of decode steps (the next token of each of several sessions, each
    its own cache and length) runs through the compiled layer in one call per layer: every
    session's logits and cache must be what its step alone gives, bit for bit."""
    m = model(TOGETHER_SHAPES[shape], "mixed")
    calls = count_compiled_layers(monkeypatch)
    engine = Engine(m)
    engine.kv_dtype = {"f32": torch.float32, "f16": torch.float16, "q8_0": Q8_0}[kv]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (1, 9, 30, 4)]
    steps = torch.randint(3, 512, (25, len(prompts)), generator=gen).tolist()
    alone = [engine.new_session(max_context=64) for _ in prompts]
    together = [engine.new_session(max_context=64) for _ in prompts]
    for a, b, p in zip(alone, together, prompts):
        a.feed(p), b.feed(p)
    calls[0] = 0
    for tokens in steps:
        each = torch.stack([s.step(t) for s, t in zip(alone, tokens)])
        assert torch.equal(decode_step(together, tokens), each)
    assert calls[0] == (len(prompts) + 1) * len(steps) * len(m.layers)  # each step alone, and all together
    for a, b in zip(alone, together):
        assert all(torch.equal(x, y) for x, y in zip(a.cache.tensors().values(), b.cache.tensors().values()))


def test_passes_over_a_long_context_stay_compiled_and_exact(monkeypatch):
    """A verify pass over hundreds of keys (attention outweighs these small layers' weights
    many times over) runs on the compiled layers, each of its tokens with the bits a decode
    step alone gives it; the PyTorch layers' logits agree within float32 rounding."""
    m = model(config(hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=1024, layers=2), "int8")
    engine = Engine(m)
    prompt = [(7 * i) % 250 + 3 for i in range(420)]
    guesses = list(range(30, 38))
    together, alone = engine.new_session(max_context=512), engine.new_session(max_context=512)
    together.feed(prompt), alone.feed(prompt)
    calls = count_compiled_layers(monkeypatch)
    verified = together.verify(guesses)
    assert calls[0] == len(m.layers)  # one call per layer for all 8 rows
    stepped = torch.stack([alone.step(t) for t in guesses])
    assert torch.equal(verified, stepped)
    monkeypatch.setattr(backend, "FUSED_MAX_ROWS", 1)
    reference = engine.new_session(max_context=512)
    reference.feed(prompt)
    torch.testing.assert_close(reference.verify(guesses), verified, rtol=1e-4, atol=1e-4)


def test_float_models_keep_the_pytorch_layers(monkeypatch):
    calls = count_compiled_layers(monkeypatch)
    m = mistol_model(config(), "f32")
    session = Engine(m).new_session()
    session.feed([1, 2]), session.feed([3])
    assert calls[0] == 0 and cpu_decode.CpuDecoder.of(m) is None


def test_a_replaced_layer_is_seen(monkeypatch):
    """The decoder keeps the weights' addresses: the plan of an engine made after a module
    was replaced or the model moved must look again."""
    m = model(config(), "int8")
    tokens = [5, 6, 7]
    before = teacher_forced_logits(m, tokens, 32, True, monkeypatch)
    down = m.layers[1].mlp.down_proj
    m.layers[1].mlp.down_proj = QuantizedLinear(down.in_features, down.out_features, "int8", down.packed * 0)
    after = teacher_forced_logits(m, tokens, 32, True, monkeypatch)
    assert not torch.allclose(before, after)
    assert_agree(after, teacher_forced_logits(m, tokens, 32, False, monkeypatch))
    m.to(torch.float64)  # norms change dtype: no longer the compiled path's float32
    assert cpu_decode.CpuDecoder.of(m) is None


def test_the_plan_is_the_engines_not_the_models(monkeypatch):
    """The fused decoder lives in the engine's plan; the model stays a plain module, and
    `replan` looks at it again."""
    m = model(config(), "int8")
    engine = Engine(m)
    assert engine.backend.cpu_decoder is not None and "_cpu_decoder" not in vars(m)
    calls = count_compiled_layers(monkeypatch)
    session = engine.new_session()
    session.feed([1, 2])
    session.step(3)
    assert calls[0] == 4  # (the prompt's two tokens at once, then a step: 2 layers each)
    engine.backend.cpu_decoder = None  # as after a change the plan did not see
    session.step(4)
    assert calls[0] == 4
    engine.replan()
    session.step(5)
    assert calls[0] == 6


@pytest.mark.parametrize("shape", ["gqa", "sliding window", "no-gqa, odd head size", "q/k/v/o biases, tied head"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "pytorch"])
def test_a_float16_cache_stays_near_float32(shape, compiled, monkeypatch):
    """A quantized CPU model's cache is float16 by default. Rounding each key and value to
    11 significant bits moves a float32 model's logits by ~1e-4 (relative); in an int8
    model the activations' int8 rounding turns that into ~1% (each flipped int8 step of an
    activation is 1/127 of its block), a fraction of the int8 weights' own error, over 40
    steps, windows wrapping included."""
    cfg = SHAPES[shape]
    tokens = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    m = model(cfg, "int8")
    assert Engine(m).kv_dtype == torch.float16
    half = teacher_forced_logits(m, tokens, 64, compiled, monkeypatch, torch.float16)
    full = teacher_forced_logits(m, tokens, 64, compiled, monkeypatch)
    rel = (half - full).norm(dim=-1) / full.norm(dim=-1)
    assert rel.max() < 0.03, rel
    assert (half.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9

    exact = mistol_model(cfg, "f32")  # no int8 rounding after the cache: the cache's own error
    assert Engine(exact).kv_dtype == torch.float32
    half = teacher_forced_logits(exact, tokens, 64, False, monkeypatch, torch.float16)
    full = teacher_forced_logits(exact, tokens, 64, False, monkeypatch)
    rel = (half - full).norm(dim=-1) / full.norm(dim=-1)
    assert 0 < rel.max() < 2e-3, rel


def test_greedy_replies_are_the_same_with_a_float16_cache():
    """The demo model quantized to int8, as a CPU user runs a large model: its replies with
    the default float16 cache are token for token those of a float32 cache, up to where the
    chat stops them (the end of the turn, or of the first code block: the chat runs it)."""
    from demo_turns import QUESTIONS, chat_reply

    engine = Engine.load("demo", quant="int8", dtype="f32")
    assert engine.kv_dtype == torch.float16
    for question in QUESTIONS:
        replies = []
        for dtype in (torch.float16, torch.float32):
            engine.kv_dtype = dtype
            replies.append(chat_reply(engine, question))
        assert replies[0] == replies[1] and len(replies[0]) > 5, question
