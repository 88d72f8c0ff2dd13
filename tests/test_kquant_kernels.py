"""The kernels for llama.cpp's k-quant and legacy 4/5-bit blocks (csrc/kquant_gemv.c), read
in the file's row order: block decoding against the gguf package's dequantization, products
against dequantize-then-multiply in float64, the portable and SIMD paths bit for bit, and
the compiled decode layer with a layer that mixes formats against the PyTorch layers. Q4_K,
Q5_K and Q6_K run in two layouts (the file's rows, and 8 rows interleaved: Q4_Kx8, Q5_Kx8,
Q6_Kx8), which give the same bits.

Blocks are random bytes (every bit pattern is a valid block) with scales set to a real
model's magnitudes: each quant, scale and min then takes every value it can.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from helpers import kernel_impls
from mistol import kernels
from mistol.block_quant import ROW_FORMATS, SCALE_OFFSETS, BlockEmbedding, BlockLinear
from mistol.model.linear import linear_many
from mistol.quant import QuantizedLinear, quantize_linear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="mistol's C kernels are not built")



def random_blocks(fmt: str, rows: int, k: int, seed: int = 0, scale: float = 1e-3) -> torch.Tensor:
    """uint8 [rows, bytes per row]: random quants, fp16 scales in [scale, 4 * scale)."""
    rng = np.random.default_rng(seed)
    block, nbytes = ROW_FORMATS[fmt]
    raw = rng.integers(0, 256, size=(rows, k // block, nbytes), dtype=np.uint8)
    for off in SCALE_OFFSETS[fmt]:
        d = rng.uniform(scale, 4 * scale, size=(rows, k // block)).astype(np.float16)
        raw[:, :, off : off + 2] = d.view(np.uint8).reshape(rows, k // block, 2)
    return torch.from_numpy(raw.reshape(rows, -1))


def reference_weight(fmt: str, blocks: torch.Tensor) -> torch.Tensor:
    """The gguf package's dequantization (not ours), in float64."""
    return torch.from_numpy(dequantize(blocks.numpy(), gguf.GGMLQuantizationType[fmt]).astype(np.float64))


def activation_error_bound(w: torch.Tensor, x: torch.Tensor, block: int) -> torch.Tensor:
    """The largest |x W^T - x' W^T| for x' = x rounded to int8 per `block` inputs with scale
    max|x| / 127: each input moves by at most half a step, max|x of its block| / 254, so row n
    is off by at most sum_b (its step / 2) * sum_{j in b} |w_nj|; plus float32 rounding of
    the per-block sums, 1e-5 of sum |w x|."""
    m, k = x.shape
    half_step = x.abs().reshape(m, k // block, block).amax(-1) / 254  # [M, blocks]
    w_abs = w.abs().reshape(w.shape[0], k // block, block).sum(-1)  # [N, blocks]
    return 1.0001 * half_step @ w_abs.T + 1e-5 * x.abs() @ w.abs().T


@pytest.mark.parametrize("fmt", ROW_FORMATS)
def test_block_decoding_matches_the_gguf_package(fmt):
    blocks = random_blocks(fmt, 24, 512)
    ref = reference_weight(fmt, blocks)
    ours = kernels.dequantize_rows(fmt, blocks, 512, torch.float32)
    assert torch.equal(ours.double(), ref)  # the same float32 operations, in order
    assert torch.equal(kernels.dequantize_rows(fmt, blocks, 512, torch.bfloat16), ours.to(torch.bfloat16))
    assert torch.equal(BlockLinear(512, 24, fmt, blocks).dequantize(), ours)


def make_layer(fmt: str, k: int, n: int, blocks: torch.Tensor) -> BlockLinear:
    """The layer of `blocks` in the layout `fmt` names (a GGUF type, or "Q4_Kx8")."""
    if fmt.endswith("x8"):
        made = BlockLinear.for_kernels(k, n, file_type(fmt), blocks)
        assert made.fmt == fmt
        return made
    return BlockLinear(k, n, fmt, blocks)


LAYOUTS = [*ROW_FORMATS, "Q4_Kx8", "Q5_Kx8", "Q6_Kx8"]


def file_type(fmt: str) -> str:
    return fmt.removesuffix("x8")


@pytest.mark.parametrize("impl", kernel_impls())
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_products_match_dequantize_then_multiply_in_float64(fmt, impl, rows):
    """Within the bound that int8 activations allow (per 256 inputs for the k-quants, per 32
    for the legacy types), and not trivially: the error is a visible part of that bound."""
    n, k = 37, 768  # rows not a multiple of the 8-row units the threads share
    blocks = random_blocks(file_type(fmt), n, k, seed=rows)
    w = reference_weight(file_type(fmt), blocks)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    with kernels.use(impl):
        y = make_layer(fmt, k, n, blocks)(x)
    ref = x.double() @ w.T
    bound = activation_error_bound(w, x.double(), ROW_FORMATS[file_type(fmt)][0])
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), (err / bound).max()
    assert (err / bound).max() > 0.01


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_portable_and_simd_kernels_give_the_same_bits(fmt):
    """Exact integer sums per block, then the same float operations in the same order."""
    impls = [i for i in kernel_impls() if i != "scalar"]
    if not impls:
        pytest.skip("this CPU runs only the portable kernels")
    blocks = random_blocks(file_type(fmt), 64, 2048, seed=3)
    x = torch.randn(5, 2048, generator=torch.Generator().manual_seed(3)) * 3
    made = make_layer(fmt, 2048, 64, blocks)
    with kernels.use("scalar"):
        ref = made(x)
    for impl in impls:
        with kernels.use(impl):
            assert torch.equal(made(x), ref), impl


@pytest.mark.parametrize("fmt", ["Q4_K", "Q5_K", "Q6_K"])
def test_repacked_layouts_give_the_bits_of_the_files_rows(fmt):
    """Q4_Kx8 / Q5_Kx8 / Q6_Kx8 (8 rows interleaved) against the file's rows: same sums, same
    float steps per row, so the same bits; and the same decoded values (the gguf package's)."""
    n, k = 45, 1024
    blocks = random_blocks(fmt, n, k, seed=4)
    rows, x8 = BlockLinear(k, n, fmt, blocks), make_layer(fmt + "x8", k, n, blocks)
    assert torch.equal(x8.dequantize(), rows.dequantize())
    assert torch.equal(x8.dequantize().double(), reference_weight(fmt, blocks))
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(4))
    for impl in kernel_impls():
        with kernels.use(impl):
            assert torch.equal(x8(x), rows(x)), impl


