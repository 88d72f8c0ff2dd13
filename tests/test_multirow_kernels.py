"""Several activation rows at once (a speculative verify pass, a prefill chunk): the int8/int4
kernels read each weight block once for all the rows, and every row must come out bit for bit
as the one-row (decode) kernel computes it alone, so that speculative greedy decoding stays
identical to plain decoding. Checked for every implementation this CPU runs, at awkward
shapes, against the one-row kernel and against a float64 reference made with PyTorch ops.
"""

from __future__ import annotations

import pytest
import torch

from helpers import kernel_impls
from mistol import kernels
from mistol.model import backend
from mistol.quant import QuantizedLinear, dequantize_ggml, quantize_ggml, quantize_linear

FMTS = ["int8", "int4"]
IMPLS = kernel_impls()
ROWS = [1, 2, 3, 5, 8, 9, 12, 13, 16, 17, 33]  # every count of row pairs to 8; past 16: 16 at a time
# (N, K): a padded last group of 8 rows; 3 blocks; K past 4096 in 3 tiles of 86 blocks
# (mistol.quant.tile_blocks), N not a multiple of 8; one block, one row.
SHAPES = [(37, 96), (203, 8256), (64, 4128), (1, 32)]

pytestmark = pytest.mark.skipif(not kernels.available(), reason="mistol's C kernels are not built")


@pytest.fixture(autouse=True)
def quantized_kernels_for_every_row_count(monkeypatch):
    """Keep 17+ rows on our kernels (a CPU with bf16 instructions hands prefill-sized inputs
    to bf16 matmuls; that path has its own tests)."""
    monkeypatch.setattr(backend, "native_bf16", lambda: False)


def one_row_at_a_time(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([layer(x[i : i + 1].contiguous()) for i in range(x.shape[0])])


def reference(x: torch.Tensor, layer: QuantizedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 x_q @ W^T with x quantized per block of 32 as the kernels do (scale max|x|/127
    in float32, round half to even) and W dequantized by PyTorch ops from llama.cpp's blocks;
    and the bound on the kernels' fp32 rounding: each block's integer sum is exact, and
    turning it into a float term (scale product, multiply-add) and adding the K/32 terms up
    round at most (K/32 + 3) times by 2^-24 of the sum of the terms' magnitudes."""
    m, k = x.shape
    xb = x.view(m, k // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.round(xb * torch.where(d != 0, 1 / d, torch.zeros_like(d)))
    xq = (q.double() * d.double()).view(m, k)
    w = dequantize_ggml(layer.to_ggml(), layer.fmt).double()
    bound = (k // 32 + 3) * 2.0**-24 * (xq.abs() @ w.abs().T) + 1e-30
    return xq @ w.T, bound


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
def test_each_row_gets_the_one_row_kernels_bits(impl, fmt):
    torch.manual_seed(5)
    for n, k in SHAPES:
        layer = quantize_linear(torch.randn(n, k) * 0.05, fmt)
        x = torch.randn(max(ROWS), k) * torch.rand(max(ROWS), 1) * 4
        x[1, :32] = 0  # an all-zero activation block
        x[2, -32:] = torch.linspace(-1, 1, 32)  # activations reaching +-127
        with kernels.use(impl):
            alone = one_row_at_a_time(layer, x)
            for m in ROWS:
                together = layer(x[:m])
                assert torch.equal(together, alone[:m]), (impl, fmt, n, k, m)
                want, bound = reference(x[:m], layer)
                assert ((together.double() - want).abs() <= bound).all(), (impl, fmt, n, k, m)


@pytest.mark.parametrize("impl", IMPLS)
def test_q8_0_weights_of_minus_128_in_several_rows(impl):
    """llama.cpp never writes -128 but a GGUF file may hold it; the multi-row int8 kernels
    shift weights by 128 (VNNI) or take |w| (AVX2), both exact for it."""
    torch.manual_seed(7)
    blocks = quantize_ggml(torch.randn(11, 64), "int8")
    blocks[:, :, 2::3] = 0x80
    layer = QuantizedLinear.from_ggml(blocks, "int8", 11, 64)
    x = torch.randn(6, 64) * 10
    with kernels.use(impl):
        together = layer(x)
        assert torch.equal(together, one_row_at_a_time(layer, x))
    want, bound = reference(x, layer)
    assert ((together.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("fmt", FMTS)
def test_implementations_and_threads_agree_on_several_rows(fmt):
    """With any number of threads (each output column is summed by one thread) the bits stay
    the same; the AVX2 and VNNI kernels (both fusing the multiply-add) give the same bits,
    the portable one (which does not fuse it) the same values up to fp32 rounding."""
    torch.manual_seed(9)
    layer = quantize_linear(torch.randn(203, 4128), fmt)
    x = torch.randn(8, 4128) * 3
    threads = torch.get_num_threads()
    outs = {}
    try:
        for impl in IMPLS:
            with kernels.use(impl):
                for t in (1, 2, 3):
                    torch.set_num_threads(t)
                    outs[impl, t] = layer(x)
    finally:
        torch.set_num_threads(threads)
    for impl in IMPLS:
        assert torch.equal(outs[impl, 1], outs[impl, 2]) and torch.equal(outs[impl, 1], outs[impl, 3]), impl
    if "avx512vnni" in IMPLS:
        assert torch.equal(outs["avx512vnni", 1], outs["avx2", 1])
    _, bound = reference(x, layer)  # both within it of the exact sums
    assert ((outs[IMPLS[0], 1].double() - outs["scalar", 1].double()).abs() <= 2 * bound).all()


def test_matrices_of_both_formats_in_one_call():
    """A layer's q/k/v or gate/up share one call (and one activation quantization) whatever
    their formats; each matrix's columns match its own one-row products."""
    torch.manual_seed(13)
    layers = [quantize_linear(torch.randn(n, 256), fmt) for n, fmt in ((72, "int8"), (13, "int4"), (40, "int8"))]
    x = torch.randn(7, 256)
    mats = [kernels.matrix(layer.fmt, layer.packed, layer.out_features) for layer in layers]
    for impl in IMPLS:
        with kernels.use(impl):
            y = kernels.gemm_matrices(x, mats)
            alone = torch.cat([one_row_at_a_time(layer, x) for layer in layers], dim=1)
        assert torch.equal(y, alone), impl
