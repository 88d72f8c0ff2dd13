"""Linear layers: float weights on the compiled kernels for decode steps, and several
layers that share an input (q/k/v, gate/up) as one kernel call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import kernel_impls
from mistol import kernels
from mistol.model.backend import DENSE_MAX_ROWS
from mistol.model.linear import Linear, TiledLinear, linear_each, linear_many, tile_values, tiles_pay_off
from mistol.quant import quantize_linear

FMTS = ["int8", "int4"]
IMPLS = kernel_impls()
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="mistol's C kernels are not built")


def linear_layer(n: int, k: int, dtype: torch.dtype) -> Linear:
    layer = Linear(k, n).requires_grad_(False)
    layer.weight.data = layer.weight.data.to(dtype)
    return layer


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float_weights_on_the_kernel_match_float64(dtype):
    """Decode-sized inputs: float32 products and sums of the exact weight values, rounded once."""
    torch.manual_seed(1)
    for rows, n, k in [(1, 7, 40), (1, 64, 4096 + 24), (3, 33, 100), (DENSE_MAX_ROWS, 130, 512), (2, 5, 16)]:
        layer = linear_layer(n, k, dtype)
        x = torch.randn(rows, k).to(dtype)
        with torch.inference_mode():
            y = layer(x)
        exact = x.double() @ layer.weight.double().T
        assert y.dtype == dtype and y.shape == (rows, n)
        rounding = 2**-8 if dtype != torch.float32 else 0  # of y to its 16-bit dtype
        bound = (x.double().abs() @ layer.weight.double().abs().T) * 1e-5 + exact.abs() * rounding
        assert ((y.double() - exact).abs() <= bound + 1e-6).all()


@needs_kernels
def test_bf16_weights_both_ways():
    """bf16 inputs may take the CPU's bf16 dot products (where it has them); float32 inputs
    take the float32 loop. On bf16-valued inputs both agree with float64 to float32 sums."""
    torch.manual_seed(5)
    for n, k in [(37, 14336 + 40), (9, 48), (130, 4096)]:
        w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
        x = torch.randn(2, k).to(torch.bfloat16).float()
        exact = x.double() @ w.double().T
        bound = (x.double().abs() @ w.double().abs().T) * 1e-5 + 1e-7
        for x_is_bf16 in (True, False):
            y = kernels.dense_many(x, [w], x_is_bf16)
            assert ((y.double() - exact).abs() <= bound).all(), (n, k, x_is_bf16)


@needs_kernels
def test_bf16_kernel_rounds_like_pytorch():
    torch.manual_seed(2)
    layer = linear_layer(301, 4096, torch.bfloat16)
    x = torch.randn(1, 1, 4096).to(torch.bfloat16)
    with torch.inference_mode():
        ours, theirs = layer(x).float(), F.linear(x, layer.weight).float()
    assert ((ours - theirs).abs() <= theirs.abs() * 2**-7 + 1e-6).all()  # at most one bf16 step apart


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_long_rows_in_tiles_match_float64_and_pytorch(dtype):
    """A down projection's rows (8256 inputs: 3 tiles of 2752) held in tiles: decode-sized
    inputs on the kernel as exact as from plain rows; longer inputs (a matmul per tile, the
    tiles' products added in float32) within one more rounding per tile."""
    torch.manual_seed(6)
    w = (torch.randn(45, 8256) * 0.02).to(dtype)
    layer = TiledLinear.from_rows(lambda r0, r1: w[r0:r1].float(), 45, 8256, dtype)  # (converted as it loads)
    assert layer.tiles.shape == (3, 45, 2752) and torch.equal(layer.weight, w)
    with torch.inference_mode():
        for rows in (1, DENSE_MAX_ROWS, DENSE_MAX_ROWS + 3):
            x = torch.randn(rows, 1, 8256).to(dtype)
            exact = x.double() @ w.double().T
            rounding = (2**-8 if rows <= DENSE_MAX_ROWS else 3 * 2**-8) if dtype != torch.float32 else 0
            products = (x.double().abs() @ w.double().abs().T)
            bound = products * (1e-5 + rounding) if rows > DENSE_MAX_ROWS else products * 1e-5 + exact.abs() * rounding
            y = layer(x)
            assert y.shape == (rows, 1, 45) and y.dtype == dtype
            assert ((y.double() - exact).abs() <= bound + 1e-6).all(), rows
            assert torch.equal(linear_many(x, [layer, linear_layer(3, 8256, dtype)])[..., :45], y)


def test_only_long_rows_on_a_cpu_with_the_kernels_load_in_tiles():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert tile_values(14336) == 3584 and tile_values(4096) == 4096 and tile_values(14336 + 16) == 14336 + 16
    assert tiles_pay_off((4096, 14336), cpu) == kernels.available()
    assert not tiles_pay_off((14336, 4096), cpu) and not tiles_pay_off((4096, 14336), meta)


def test_longer_inputs_and_training_use_pytorch():
    torch.manual_seed(3)
    layer = Linear(64, 32)
    x = torch.randn(DENSE_MAX_ROWS + 1, 64)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight))  # prefill-sized
    x = torch.randn(1, 64, requires_grad=True)
    layer(x).sum().backward()  # autograd goes through F.linear
    assert layer.weight.grad is not None and x.grad is not None


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_layers_together_equal_one_by_one(dtype):
    torch.manual_seed(4)
    layers = [linear_layer(n, 256, dtype) for n in (64, 13, 40)]
    x = torch.randn(2, 1, 256).to(dtype)
    with torch.inference_mode():
        together = linear_many(x, layers)
        apart = torch.cat([layer(x) for layer in layers], dim=-1)
    assert together.shape == (2, 1, 117) and torch.equal(together, apart)


