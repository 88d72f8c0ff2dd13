"""The q8_0 KV cache (`--kv-cache q8_0`): llama.cpp's Q8_0 blocks, bit for bit; its memory;
logits near a float32 cache's and greedy replies the same; the compiled decode layer and
the PyTorch layers reading and writing it alike; rollback, the rolling window and saved
files working on it; a model it cannot hold refused in one line."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from checkpoints import make_checkpoint
from mistol import kernels
from mistol.bench.models import mistol_model
from mistol.engine import Engine, decode_step
from mistol.errors import MistolError
from mistol.model import cpu_decode
from mistol.model.config import ModelConfig
from mistol.model.kv_cache import Q8_0, KVCache, dequantize_q8_0, quantize_q8_0

Q8 = gguf.GGMLQuantizationType.Q8_0


def config(hidden=128, heads=4, kv_heads=2, head_dim=32, ffn=160, window=None, layers=2, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=512, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, sliding_window=window, **kw)


SHAPES = {
    "gqa": config(),
    "sliding window": config(window=8),
    "no-gqa, head size 64": config(hidden=128, heads=2, kv_heads=2, head_dim=64),
    "q/k/v biases (Qwen2)": config(qkv_bias=True),
}
TOKENS = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()


def session_on(m, kv_dtype, compiled: bool, monkeypatch, **kw):
    with monkeypatch.context() as patch:
        if not compiled:
            patch.setattr(cpu_decode.CpuDecoder, "of", classmethod(lambda cls, model: None))
        engine = Engine(m)
    engine.kv_dtype = kv_dtype
    return engine.new_session(**kw)


def teacher_forced_logits(m, kv_dtype, compiled: bool, monkeypatch, tokens=TOKENS, **kw) -> torch.Tensor:
    """Logits after a one-token prompt and then each of `tokens` as a decode step."""
    session = session_on(m, kv_dtype, compiled, monkeypatch, **{"max_context": 64, "chunk_size": 4, **kw})
    out = [session.feed([1])]
    with torch.inference_mode():
        out += [decode_step([session], [t])[0] for t in tokens]
    return torch.stack(out)


def relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


# -- the blocks ------------------------------------------------------------------------------
def test_rows_are_llama_cpps_q8_0_blocks_bit_for_bit():
    """Against gguf-py's Q8_0, "bit-exact with the reference implementation in ggml-quants.c":
    rows of many scales, a zero block, values exactly between two steps (roundf takes them away
    from zero), and back to floats the same way."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g) * torch.logspace(-4, 3, 64)[:, None]
    x[1, :32] = 0
    x[2, :32] = (torch.arange(32) - 16) * 0.5  # d = 8 / 127: x / d lands on or next to k + 0.5
    q, d = quantize_q8_0(x)
    assert q.dtype == torch.int8 and d.dtype == torch.float16 and d.shape == (64, 4)
    ref = quantize(x.numpy(), Q8).reshape(64, 4, 34)
    assert np.array_equal(q.numpy(), ref[..., 2:].copy().view(np.int8).reshape(64, 128))
    assert np.array_equal(d.numpy(), ref[..., :2].copy().view(np.float16).reshape(64, 4))
    assert torch.equal(dequantize_q8_0(q, d), torch.from_numpy(dequantize(ref.reshape(64, 136), Q8)))


def test_memory_per_1k_tokens_of_a_7b_model():
    """Mistral 7B: 32 layers, 8 kv heads of 128; keys and values of 1024 positions. f32: 4
    bytes a value, f16: 2, q8_0: 34 bytes per block of 32 (1.0625). The README's figures."""
    mistral_7b = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                             num_heads=32, num_kv_heads=8, head_dim=128)
    mib = {name: KVCache(mistral_7b, 1024, dtype, device="meta").nbytes / 2**20
           for name, dtype in (("f32", torch.float32), ("f16", torch.float16), ("q8_0", Q8_0))}
    assert mib == {"f32": 256, "f16": 128, "q8_0": 68}


