"""int8 / int4 weight-only quantization: llama.cpp's block formats, our kernels, the loader."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from checkpoints import make_checkpoint
from helpers import kernel_impls
from mistol import kernels, quant
from mistol.errors import MistolError
from mistol.model import backend
from mistol.quant import (
    FORMATS, QuantizedLinear, dequantize_ggml, pack_ggml, quantize_ggml, quantize_linear, unpack_ggml,
)

FMTS = ["int8", "int4"]
IMPLS = kernel_impls()
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="mistol's C kernels are not built")


@pytest.fixture(autouse=True)
def int8_kernels_for_every_row_count(monkeypatch):
    """These tests check our kernels: keep them from handing prefill-sized inputs to bf16
    matmuls (as they do on CPUs with bf16 instructions; that path has its own test)."""
    monkeypatch.setattr(backend, "native_bf16", lambda: False)


def reference_gemm(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """What the kernels compute, in float64: activations quantized per block of 32 to
    int8 (scale max|x|/127, round half to even), times the dequantized weight."""
    m, k = x.shape
    xb = x.view(m, k // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.round(xb * torch.where(d != 0, 1 / d, torch.zeros_like(d)))
    xq = (q.double() * d.double()).view(m, k)
    return xq @ layer.dequantize().double().T


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, layer: QuantizedLinear) -> None:
    ref = reference_gemm(x, layer)
    scale = x.double().abs() @ layer.dequantize().double().abs().T  # bounds the rounding of fp32 sums
    assert y.shape == ref.shape
    assert ((y.double() - ref).abs() <= 1e-5 * scale + 1e-6).all(), (y.double() - ref).abs().max()


# -- formats ---------------------------------------------------------------------------------
def test_blocks_are_llama_cpp_q8_0_and_q4_0():
    x = torch.arange(32, dtype=torch.float32) - 12  # max |x| = 19 at the end, signed
    q8 = quantize_ggml(x[None], "int8")[0, 0]
    assert q8[:2].view(torch.float16).item() == pytest.approx(19 / 127, rel=1e-3)
    assert q8[2:].view(torch.int8).tolist() == [round(v * 127 / 19 + 1e-9) for v in x.tolist()]
    q4 = quantize_ggml(x[None], "int4")[0, 0]
    d = q4[:2].view(torch.float16).item()
    assert d == pytest.approx(19 / -8, rel=1e-3)
    nibbles = torch.cat((q4[2:] & 15, q4[2:] >> 4))  # byte j: element j low, element j+16 high
    assert nibbles.tolist() == [min(15, int(v / (19 / -8) + 8.5)) for v in x.tolist()]


@pytest.mark.parametrize("fmt", FMTS)
def test_kernel_and_torch_quantizers_agree_bit_for_bit(fmt):
    torch.manual_seed(0)
    w = torch.randn(37, 256) * torch.rand(37, 1) * 3
    w[0, :32] = 0  # an all-zero block
    w[1, 3], w[1, 9] = 9.0, -9.0  # a tie in |max|: Q4_0 takes the first, with its sign
    w[2, :32] = torch.arange(32) / 2 - 8  # exact halves: roundf rounds them away from zero
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        with kernels.use("torch"):
            expected = quantize_ggml(w.to(dtype), fmt)
        assert torch.equal(quantize_ggml(w.to(dtype), fmt), expected)
        assert torch.equal(quantize_linear(w.to(dtype), fmt).to_ggml(), expected)


@pytest.mark.parametrize("fmt", FMTS)
def test_blocks_match_the_gguf_package(fmt):
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    torch.manual_seed(1)
    w = torch.randn(24, 128)
    qtype = getattr(gguf.GGMLQuantizationType, FORMATS[fmt].ggml_type)
    expected = torch.from_numpy(quants.quantize(w.numpy(), qtype))
    assert torch.equal(quantize_ggml(w, fmt).view(24, -1), expected)
    layer = QuantizedLinear.from_ggml(expected, fmt, 24, 128)
    assert torch.equal(layer.dequantize(), torch.from_numpy(quants.dequantize(expected.numpy(), qtype)))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("n,k,tiles", [(1, 96, 1), (8, 96, 1), (13, 96, 1), (64, 96, 1), (13, 8256, 3)])
def test_ggml_blocks_repack_without_requantizing(fmt, n, k, tiles):
    torch.manual_seed(n)
    w = torch.randn(n, k)
    blocks = quantize_ggml(w, fmt)
    layer = QuantizedLinear.from_ggml(blocks.numpy().tobytes(), fmt, n, k)  # as a GGUF loader would
    assert torch.equal(layer.packed, pack_ggml(blocks, fmt))
    assert torch.equal(unpack_ggml(layer.packed, n, fmt), blocks)
    assert torch.equal(layer.dequantize(), dequantize_ggml(blocks, fmt))
    assert layer.packed.shape == (tiles, -(-n // 8), k // 32 // tiles, FORMATS[fmt].group_block_bytes)
    assert torch.equal(quantize_linear(w, fmt).packed, layer.packed)  # the quantizer's tiles: the same bytes


def test_long_rows_are_cut_into_equal_tiles_of_at_most_128_blocks():
    assert [quant.tile_blocks(32 * b) for b in (1, 128, 448, 344, 129, 130, 131)] == [1, 128, 112, 86, 43, 65, 131]


# int8: half a step (max/127), plus the fp16 rounding of the scale; int4: one step
# (max/8), reached by the clamp at 15 on the side opposite the block's largest value.
@pytest.mark.parametrize("fmt,worst", [("int8", 0.57 / 127), ("int4", 1 / 8)])
def test_dequantized_error_is_bounded_by_the_step(fmt, worst):
    torch.manual_seed(2)
    w = torch.randn(16, 512)
    err = (quantize_linear(w, fmt).dequantize() - w).abs().view(16, -1, 32)
    amax = w.abs().view(16, -1, 32).amax(-1, keepdim=True)
    assert (err <= amax * worst * 1.01 + 1e-6).all()


def test_input_size_must_be_a_multiple_of_32():
    with pytest.raises(MistolError, match="layers.0.mlp.up_proj.weight: input size 100 is not a multiple of 32"):
        quantize_linear(torch.randn(8, 100), "int8", name="layers.0.mlp.up_proj.weight")
    with pytest.raises(MistolError, match="unknown quantization 'int3'"):
        quantize_linear(torch.randn(8, 64), "int3")
    with pytest.raises(MistolError, match="Q4_0 tensor \\[8, 64\\] takes 288 bytes, found 10"):
        QuantizedLinear.from_ggml(bytes(10), "int4", 8, 64)


# -- kernels ---------------------------------------------------------------------------------
# (M, N, K): the model's projections at test scale (hidden 64/256, GQA), odd N, K from one
# block to past 4096 (not a multiple of 256), decode (M=1) and prefill/batched rows.
SHAPES = [
    (1, 64, 64), (1, 32, 64), (1, 128, 64), (1, 64, 128), (1, 32002, 64),
    (1, 256, 256), (1, 128, 256), (1, 512, 256), (1, 256, 512),
    (1, 1, 32), (1, 7, 32), (3, 13, 64), (1, 257, 4096), (2, 9, 4128), (1, 40, 14336),
    (5, 300, 256), (17, 64, 2080), (70, 24, 512),
]


@needs_kernels
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
def test_kernel_matches_dequantized_reference(impl, fmt):
    torch.manual_seed(3)
    for m, n, k in SHAPES:
        layer = quantize_linear(torch.randn(n, k) * 0.05, fmt)
        x = torch.randn(m, k)
        x[0, :32] = 0  # an all-zero activation block
        with kernels.use(impl):
            y = layer(x)
        assert_close_to_reference(y, x, layer)


@needs_kernels
@pytest.mark.parametrize("impl", IMPLS)
def test_q8_0_blocks_holding_minus_128_are_exact(impl):
    """llama.cpp never writes -128, but a GGUF file may hold it; maddubs reads |-128| as 128."""
    torch.manual_seed(7)
    blocks = quantize_ggml(torch.randn(11, 64), "int8")
    blocks[:, :, 2::3] = 0x80
    layer = QuantizedLinear.from_ggml(blocks, "int8", 11, 64)
    x = torch.randn(2, 64) * 10
    with kernels.use(impl):
        assert_close_to_reference(layer(x), x, layer)


@needs_kernels
@pytest.mark.parametrize("fmt", FMTS)
def test_avx2_and_scalar_agree_and_threads_do_not_change_results(fmt):
    if "avx2" not in IMPLS:
        pytest.skip("this CPU has no AVX2")
    torch.manual_seed(4)
    layer = quantize_linear(torch.randn(203, 1024), fmt)
    x = torch.randn(6, 1024)
    with kernels.use("scalar"):
        scalar = layer(x)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(layer(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])  # each row summed by one thread
    torch.testing.assert_close(outs[0], scalar, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("fmt", FMTS)
def test_vnni_and_avx2_give_the_same_bits(fmt):
    if "avx512vnni" not in IMPLS:
        pytest.skip("this CPU has no AVX512-VNNI")
    torch.manual_seed(6)
    layer = quantize_linear(torch.randn(203, 1024), fmt)
    for rows in (1, 5):
        x = torch.randn(rows, 1024) * 3
        x[0, :32] = torch.linspace(-127, 127, 32)  # extremes of the int8 activations
        with kernels.use("avx2"):
            avx2 = layer(x)
        with kernels.use("avx512vnni"):
            vnni = layer(x)
        assert torch.equal(avx2, vnni)


@needs_kernels
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
def test_tiles_change_the_layout_not_the_sums(impl, fmt, monkeypatch):
    torch.manual_seed(11)
    w, x = torch.randn(21, 8256), torch.randn(3, 8256)  # 3 tiles of 86 blocks, a padded last group
    tiled = quantize_linear(w, fmt)
    monkeypatch.setattr(quant, "TILE_BLOCKS", 10**6)
    whole = quantize_linear(w, fmt)
    assert tiled.packed.shape[0] == 3 and whole.packed.shape[0] == 1
    with kernels.use(impl):
        for rows in (x[:1], x):  # a decode step (tile by tile) and several rows (group by group)
            assert torch.equal(tiled(rows), whole(rows))
    assert torch.equal(tiled.dequantize(), whole.dequantize())


@needs_kernels
@pytest.mark.parametrize("fmt", FMTS)
def test_compiled_dequantization_matches_torch_ops(fmt, monkeypatch):
    """The prefill path's dequantization in C: float32 values exact, bf16 rounded once."""
    torch.manual_seed(10)
    layer = quantize_linear(torch.randn(45, 96), fmt)  # a padded last group
    f32 = kernels.dequantize(fmt, layer.packed[0], torch.float32)  # (one tile: the groups in row order)
    monkeypatch.setattr(kernels, "_impl", "torch")  # the same function on PyTorch ops
    torch_f32 = quant._dequantize_packed(layer.packed, fmt, torch.float32)
    monkeypatch.undo()
    assert torch.equal(f32, torch_f32)
    assert torch.equal(f32[45:], torch.zeros(3, 96))
    assert torch.equal(kernels.dequantize(fmt, layer.packed[0], torch.bfloat16), f32.to(torch.bfloat16))


