"""What loading chooses for the machine: `--quant auto` quantizes only where mistol's kernels
have SIMD int8 code for the CPU, and `--device mps` is accepted where PyTorch's Metal
backend is, with a one-line error elsewhere."""

from __future__ import annotations

import pytest
import torch

import mistol.engine
from mistol import kernels
from mistol.engine import Engine
from mistol.errors import MistolError
from mistol.quant import QuantizedLinear


def quantized_formats(engine: Engine) -> set[str]:
    return {m.fmt for m in engine.model.modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("impl", ["scalar", "torch"])
def test_auto_keeps_floats_where_int8_would_run_without_simd_kernels(mistral_dir, monkeypatch, impl):
    monkeypatch.setattr(mistol.engine, "AUTO_INT8_BYTES", 1)  # as if it were a 7B checkpoint
    with kernels.use(impl):
        engine = Engine.load(mistral_dir)
        assert not quantized_formats(engine)
        assert engine.model.dtype in (torch.float32, torch.bfloat16)
        assert quantized_formats(Engine.load(mistral_dir, dtype="f32", quant="int8")) == {"int8"}  # asked: kept


def test_auto_quantizes_where_the_kernels_have_simd_code(mistral_dir, monkeypatch):
    best = kernels.best_impl()
    if best in ("scalar", "torch"):
        pytest.skip(f"this CPU's kernels have no SIMD code ({best})")
    monkeypatch.setattr(mistol.engine, "AUTO_INT8_BYTES", 1)
    with kernels.use(best):
        assert quantized_formats(Engine.load(mistral_dir)) == {"int8"}


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has PyTorch's Metal backend")
def test_mps_without_metal_is_a_one_line_error(mistral_dir):
    with pytest.raises(MistolError, match=r"^--device mps: this (torch build has no MPS|machine has no Metal GPU)"):
        Engine.load(mistral_dir, device="mps")


def test_the_cli_names_mps_and_refuses_it_here_in_one_line(mistral_dir, capsys):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has PyTorch's Metal backend")
    from mistol.cli import main

    code = main(["generate", "--model", str(mistral_dir), "--device", "mps", "-p", "Hi", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert code != 0 and "--device mps" in err and "Traceback" not in err