# -- accuracy --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "pytorch"])
def test_a_q8_0_cache_stays_near_float32(shape, compiled, monkeypatch):
    """Q8_0 rounds each key and value to the nearest of 255 steps of max|block| / 127: an error
    of at most half a step, ~0.2% of the block's largest value on average, ~0.7% of a
    Gaussian row's norm (the largest of 32 is ~2.5 times the rms). The logits move by about
    as much (the attention output is a weighted mean of such values): the bound is 2%, over
    40 steps with windows wrapping, against f16's 2e-3. In an int8 model each such change
    can also move an activation across an int8 step: the same bound holds, and the greedy
    token stays the same at nearly every step."""
    cfg = SHAPES[shape]
    if compiled and not kernels.available():
        pytest.skip("mistol's C kernels are not built")
    if not compiled:  # a float model (which has no compiled path): the cache's own error
        exact = mistol_model(cfg, "f32")
        q8 = teacher_forced_logits(exact, Q8_0, False, monkeypatch)
        full = teacher_forced_logits(exact, torch.float32, False, monkeypatch)
        assert 1e-4 < relative(q8, full).max() < 0.02, relative(q8, full)
        assert (q8.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9

    m = mistol_model(cfg, "int8")
    q8 = teacher_forced_logits(m, Q8_0, compiled, monkeypatch)
    full = teacher_forced_logits(m, torch.float32, compiled, monkeypatch)
    assert relative(q8, full).max() < 0.03, relative(q8, full)
    assert (q8.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9


def test_greedy_replies_are_the_same_with_a_q8_0_cache():
    """The demo model (head size 32) quantized to int8, as a CPU user runs a large model: its
    replies with a q8_0 cache are token for token those of a float32 cache, up to where the
    chat stops them (the end of the turn, or of the first code block: the chat runs it)."""
    from demo_turns import QUESTIONS, chat_reply

    engine = Engine.load("demo", quant="int8", dtype="f32")
    for question in QUESTIONS:
        replies = []
        for dtype in (Q8_0, torch.float32):
            engine.kv_dtype = dtype
            replies.append(chat_reply(engine, question))
        assert replies[0] == replies[1] and len(replies[0]) > 5, question


# -- the compiled decode layer ---------------------------------------------------------------
@pytest.mark.skipif(not kernels.available(), reason="mistol's C kernels are not built")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["scalar", "auto"])
def test_the_compiled_layer_reads_and_writes_q8_0_as_the_pytorch_layers_do(shape, impl, monkeypatch):
    """From the same q8_0 cache (the PyTorch path's, copied), one step on each path, step
    after step, windows wrapping: the logits agree up to float rounding (~1e-7), and each
    path writes the same bits into the new row. Except in a step where a rounding
    difference moved an activation across an int8 step before the k/v projection (as in
    tests/test_cpu_decode.py's assert_agree): the keys then differ by ~0.1%, their int8
    values by at most one step, their scales by < 1%, that step's logits by < 2%."""
    m = mistol_model(SHAPES[shape], "int8")
    ours = session_on(m, Q8_0, True, monkeypatch, max_context=64, chunk_size=4)
    ref = session_on(m, Q8_0, False, monkeypatch, max_context=64, chunk_size=4)
    assert ours.engine.backend.cpu_decoder is not None and ref.engine.backend.cpu_decoder is None
    ref.feed([1])
    logits, expected, same_rows = [], [], []
    with torch.inference_mode(), kernels.use(impl):
        for t in TOKENS:
            for name, tensor in ours.cache.tensors().items():
                tensor.copy_(ref.cache.tensors()[name])
            ours.cache.slot_pos.copy_(ref.cache.slot_pos)
            ours.cache.length, ours.tokens = ref.cache.length, list(ref.tokens)
            logits.append(decode_step([ours], [t])[0])
            expected.append(decode_step([ref], [t])[0])
            slot = (len(ref.tokens) - 1) % ref.cache.capacity
            rows = [(ours.cache.tensors()[name][:, :, :, slot], ref.cache.tensors()[name][:, :, :, slot])
                    for name in ours.cache.tensors()]
            same = True
            for a, b in rows:
                same &= torch.equal(a, b)
                if a.dtype == torch.int8:
                    assert (a.int() - b.int()).abs().max() <= 1
                else:
                    assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=0)
            same_rows.append(same)
    assert sum(same_rows) >= 0.9 * len(same_rows), same_rows
    rel = relative(torch.stack(logits), torch.stack(expected))
    assert (rel < 1e-5).float().mean() >= 0.9 and rel.max() < 0.02, rel
    assert all(r < 1e-5 for r, same in zip(rel, same_rows) if same), (rel, same_rows)