@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K", "Q5_0"])
def test_a_tied_embedding_looks_tokens_up_in_its_repacked_head(fmt):
    """A tied k-quant embedding's head is a repacked copy (Q4_Kx8, Q6_Kx8): tokens are then
    looked up in it, not in the file's rows, so the file's pages are not held a second time.
    The rows are the gguf package's values, in any order, repeated, across lookup chunks and
    in a last group of fewer than 8 rows. Types the head keeps as they are (Q5_0) look up
    their own rows."""
    n, k = 203, 512
    blocks = random_blocks(fmt, n, k, seed=5)
    embedding = BlockEmbedding(n, k, fmt, blocks.clone(), tied=True)
    assert embedding.head_is_a_copy == (fmt != "Q5_0")
    ids = torch.cat((torch.randperm(n, generator=torch.Generator().manual_seed(5)), torch.tensor([202, 0, 202, 7, 8])))
    if embedding.head_is_a_copy:
        embedding.rows.packed.zero_()  # (what the file held: lookups must not read it)
    looked_up = embedding(ids.view(1, -1))
    assert looked_up.shape == (1, ids.numel(), k)
    assert torch.equal(looked_up[0].double(), reference_weight(fmt, blocks)[ids])


@pytest.mark.parametrize("impl", kernel_impls())
@pytest.mark.parametrize("fmt", ["Q4_Kx8", "Q5_Kx8", "Q6_Kx8", "Q4_1", "Q5_0", "Q5_1"])
def test_several_rows_at_once_get_each_rows_bits_alone(fmt, impl, monkeypatch):
    """A verify pass or a short prompt multiplies several rows at once (each piece of a block
    unpacked once for up to 8 rows, a legacy row's blocks for up to 16): each row must come
    out exactly as a decode step computes it alone, or speculative greedy decoding would
    drift from plain decoding."""
    from mistol.model import backend

    monkeypatch.setattr(backend, "native_bf16", lambda: False)  # (keep every row count on the kernels)
    # (the legacy types: a last group of 5 blocks, which their kernels take apart)
    n, k = 45, 1024 if fmt.endswith("x8") else 1024 + 5 * 32
    layer = make_layer(fmt, k, n, random_blocks(file_type(fmt), n, k, seed=6))
    x = torch.randn(19, k, generator=torch.Generator().manual_seed(6)) * 3
    x[1, :256] = 0  # an all-zero activation block
    x[2, -256:] = torch.linspace(-1, 1, 256)  # activations reaching +-127
    with kernels.use(impl):
        alone = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
        for m in (2, 3, 8, 9, 16, 19):
            assert torch.equal(layer(x[:m]), alone[:m]), m