def test_module_shapes_dtypes_and_memory():
    torch.manual_seed(5)
    linear = torch.nn.Linear(64, 40, bias=False)
    layer = quantize_linear(linear, "int4")
    assert layer.packed.dtype == torch.uint8 and layer.weight_nbytes == 5 * 2 * 144
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    assert layer.to(torch.bfloat16).packed.dtype == torch.uint8  # a dtype cast leaves the weight alone
    assert list(layer.state_dict()) == ["packed"]
    torch.testing.assert_close(y.float(), x.float() @ layer.dequantize().T, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("fmt", FMTS)
def test_torch_fallback_says_so_once_and_matches(fmt, monkeypatch, capsys):
    torch.manual_seed(6)
    layer = quantize_linear(torch.randn(70, 128), fmt)
    x = torch.randn(4, 128)
    monkeypatch.setattr(kernels, "_loaded", True)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_load_error", "mistol/_kernels*.so is not built")
    monkeypatch.setattr(kernels, "_noticed", False)
    monkeypatch.setattr(kernels, "_impl", "auto")
    y1, y2 = layer(x), layer(x)
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "kernels unavailable" in notice[0] and "PyTorch ops" in notice[0]
    torch.testing.assert_close(y1, x @ layer.dequantize().T, rtol=1e-5, atol=1e-5)
    assert torch.equal(y1, y2)


# -- the model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_256(tmp_path_factory):
    """A 256-wide model whose projections have the scale of real checkpoints (std 0.02,
    Mistral's initializer_range): the test checkpoints' 0.2 makes attention so saturated
    that any rounding (bf16 included) flips outputs at random."""
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path_factory.mktemp("q256"), hidden=256, heads=8, kv_heads=2, tokenizer=False)
    state = load_file(path / "model.safetensors")
    state = {k: v * 0.1 if k.endswith("proj.weight") else v for k, v in state.items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _logits(path, tokens, **load_kw):
    from mistol.engine import Engine
    from mistol.weights import load_model

    session = Engine(load_model(path, **load_kw)).new_session(chunk_size=64)
    return torch.cat([session.feed(t, all_logits=True) for t in tokens])


@pytest.mark.slow
def test_quantized_model_logits_stay_close_to_f32(model_256):
    from mistol.weights import load_model

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (96,), generator=g).tolist() for _ in range(4)]
    ref = torch.cat([_logits(model_256, [p]) for p in prompts])
    stats = {}
    for name, kw in {"bf16": dict(dtype=torch.bfloat16), "int8": dict(quant="int8"), "int4": dict(quant="int4")}.items():
        out = torch.cat([_logits(model_256, [p], **kw) for p in prompts])
        stats[name] = (((out - ref).norm() / ref.norm()).item(), (out.argmax(-1) == ref.argmax(-1)).float().mean().item())
    print("relative logit error, top-1 agreement with f32:", stats)
    (rel8, top8), (rel4, top4), (_, top_bf16) = stats["int8"], stats["int4"], stats["bf16"]
    # Random logits have near-ties that any rounding flips: even bf16 agrees on ~98.5%.
    # int8 must be as faithful as bf16 (its relative error is ~0.8%, bf16's ~0.5%).
    assert rel8 < 0.015 and top8 >= 0.975 and top8 >= top_bf16 - 0.01
    assert rel4 < 0.15 and top4 >= 0.6
    model = load_model(model_256, quant="int8")
    assert type(model.layers[1].mlp.down_proj).__name__ == "QuantizedLinear"
    assert type(model.lm_head).__name__ == "QuantizedLinear"
    assert model.embed_tokens.weight.dtype == torch.float32