@pytest.mark.skipif(not kernels.available(), reason="mistol's C kernels are not built")
@pytest.mark.parametrize("impl", ["scalar", "auto"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_value_makes_its_block_nan_on_both_paths(bad, impl, monkeypatch):
    """A NaN activation (a model that overflowed) is not rounded away into a finite block:
    the block of 32 it is in reads back as NaN from the compiled layer's cache as from the
    PyTorch layers' (whose max|x| is NaN), the row's other block and the other head keep
    their values. (llama.cpp's reference takes max|x| with a comparison, so there it depends
    on where the NaN is in its block.) An infinity: scale inf, quants 0, NaN read back."""
    m = mistol_model(config(qkv_bias=True, heads=2, kv_heads=2, head_dim=64), "int8")
    with torch.no_grad():
        m.layers[0].self_attn.v_bias[3] = bad  # kv head 0, block 0
    ours = session_on(m, Q8_0, True, monkeypatch, max_context=16)
    ref = session_on(m, Q8_0, False, monkeypatch, max_context=16)
    assert ours.engine.backend.cpu_decoder is not None and ref.engine.backend.cpu_decoder is None
    with torch.inference_mode(), kernels.use(impl):
        for s in (ours, ref):
            s.feed([1])
            decode_step([s], [5])
    for session in (ours, ref):
        c = session.cache
        v = dequantize_q8_0(c.v[0, 0, :, 1], c.v_scale[0, 0, :, 1])  # layer 0, the decoded token's row
        assert v[0, :32].isnan().all() and not v[0, 32:].isnan().any() and not v[1].isnan().any(), v


# -- rollback, the rolling window ------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["f32", "int8"])
def test_rolled_back_rows_are_forgotten(fmt, monkeypatch):
    """Guesses written and rolled back (as speculation does), then other tokens: the same
    logits, bit for bit, as a session that never saw the guesses; also across the rolling
    buffer's wrap."""
    m = mistol_model(SHAPES["sliding window"], fmt)
    prompt, guesses, tokens = TOKENS[:10], TOKENS[10:14], TOKENS[20:30]
    a = session_on(m, Q8_0, True, monkeypatch, max_context=64, chunk_size=4)
    b = session_on(m, Q8_0, True, monkeypatch, max_context=64, chunk_size=4)
    with torch.inference_mode():
        for s in (a, b):
            s.feed(prompt)
        a.verify(guesses)
        a.truncate(len(prompt))
        rolled = [a.step(t) for t in tokens]
        plain = [b.step(t) for t in tokens]
    assert all(torch.equal(x, y) for x, y in zip(rolled, plain))


@pytest.mark.parametrize("fmt", ["f32", "int8"])
def test_the_rolling_q8_0_cache_matches_one_that_never_wraps(fmt, monkeypatch):
    """Window 8: a cache of 12 slots wraps three times in 40 steps; one of 64 slots never does.
    Each row is quantized alone, so both hold the same values up to float rounding: once the
    small cache wraps its keys are summed in another order, and a value that lands that close to
    a rounding edge of its block's step takes the other quant (seen on an AVX512-FP16 Xeon: one
    such row moved 8 steps' logits by 2.6e-4, while the logits are about 1 in size)."""
    m = mistol_model(SHAPES["sliding window"], fmt)
    rolling = teacher_forced_logits(m, Q8_0, True, monkeypatch, chunk_size=4)
    whole = teacher_forced_logits(m, Q8_0, True, monkeypatch, chunk_size=56)
    assert torch.allclose(rolling[:12], whole[:12], rtol=1e-6, atol=1e-6)  # before the wrap: the same arithmetic
    assert (rolling - whole).abs().max() < 2e-3


@pytest.mark.slow
def test_speculation_with_a_q8_0_cache_gives_the_plain_output(tmp_path):
    """Prompt-lookup speculation (verify passes written across the window's wrap and rolled
    back) gives plain decoding's greedy tokens with a q8_0 cache too."""
    from mistol.sampling import SamplingParams
    from mistol.speculative import Speculation

    path = make_checkpoint(tmp_path / "spec", window=8, vocab=64, hidden=128, tokenizer=False, max_positions=512)
    engine = Engine.load(path, dtype="f32", quant="int8")
    engine.kv_dtype = Q8_0
    prompt = [1] + [5, 6, 7, 8, 9, 10] * 5 + [5, 6]
    params = SamplingParams(temperature=0, max_tokens=120)
    engine.speculation = None
    expected = list(engine.new_session(chunk_size=16).generate(prompt, params))
    engine.speculation = Speculation(adaptive=False, max_depth=6)
    session = engine.new_session(chunk_size=16)
    assert list(session.generate(prompt, params)) == expected
    stats = session.speculator.stats
    assert stats.accepted > 0 and stats.accepted < stats.proposed  # kept and rolled back


# -- saved files, options ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def head32_dir(tmp_path_factory):
    """Mistral, window 8, head size 32 (hidden 128, 4 heads)."""
    return make_checkpoint(tmp_path_factory.mktemp("head32"), window=8, hidden=128)


def test_a_saved_q8_0_cache_resumes_and_other_dtypes_run_again(head32_dir, tmp_path):
    from mistol.llm import LocalLLM
    from mistol.sampling import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=6)
    engine = Engine.load(head32_dir, dtype="f32")
    engine.kv_dtype = Q8_0
    first = LocalLLM(engine, max_context=64)
    history = [{"role": "user", "content": "one two three four five six"}]
    reply = "".join(first.chat(history, greedy))
    messages = [*history, {"role": "assistant", "content": reply}, {"role": "user", "content": "and seven?"}]
    path = tmp_path / "chat.kv"
    first.save_cache(path)
    cache = first.session.cache
    assert path.stat().st_size < cache.nbytes * min(cache.length, cache.capacity) / cache.capacity + 4096

    resumed = LocalLLM(engine, max_context=64)
    assert resumed.restore_cache(path) is None
    for name, t in resumed.session.cache.tensors().items():
        filled = min(cache.length, cache.capacity)
        assert torch.equal(t[:, :, :, :filled], cache.tensors()[name][:, :, :, :filled]), name
    fresh = LocalLLM(engine, max_context=64)
    assert "".join(resumed.chat(messages, greedy)) == "".join(fresh.chat(messages, greedy))
    assert resumed.last.prefilled_tokens < fresh.last.prefilled_tokens / 2

    for other in (torch.float32, torch.float16):
        engine.kv_dtype = other
        why = LocalLLM(engine, max_context=64).restore_cache(path)
        assert why is not None and "q8_0" in why, why
    engine.kv_dtype = torch.float16
    f16 = LocalLLM(engine, max_context=64)
    f16.chat(history, greedy)
    f16.save_cache(tmp_path / "f16.kv")
    engine.kv_dtype = Q8_0
    why = LocalLLM(engine, max_context=64).restore_cache(tmp_path / "f16.kv")
    assert why is not None and "float16" in why, why


def test_a_q8_0_file_with_damaged_scales_is_refused(head32_dir, tmp_path):
    """Scales missing, of another type (the same bytes: float32 where float16 was, half as
    many), or of another shape (the same count): refused with the reason, the session empty."""
    import json

    from mistol.llm import LocalLLM
    from mistol.sampling import SamplingParams

    engine = Engine.load(head32_dir, dtype="f32")
    engine.kv_dtype = Q8_0
    first = LocalLLM(engine, max_context=64)
    first.chat([{"role": "user", "content": "one two three"}], SamplingParams(temperature=0, max_tokens=4))
    path = tmp_path / "chat.kv"
    first.save_cache(path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])

    def k_scale_as(**entry):
        changed = {**header, "k_scale": {**header["k_scale"], **entry}}
        if not entry:
            del changed["k_scale"]
        encoded = json.dumps(changed).encode()
        encoded += b" " * (-len(encoded) % 8)
        return len(encoded).to_bytes(8, "little") + encoded + data[8 + n :]

    layers, batch, heads, filled, blocks = header["k_scale"]["shape"]
    for damaged in (k_scale_as(), k_scale_as(dtype="F32", shape=[layers, batch, heads, filled // 2, blocks]),
                    k_scale_as(shape=[layers * 2, batch, heads, filled // 2, blocks]),
                    k_scale_as(shape=[layers, batch, heads, filled, blocks, 1])):
        path.write_bytes(damaged)
        llm = LocalLLM(engine, max_context=64)
        why = llm.restore_cache(path)
        assert why is not None and str(path) in why, why
        assert llm.session.tokens == []


def test_a_head_size_q8_0_cannot_hold_is_refused_in_one_line(mistral_dir, capsys):
    """The tests' usual checkpoint has heads of 16 values: not a whole block of 32."""
    from mistol.cli import main

    cfg = config(hidden=64, heads=4, head_dim=16)
    with pytest.raises(MistolError, match=r"multiple of 32 .*16.*--kv-cache f16"):
        KVCache(cfg, 8, Q8_0)
    KVCache(cfg, 8, torch.float16)
    status = main(["generate", "--model", str(mistral_dir), "--kv-cache", "q8_0", "--max-tokens", "2",
                   "--prompt", "hi"])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and "--kv-cache f16" in err and "Traceback" not in err, err


def test_every_command_with_kv_cache_takes_q8_0_and_explains_it():
    from mistol.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    with_kv = {name: p for name, p in commands.items()
               if any("--kv-cache" in a.option_strings for a in p._actions)}
    assert {"chat", "generate", "serve"} <= set(with_kv)
    for name, p in with_kv.items():
        (action,) = [a for a in p._actions if "--kv-cache" in a.option_strings]
        assert "q8_0" in action.choices, name
        assert all(f"{choice}:" in action.help for choice in ("f32", "f16", "q8_0")), action.help


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_decoding_with_a_q8_0_cache_equals_eager_on_cuda(head32_dir):
    """The graphs record the quantization of the new rows and the dequantization of the read
    ones (no host reads in either)."""
    from mistol.sampling import SamplingParams

    engine = Engine.load(head32_dir, dtype="f32", device="cuda")
    engine.kv_dtype = Q8_0
    prompt, params = list(range(5, 30)), SamplingParams(temperature=0, max_tokens=100)
    engine.cuda_graphs = False
    eager = list(engine.new_session(max_context=400).generate(prompt, params))
    engine.cuda_graphs = True
    session = engine.new_session(max_context=400)
    assert list(session.generate(prompt, params)) == eager
    assert session._graphed is not None and session.cache.k.dtype == torch.int8


def test_a_draft_whose_heads_q8_0_cannot_hold_keeps_its_default_cache(mistral_dir, tmp_path, capsys):
    """--kv-cache q8_0 is for the model that answers; a small draft model with heads of 16
    values drafts with its default cache rather than stopping the command."""
    from checkpoints import make_checkpoint
    from mistol.cli import main

    target = make_checkpoint(tmp_path / "target", window=8, hidden=128, heads=4, kv_heads=2)  # heads of 32
    status = main(["generate", "--model", str(target), "--draft", str(mistral_dir), "--kv-cache", "q8_0",
                   "--max-tokens", "4", "--temperature", "0", "--prompt", "hi", "--verbose"])
    err = capsys.readouterr().err
    assert status == 0, err
    assert f"the draft model {mistral_dir} keeps its default KV cache" in err and "multiple of 32" in err