def test_one_call_multiplies_matrices_of_mixed_formats():
    """q/k/v of a Q4_K_M layer (Q4_K, Q4_K, Q6_K) with an int8 one: one kernel call, and
    each matrix's outputs within its own bound."""
    k = 512
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(5))
    layers = [BlockLinear(k, 24, "Q4_K", random_blocks("Q4_K", 24, k, 1)),
              BlockLinear(k, 16, "Q6_K", random_blocks("Q6_K", 16, k, 2)),
              BlockLinear(k, 8, "Q5_0", random_blocks("Q5_0", 8, k, 3)),
              quantize_linear(torch.randn(16, k) * 0.02, "int8")]
    y = linear_many(x, layers)
    col = 0
    for layer in layers:
        n = layer.out_features
        if isinstance(layer, BlockLinear):
            w = reference_weight(layer.fmt, layer.packed)
            bound = activation_error_bound(w, x.double(), ROW_FORMATS[layer.fmt][0])
            assert ((y[:, col : col + n].double() - x.double() @ w.T).abs() <= bound).all(), layer.fmt
        else:
            assert torch.equal(y[:, col : col + n], layer(x))
        col += n


def test_prefill_path_multiplies_dequantized_slabs(monkeypatch):
    """Many rows take the dequantized matmul (bf16 on CPUs with bf16 dot products): with
    float32 the result is dequantize-then-multiply to float32 rounding."""
    from mistol.model import backend

    monkeypatch.setattr(backend, "quantized_route", lambda rows, device, fmt: backend.DEQUANTIZED)
    blocks = random_blocks("Q4_K", 40, 512)
    w = reference_weight("Q4_K", blocks)
    x = torch.randn(200, 512, generator=torch.Generator().manual_seed(7))
    y = BlockLinear(512, 40, "Q4_K", blocks)(x)
    assert torch.allclose(y.double(), x.double() @ w.T, rtol=1e-5, atol=1e-5)


def test_the_slab_buffer_is_reused_between_calls_and_kept_per_thread(monkeypatch):
    """Prefill's dequantized slabs land in one buffer per thread, kept between calls (fresh
    pages for each call cost a small model's short prompt a fifth of its time): a larger layer,
    then a smaller one in another dtype, each still equals dequantize-then-multiply; another
    thread gets a buffer of its own."""
    import threading

    from mistol.model import backend
    from mistol.quant import slab_scratch

    monkeypatch.setattr(backend, "quantized_route", lambda rows, device, fmt: backend.DEQUANTIZED)
    x = torch.randn(70, 512, generator=torch.Generator().manual_seed(8))
    for rows, seed in ((64, 1), (24, 2), (64, 3)):
        blocks = random_blocks("Q5_0", rows, 512, seed=seed)
        y = BlockLinear(512, rows, "Q5_0", blocks)(x)
        assert torch.allclose(y.double(), x.double() @ reference_weight("Q5_0", blocks).T, rtol=1e-5, atol=1e-5)
    mine = slab_scratch(8, 512, torch.bfloat16)
    assert slab_scratch(16, 64, torch.float32).data_ptr() == mine.data_ptr()  # the same memory, reused
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(slab_scratch(8, 512, torch.bfloat16).data_ptr()))
    thread.start(), thread.join()
    assert theirs and theirs[0] != mine.data_ptr()


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_a_nan_scale_stays_nan_in_bfloat16(fmt):
    """A damaged file's fp16 scale (or min) that is NaN makes its block's values NaN; rounded to
    bfloat16 (prefill's slabs) they are still NaN, as torch's float32 -> bfloat16 keeps them,
    whatever the NaN's payload (0x7fff: every mantissa bit set, which a plain round-to-nearest
    add would carry into the sign)."""
    file_fmt = fmt.removesuffix("x8")
    for nan, off in itertools.product((0x7E00, 0x7FFF, 0xFFFF, 0x7E07), SCALE_OFFSETS[file_fmt]):
        blocks = random_blocks(file_fmt, 8, 256)
        blocks[0, off : off + 2] = torch.from_numpy(np.array([nan], dtype=np.uint16).view(np.uint8))
        layer = make_layer(fmt, 256, 8, blocks)
        f32 = layer._dequantize(0, 8, torch.float32)
        bf16 = layer._dequantize(0, 8, torch.bfloat16)
        assert f32[0, :32].isnan().all(), (hex(nan), off)
        assert torch.equal(bf16.isnan(), f32.isnan()), (hex(nan), off)
        assert torch.equal(bf16[~bf16.isnan()], f32.to(torch.bfloat16)[~bf16.isnan()]), (hex(nan), off)