@pytest.mark.parametrize("rows", [1, DENSE_MAX_ROWS + 5])
def test_each_layers_output_apart_equals_the_outputs_side_by_side(rows):
    """`linear_each`: views of the one fused call where the kernels take the layers together
    (a decode step), each layer's own output where they run apart (a prompt): no copy."""
    torch.manual_seed(5)
    layers = [linear_layer(n, 256, torch.bfloat16) for n in (64, 13)]
    x = torch.randn(1, rows, 256).bfloat16()
    with torch.inference_mode():
        each, together = linear_each(x, layers), linear_many(x, layers)
    assert [tuple(y.shape) for y in each] == [(1, rows, 64), (1, rows, 13)]
    assert torch.equal(torch.cat(each, dim=-1), together)
    one_output = each[0].untyped_storage().data_ptr() == each[1].untyped_storage().data_ptr()
    assert one_output == (kernels.available() and rows == 1)


@needs_kernels
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
def test_several_matrices_in_one_call_equal_separate_calls(impl, fmt):
    """A layer's q/k/v (gate/up) run as one kernel call: the same bits as one call each,
    whatever the row counts (odd ones split a thread's share across matrices)."""
    torch.manual_seed(8)
    layers = [quantize_linear(torch.randn(n, 256) * 0.05, fmt) for n in (64, 13, 40, 8, 129)]
    for rows in (1, 3):
        x = torch.randn(2, rows, 256)
        with kernels.use(impl):
            together = linear_many(x, layers)
            apart = torch.cat([layer(x) for layer in layers], dim=-1)
        assert together.shape == (2, rows, 64 + 13 + 40 + 8 + 129)
        assert torch.equal(together, apart)


def test_linear_many_falls_back_to_one_call_per_layer():
    torch.manual_seed(9)
    linears = [torch.nn.Linear(64, n, bias=False) for n in (32, 16)]
    x = torch.randn(3, 64)
    torch.testing.assert_close(linear_many(x, linears), torch.cat([x @ l.weight.T for l in linears], dim=-1))
    mixed = [quantize_linear(linears[0], "int8"), quantize_linear(linears[1], "int4")]  # formats differ
    torch.testing.assert_close(linear_many(x, mixed), torch.cat([layer(x) for layer in mixed], dim=-1))

