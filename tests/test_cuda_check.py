"""scripts/cuda_check.py on the CPU (`--device cpu --shape tiny`): every part of the GPU check
runs and reports what it should, so that a run on a lent GPU measures everything at once.
The parity and sampling parts compare against transformers and seeded draws here too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cuda_check.py"
PARTS = ("bandwidth", "parity_f32_and_bf16", "quantized_layers", "sampling", "mistol_single", "mistol_batched",
         "transformers_eager", "transformers_static_compiled", "summary")
SETUP_KEYS = {"engine", "dtype", "cache", "compile", "cuda_graphs"}


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--shape", "tiny", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=900)
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_dry_run_on_the_cpu_goes_through_every_part(tmp_path):
    proc, results = run_check(tmp_path)
    failed = {name: results.get(name, {}).get("error") for name in PARTS if not results.get(name, {}).get("ok")}
    assert not failed, failed
    assert proc.returncode == 0, proc.stderr[-2000:]

    assert results["bandwidth"]["read_GB_s"] > 0 and results["bandwidth"]["copy_GB_s"] > 0
    parity = results["parity_f32_and_bf16"]
    assert parity["pass"] and parity["greedy_40_identical"] and parity["f32_max_abs_err"] < 1e-3

    quantized = results["quantized_layers"]
    assert quantized["pass"]
    assert quantized["int8_route"] == quantized["int4_route"] == "kernels"  # the CPU's own kernels
    for name in ("bf16", "int8", "int4"):
        assert quantized["speed_1_row"][name]["us"] > 0 and quantized["speed_1_row"][name]["path"]

    sampling = results["sampling"]
    assert sampling["pass"]
    for name in ("generate_filters_default", "generate_filters_off", "sample_next_device_generator"):
        assert sampling[name]["in_range"] and sampling[name]["same_seed_same_ids"]
    assert len(set(sampling["generate_filters_off"]["ids"])) > 1  # draws, not a greedy argmax repeated

    single = results["mistol_single"]
    for mode in ("eager", "graphs"):
        assert single[mode]["decode_tok_s"] > 0 and single[mode]["ttft_s"] > 0
        assert single[mode]["share_of_ceiling"] > 0
        assert SETUP_KEYS <= set(single[mode]["setup"])
        assert single[mode]["setup"]["cuda_graphs"] is False  # no graphs on a CPU
    assert isinstance(single["meets_target"], bool)

    batched = results["mistol_batched"]
    for batch in (1, 4, 16):
        row = batched[f"batch{batch}"]
        assert row["tok_s_total"] > 0 and row["share_of_ceiling"] > 0
        assert row["cuda_graphs"] is False and row["path"] == "eager PyTorch layers"
    assert batched["graphs_per_batch_bucket"] is False and "eagerly" in batched["note"]

    for name in ("transformers_eager", "transformers_static_compiled"):
        assert results[name]["decode_tok_s"] > 0 and results[name]["ttft_s"] > 0
        assert SETUP_KEYS <= set(results[name]["setup"])
    assert results["transformers_eager"]["setup"]["cache"] == "DynamicCache"
    static = results["transformers_static_compiled"]
    assert static["setup"]["cache"].startswith("StaticCache") and static["setup"]["compile"] is False
    assert "torch.compile off" in static["note"]

    summary = results["summary"]
    assert set(summary["single_stream"]) == set(summary["setups"]) == {
        "mistol_graphs", "mistol_eager", "transformers_eager", "transformers_static_compiled"}
    assert "compile off" in summary["setups"]["transformers_static_compiled"]
    assert summary["mistol_over_transformers_static_compiled"] > 0


@pytest.mark.slow
def test_max_minutes_skips_the_parts_left(tmp_path):
    proc, results = run_check(tmp_path, "--max-minutes", "0")
    assert proc.returncode == 1  # skipped parts are not passed parts
    for name in PARTS[:-1]:
        assert results[name]["ok"] is False and "--max-minutes" in results[name]["skipped"]
    assert results["summary"]["ok"] and results["summary"]["single_stream"] == {}  # instant: always there


def test_no_gpu_says_so_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "no CUDA device (use --device cpu --shape tiny for a dry run)"