def per_256(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows [n, k] -> int8 values per block of 256 and the blocks' scales [n, k / 256]:
    d = max|v| / 127, q = v * (1 / d) rounded to nearest even (all in float32)."""
    n, k = v.shape
    blocks = v.reshape(n, k // 256, 256)
    d = (np.abs(blocks).max(-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    return np.rint(blocks * inv[..., None]).astype(np.int64), d


def requantized_product(w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the int8 prefill route computes, in numpy: weights and activations each rounded
    to int8 per 256, exact integer sums per block, then per block in float32 the sum times
    (weight scale * activation scale), added block after block. Returns y and the weights'
    int8 values times their scales (float64)."""
    qw, dw = per_256(w.numpy())
    qa, da = per_256(x.numpy())
    sums = np.einsum("mib,nib->mni", qa, qw)  # [M, N, blocks], exact
    y = np.zeros(sums.shape[:2], np.float32)
    for i in range(sums.shape[2]):
        scale = (dw[None, :, i] * da[:, None, i]).astype(np.float32)
        y = (y + sums[:, :, i].astype(np.float32) * scale).astype(np.float32)
    w8 = (qw * dw[..., None].astype(np.float64)).reshape(w.shape)
    return torch.from_numpy(y), torch.from_numpy(w8)


vnni_only = pytest.mark.skipif("avx512vnni" not in kernel_impls(), reason="the int8 prefill route runs on AVX512-VNNI")


@vnni_only
@pytest.mark.parametrize("fmt", ["Q4_Kx8", "Q5_Kx8", "Q6_Kx8"])
def test_the_int8_prefill_route_is_the_arithmetic_it_describes(fmt, monkeypatch):
    """Long prompts multiply the k-quants requantized to int8 per 256 (csrc/requantize.c): every
    bit as a numpy model of that arithmetic gives (rows not a multiple of 8, activation rows in
    eights and one by one), and within its two roundings of the float64 product: the weights'
    (half a step of each block) and the activations' (activation_error_bound)."""
    from mistol.model import backend

    monkeypatch.setattr(backend, "quantized_route", lambda rows, device, f: backend.INT8_PREFILL)
    n, k = 37, 1024  # (5 groups of 8 rows: with AMX tiles, two pairs and a group alone)
    blocks = random_blocks(file_type(fmt), n, k, seed=10)
    layer = make_layer(fmt, k, n, blocks)
    x = torch.randn(35, k, generator=torch.Generator().manual_seed(10))
    x[3, :256] = 0  # an all-zero activation block
    for m in (35, 19, 1):  # (AMX: 16 rows at a time and rows of padding; VNNI: 8, then 1 by 1)
        want, w8 = requantized_product(layer.dequantize(), x[:m])
        assert torch.equal(layer(x[:m]), want), m
    y = layer(x)
    w = reference_weight(file_type(fmt), blocks)
    step = w.abs().reshape(n, k // 256, 256).amax(-1, keepdim=True) / 127
    assert ((w8 - w).abs().reshape(n, k // 256, 256) <= step * (0.5 + 1e-5)).all()  # (ties: float32 rounding)
    err = (y.double() - x.double() @ w.T).abs()
    bound = activation_error_bound(w8, x.double(), 256) + x.double().abs() @ (w8 - w).abs().T
    assert (err <= bound).all(), (err / bound).max()
    assert (err / bound).max() > 0.01


@pytest.mark.skipif(not kernels.int8_tiles(), reason="the int8 prefill route multiplies in AMX tiles only on AMX CPUs")
def test_the_int8_prefill_route_without_amx_tiles_is_the_same_arithmetic():
    """On an AMX CPU the route multiplies in tiles; its AVX512-VNNI path (MISTOL_AMX=0, read
    once per process: a process of its own) must pass the same test."""
    test = f"{__file__}::test_the_int8_prefill_route_is_the_arithmetic_it_describes"
    env = {**os.environ, "MISTOL_AMX": "0"}
    script = ("import sys; from mistol import kernels; assert not kernels.int8_tiles(); "
              "import pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', sys.argv[1]]))")
    run = subprocess.run([sys.executable, "-c", script, test], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "3 passed" in run.stdout


@pytest.mark.skipif(not kernels.int8_tiles(), reason="the int8 prefill route multiplies in AMX tiles only on AMX CPUs")
def test_the_routes_tiles_and_pytorchs_take_turns_in_one_thread(monkeypatch):
    """The route configures AMX tiles in the calling thread (and releases them); PyTorch's
    bf16 matmuls (oneDNN's AMX kernels on such a CPU) run in the same threads between its
    calls, and neither may leave the other a wrong configuration."""
    from mistol.model import backend

    monkeypatch.setattr(backend, "quantized_route", lambda rows, device, f: backend.INT8_PREFILL)
    layer = make_layer("Q6_Kx8", 1024, 64, random_blocks(file_type("Q6_Kx8"), 64, 1024, seed=3))
    x = torch.randn(48, 1024, generator=torch.Generator().manual_seed(3))
    want, _ = requantized_product(layer.dequantize(), x)
    a, b = torch.randn(256, 512).bfloat16(), torch.randn(512, 512).bfloat16()
    exact = a.double() @ b.double()
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for _ in range(5):
                assert ((a @ b).double() - exact).abs().max() < 0.5
                assert torch.equal(layer(x), want)
    finally:
        torch.set_num_threads(before)


@vnni_only
def test_a_nan_in_the_weights_stays_nan_on_the_int8_prefill_route(monkeypatch):
    from mistol.model import backend

    monkeypatch.setattr(backend, "quantized_route", lambda rows, device, f: backend.INT8_PREFILL)
    for fmt in ("Q4_Kx8", "Q5_Kx8", "Q6_Kx8"):
        blocks = random_blocks(file_type(fmt), 16, 512)
        off = SCALE_OFFSETS[file_type(fmt)][0]
        blocks[3, off : off + 2] = torch.from_numpy(np.array([0x7E00], dtype=np.uint16).view(np.uint8))
        y = make_layer(fmt, 512, 16, blocks)(torch.randn(64, 512))
        assert y[:, 3].isnan().all() and not y[:, [0, 1, 2, *range(4, 16)]].isnan().any(), fmt


def q5_0_as_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_0 rows (llama.cpp's bytes) -> Q8_0 rows of the same values: d, then q - 16."""
    b = blocks.numpy().reshape(-1, 22)
    qh = b[:, 2:6].copy().view("<u4")
    qs = b[:, 6:].astype(np.int16)
    fifth = (qh >> np.arange(32)) & 1
    q = np.concatenate([qs & 15, qs >> 4], axis=1) | (fifth << 4).astype(np.int16)
    q8 = np.concatenate([b[:, :2], (q - 16).astype(np.int8).view(np.uint8)], axis=1)
    return torch.from_numpy(q8.reshape(blocks.shape[0], -1).copy())


@pytest.mark.parametrize("impl", kernel_impls())
def test_q5_0_on_the_int8_route_is_the_int8_product_of_its_own_values(impl, monkeypatch):
    """Long prompts multiply Q5_0 as int8 blocks holding its values (d, q - 16; converted 8
    rows at a time in C): every bit as the int8 kernels give for Q8_0 blocks that numpy made
    from the file's bytes, rows not a multiple of 8, one activation row and many."""
    from mistol.model import backend

    monkeypatch.setattr(backend, "quantized_route", lambda rows, device, f: backend.INT8_PREFILL)
    n, k = 37, 768
    blocks = random_blocks("Q5_0", n, k, seed=12)
    q8 = QuantizedLinear.from_ggml(q5_0_as_q8_0(blocks), "int8", n, k)
    assert torch.equal(q8.dequantize().double(), reference_weight("Q5_0", blocks))
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(12))
    with kernels.use(impl):
        for m in (1, 3, 40):
            want = kernels.gemm_matrices(x[:m], [kernels.matrix("int8", q8.packed, n)])
            assert torch.equal(BlockLinear(k, n, "Q5_0", blocks)(x[:m]), want), m


@pytest.mark.parametrize("impl", kernel_impls())
@pytest.mark.parametrize("fmt", ["Q4_1", "Q5_0", "Q5_1"])
def test_legacy_types_on_the_int8_route_match_dequantize_then_multiply_in_float64(fmt, impl, monkeypatch):
    """Q4_1 and Q5_1 on the int8 route: their quants as int8 blocks, each block's minimum m
    added apart (times the activation block's sum). Within the bound of int8 activations per
    32, and not trivially; a NaN scale or minimum in the file makes its row NaN, no other."""
    from mistol.model import backend

    monkeypatch.setattr(backend, "quantized_route", lambda rows, device, f: backend.INT8_PREFILL)
    n, k = 37, 768
    blocks = random_blocks(fmt, n, k, seed=13)
    w = reference_weight(fmt, blocks)
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(13))
    with kernels.use(impl):
        for m in (1, 40):
            y = BlockLinear(k, n, fmt, blocks)(x[:m])
            err = (y.double() - x[:m].double() @ w.T).abs()
            bound = activation_error_bound(w, x[:m].double(), 32)
            assert (err <= bound).all(), (m, (err / bound).max())
            assert (err / bound).max() > 0.01
        nan = torch.from_numpy(np.array([0x7E00], dtype=np.uint16).view(np.uint8))
        for row, field in ((5, 0), (9, 1)):  # d of row 5's first block, m (where the type has it) of row 9's
            offsets = SCALE_OFFSETS[fmt]
            if field < len(offsets):
                blocks[row, offsets[field] : offsets[field] + 2] = nan
        y = BlockLinear(k, n, fmt, blocks)(x)
    broken = [5, 9] if len(SCALE_OFFSETS[fmt]) > 1 else [5]
    assert y[:, broken].isnan().all() and not y[:, [c for c in range(n) if c not in broken]].isnan().any()


def test_long_prompts_take_the_int8_route_only_where_it_was_measured_to_pay(monkeypatch):
    """The repacked k-quants from their crossover on, on the AVX512-VNNI kernels only (AVX2's
    int8 kernels lose there), Q5_0 on AVX2 and AVX512-VNNI but never for a verify pass (its
    rows must keep a lone decode step's bits); beside AMX bf16 tiles up to where bf16 takes
    over, and where the route multiplies in AMX int8 tiles the k-quants at every length from
    theirs; shorter inputs and the other formats keep their routes."""
    from mistol.model import backend
    from mistol.speculative import MAX_DEPTH

    monkeypatch.setattr(kernels, "int8_tiles", lambda: False)
    monkeypatch.setattr(backend, "bf16_tiles", lambda: False)
    cpu = torch.device("cpu")
    for impl in kernel_impls():
        with kernels.use(impl):
            for fmt in ("Q4_Kx8", "Q5_Kx8", "Q6_Kx8", "Q4_1", "Q5_0", "Q5_1", "int8"):
                rows = backend.int8_prefill_rows(fmt)
                legacy = fmt in ("Q4_1", "Q5_0", "Q5_1")
                routed = impl == "avx512vnni" and fmt.endswith("x8") or impl in ("avx2", "avx512vnni") and legacy
                assert (rows is not None) == routed, (impl, fmt)
                if rows is not None:
                    assert rows > MAX_DEPTH + 1
                    assert backend.quantized_route(rows, cpu, fmt) == backend.INT8_PREFILL
                    assert backend.quantized_route(rows - 1, cpu, fmt) != backend.INT8_PREFILL
                    assert backend.quantized_route(rows, torch.device("meta"), fmt) == backend.DEQUANTIZED
    monkeypatch.setattr(backend, "bf16_tiles", lambda: True)  # AMX: int8 below where bf16 takes over
    monkeypatch.setattr(backend, "native_bf16", lambda: True)
    for impl in kernel_impls():
        with kernels.use(impl):
            for fmt in ("Q4_Kx8", "Q5_Kx8", "Q6_Kx8", "Q5_0"):
                int8_rows, bf16_rows = backend.int8_prefill_rows(fmt), backend.bf16_prefill_rows(fmt)
                assert bf16_rows == backend.AMX_BF16_MIN_ROWS[fmt]
                assert backend.quantized_route(bf16_rows, cpu, fmt) == backend.BF16_PREFILL
                if impl != "avx512vnni" or fmt == "Q4_Kx8":  # (Q4_Kx8: int8 no faster than its kernels there)
                    assert int8_rows is None
                    continue
                assert MAX_DEPTH + 1 < int8_rows < bf16_rows
                assert backend.quantized_route(int8_rows, cpu, fmt) == backend.INT8_PREFILL
                assert backend.quantized_route(bf16_rows - 1, cpu, fmt) == backend.INT8_PREFILL
                assert backend.quantized_route(int8_rows - 1, cpu, fmt) == backend.QUANTIZED_KERNELS
    monkeypatch.setattr(kernels, "int8_tiles", lambda: True)  # AMX int8 tiles: the k-quants on int8 for good
    for impl in kernel_impls():
        with kernels.use(impl):
            for fmt in ("Q4_Kx8", "Q5_Kx8", "Q6_Kx8"):
                int8_rows, bf16_rows = backend.int8_prefill_rows(fmt), backend.bf16_prefill_rows(fmt)
                if impl != "avx512vnni":
                    assert int8_rows is None and bf16_rows == backend.AMX_BF16_MIN_ROWS[fmt]
                    continue
                assert int8_rows == backend.TILES_INT8_MIN_ROWS[fmt] > MAX_DEPTH + 1 and bf16_rows is None
                assert backend.quantized_route(4096, cpu, fmt) == backend.INT8_PREFILL
                assert backend.quantized_route(int8_rows - 1, cpu, fmt) == backend.QUANTIZED_KERNELS
            if impl == "avx512vnni":  # (the legacy types' int8 route has no tiles)
                assert backend.int8_prefill_rows("Q5_0") == backend.AMX_INT8_MIN_ROWS["Q5_0"]
    monkeypatch.setenv("MISTOL_INT8_PREFILL", "0")  # (bf16 takes its place)
    with kernels.use("avx512vnni" if "avx512vnni" in kernel_impls() else kernel_impls()[0]):
        assert backend.bf16_prefill_rows("Q6_Kx8") == backend.AMX_BF16_MIN_ROWS["Q6_Kx8"]
    monkeypatch.setattr(backend, "bf16_tiles", lambda: False)
    with kernels.use(kernel_impls()[0]):
        assert backend.int8_prefill_rows("Q6_Kx8") is None


def test_bad_shapes_are_refused_in_one_line():
    from mistol.errors import MistolError

    with pytest.raises(MistolError, match="multiple of 256"):
        BlockLinear(320, 4, "Q4_K", torch.zeros(4, 180, dtype=torch.uint8))
    with pytest.raises(MistolError, match=r"expected uint8 \[4, 144\]"):
        BlockLinear(256, 4, "Q4_K", torch.zeros(4, 143, dtype=torch.uint8))


def test_compiled_decode_layer_takes_a_layer_of_mixed_formats(monkeypatch):
    """As a Q4_K_M / Q5_K_M file loads: q/k/o/gate/up Q4_K (Q5_K in the second layer), v and
    down Q6_K in every other layer (one of each repacked), one int8; the compiled decode layer
    against the PyTorch layers, 20 steps."""
    from test_cpu_decode import assert_agree, config, teacher_forced_logits

    from mistol.bench.models import mistol_model

    m = mistol_model(config(hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512), "int8", seed=0)
    seed = 10
    for i, block in enumerate(m.layers):
        for parent, name in (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                             ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")):
            old = getattr(getattr(block, parent), name)
            fmt = "Q6_K" if name in ("v_proj", "down_proj") and i % 2 == 0 else ("Q4_K", "Q5_K")[i % 2]
            if (i, name) == (1, "up_proj"):
                continue  # stays int8
            seed += 1
            blocks = random_blocks(fmt, old.out_features, old.in_features, seed, scale=2e-4)
            layout = fmt + "x8" if (i, name) in ((0, "q_proj"), (0, "down_proj"), (1, "gate_proj")) else fmt
            made = make_layer(layout, old.in_features, old.out_features, blocks)
            setattr(getattr(block, parent), name, made)
    from mistol.model import cpu_decode

    assert cpu_decode.CpuDecoder.of(m) is not None
    tokens = torch.randint(3, 512, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = teacher_forced_logits(m, tokens, 32, True, monkeypatch)
    ref = teacher_forced_logits(m, tokens, 32, False, monkeypatch)
    assert_agree(ours, ref)