def test_quantized_incremental_decode_matches_one_pass(model_256):
    from mistol.engine import Engine
    from mistol.weights import load_model

    engine = Engine(load_model(model_256, quant="int4"))
    tokens = torch.randint(3, 32000, (20,), generator=torch.Generator().manual_seed(9)).tolist()
    full = engine.new_session().feed(tokens, all_logits=True)
    session = engine.new_session()
    steps = torch.stack([session.feed(tokens[: i + 1]) for i in range(len(tokens))])
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_a_bf16_checkpoints_embedding_stays_its_stored_rows_when_quantized(tmp_path, tie):
    """Quantized, a model computes in float32, but its embedding stays the checkpoint's bf16
    rows (a view of the mapped file: no float32 copy of twice the bytes), each looked-up row
    converted exactly: the logits are a float32 embedding's, bit for bit, and a tied head is
    the same int8 copy."""
    from safetensors.torch import load_file, save_file

    from mistol.engine import Engine
    from mistol.model.embedding import FloatRowsEmbedding
    from mistol.weights import load_model

    path = make_checkpoint(tmp_path / "m", hidden=128, heads=4, kv_heads=2, tie=tie, tokenizer=False)
    stored = {k: v.to(torch.bfloat16) for k, v in load_file(path / "model.safetensors").items()}
    save_file(stored, path / "model.safetensors")
    model = load_model(path, quant="int8")
    embedding = model.embed_tokens
    assert isinstance(embedding, FloatRowsEmbedding) and embedding.weight.dtype == torch.bfloat16
    assert model.dtype == torch.float32 and isinstance(model.lm_head, QuantizedLinear)
    assert not any(t.dtype == torch.float32 and t.shape[0] == embedding.num_embeddings
                   for t in [*model.parameters(), *model.buffers()])
    tokens = torch.randint(3, embedding.num_embeddings, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    ours = Engine(model).new_session().feed(tokens, all_logits=True)

    copy = load_model(path, quant="int8")  # the same, with a float32 copy looked up instead
    copy.embed_tokens = torch.nn.Embedding.from_pretrained(stored["model.embed_tokens.weight"].float())
    if tie:
        assert torch.equal(copy.lm_head.packed, model.lm_head.packed)
    assert torch.equal(ours, Engine(copy).new_session().feed(tokens, all_logits=True))


PEAK_RSS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from mistol.quant import quantize_linear
    from mistol.weights import load_model
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    import tqdm  # warm up: code pages of the libraries count in RSS too, but are not data
    torch.ones(4096, dtype=torch.bfloat16).float().to(torch.bfloat16)
    quantize_linear(torch.randn(64, 64), "int8")(torch.randn(2, 64))
    before = status("VmRSS")
    model = load_model(sys.argv[1], quant="int8")
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(size, status("VmHWM") - before)
""")


@pytest.mark.parametrize("saved", ["float32", "bfloat16"])
@pytest.mark.slow
def test_peak_memory_while_quantizing_stays_near_the_quantized_size(tmp_path, saved):
    """Each linear weight is quantized as it is read and its mapped pages given back."""
    path = make_checkpoint(tmp_path / "big", hidden=512, layers=6, heads=8, kv_heads=2, tokenizer=False)
    if saved != "float32":
        from safetensors.torch import load_file, save_file

        state = {k: v.to(getattr(torch, saved)) for k, v in load_file(path / "model.safetensors").items()}
        save_file(state, path / "model.safetensors")
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    size, growth = map(int, out.stdout.split())
    # int8 linears (~32 MB) + the embedding (~66 MB in float32; a bf16 file's stays its ~33 MB of stored rows)
    assert 60e6 < size < 110e6
    assert growth <= 1.3 * size, f"peak RSS grew {growth / 1e6:.0f} MB for {size / 1e6:.0f} MB of weights"
    shutil.rmtree(path)


# -- front ends ------------------------------------------------------------------------------
def test_engine_and_cli_pass_quant_through(mistral_dir, capsys):
    from mistol.cli import build_parser, main
    from mistol.engine import Engine

    engine = Engine.load(str(mistral_dir), quant="int4")
    assert type(engine.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    args = build_parser().parse_args(["generate", "--model", "m", "-p", "x", "--quant", "int8"])
    assert args.quant == "int8"
    assert main(["generate", "--model", str(mistral_dir), "-p", "Hello", "--quant", "int8",
                 "--max-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_auto_loads_large_checkpoints_as_int8_on_cpu(mistral_dir, monkeypatch):
    import mistol.engine
    from mistol.engine import Engine

    if kernels.impl_name() in ("scalar", "torch"):
        pytest.skip("this CPU has no SIMD int8 kernels: auto keeps floats (tests/test_devices.py)")

    small = Engine.load(mistral_dir)  # below the threshold: exact f32
    assert not any(isinstance(m, QuantizedLinear) for m in small.model.modules())
    assert small.model.dtype == torch.float32
    monkeypatch.setattr(mistol.engine, "AUTO_INT8_BYTES", 1)  # as if it were a 7B checkpoint
    large = Engine.load(mistral_dir)
    layers = [m for m in large.model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.fmt == "int8" for m in layers)
    assert large.model.embed_tokens.weight.dtype == torch.float32
    explicit = Engine.load(mistral_dir, dtype="bf16")  # an explicit format is kept
    assert not any(isinstance(m, QuantizedLinear) for m in explicit.model.modules())


@pytest.mark.parametrize("fmt", FMTS)
def test_prefill_rows_use_bf16_matmuls_where_the_cpu_has_amx_tiles(fmt, monkeypatch):
    torch.manual_seed(0)
    layer = quantize_linear(torch.randn(200, 256), fmt)
    exact = lambda x: (x.double() @ layer.dequantize().double().T)  # noqa: E731
    monkeypatch.setattr(backend, "native_bf16", lambda: True)
    monkeypatch.setattr(backend, "bf16_tiles", lambda: True)  # (int8/int4: only where AMX tiles pay)
    rows = backend.BF16_MIN_ROWS[fmt]
    x = torch.randn(rows, 256)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 200)
    error = ((y.double() - exact(x)).norm() / exact(x).norm()).item()
    assert 1e-5 < error < 1e-2  # bf16 rounding: not the int8-activation kernel, not exact f32
    if kernels.available():  # fewer rows (a decode step) stay on the kernels
        few = torch.randn(rows - 1, 256)
        assert_close_to_reference(layer(few), few, layer)


@pytest.mark.parametrize("fmt", FMTS)
def test_without_amx_tiles_prefill_rows_stay_on_the_kernels(fmt, monkeypatch):
    """AVX512-BF16 alone: the several-row kernels outrun dequantize + bf16 matmul at any length."""
    if not kernels.available():
        pytest.skip("the C kernels are not built")
    torch.manual_seed(0)
    layer = quantize_linear(torch.randn(200, 256), fmt)
    monkeypatch.setattr(backend, "native_bf16", lambda: True)
    monkeypatch.setattr(backend, "bf16_tiles", lambda: False)
    assert backend.bf16_prefill_rows(fmt) is None
    assert backend.bf16_prefill_rows("Q4_K") == backend.BF16_MIN_ROWS["Q4_K"]  # (the k-quants keep theirs)
    x = torch.randn(2 * backend.BF16_MIN_ROWS[fmt], 256)
    assert_close_to_reference(layer(x), x, layer)


@pytest.mark.slow
def test_int8_agrees_with_f32_on_a_trained_model():
    """Top-1 agreement where predictions are not near-ties (random weights, or random token ids
    fed to a small model, are mostly ties that any rounding flips): the demo model on its own
    kind of conversation, along the reply f32 writes greedily."""
    import random

    from mistol.demo_problems import make_problem
    from mistol.engine import Engine
    from mistol.sampling import SamplingParams

    f32, int8 = Engine.load("demo", dtype="f32"), Engine.load("demo", dtype="f32", quant="int8")
    rng = random.Random(5)
    agree = total = clear_agree = clear = 0
    for _ in range(12):
        question = make_problem(rng).question
        prompt = f32.tokenizer.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                                      add_bos=True, parse_special=True)
        reply = list(f32.new_session().generate(prompt, SamplingParams(temperature=0, max_tokens=40)))
        ref = f32.new_session().feed(prompt + reply, all_logits=True)
        out = int8.new_session().feed(prompt + reply, all_logits=True)
        same = ref.argmax(-1) == out.argmax(-1)
        # the reply: each of its tokens as predicted from what comes before it
        agree += same[len(prompt) - 1 : -1].sum().item()
        total += len(reply)
        # every position whose f32 prediction is not a near-tie (the user's words are mostly guesses)
        top2 = ref.topk(2, dim=-1).values
        decided = top2[:, 0] - top2[:, 1] > 0.1
        clear_agree += same[decided].sum().item()
        clear += decided.sum().item()
    print(f"int8 top-1 agreement with f32 on the demo model: reply {agree}/{total}, "
          f"positions without a near-tie {clear_agree}/{clear}")
    assert agree / total >= 0.99 and clear_agree / clear >= 0.99


def awkward_weights(n: int = 24, k: int = 256) -> torch.Tensor:
    """Blocks a quantizer can get wrong: all zeros, -0.0, two values of the largest magnitude with
    opposite signs, exact halves after scaling, small and large scales."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(n, k, generator=g) * torch.logspace(-6, 4, n)[:, None]
    w[0, :32] = 0
    w[1, 32:64] = -0.0
    w[2, 64:96] = torch.arange(-16, 16) / 4  # halves once scaled
    w[3, 5], w[3, 9] = -w[3, :32].abs().max() * 2, w[3, :32].abs().max() * 2  # a tie: the first one's sign
    w[4, 40], w[4, 33] = 7.0, -7.0
    w[5] = torch.randint(-127, 128, (k,), generator=g).float()
    return w


@needs_kernels
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_compiled_quantizer_gives_the_reference_blocks_on_awkward_weights(fmt, dtype, monkeypatch):
    w = awkward_weights().to(dtype)
    compiled = quantize_ggml(w, fmt)
    monkeypatch.setattr(kernels, "available", lambda: False)  # the torch ops' reference of llama.cpp's code
    assert torch.equal(compiled, quantize_ggml(w, fmt))
