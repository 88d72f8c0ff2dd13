"""The scripts in scripts/ (benchmarks, the demo's evaluation) meet bad input as the command
line does: one line that names the problem, a non-zero status, no traceback, and before any
minutes of measuring start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.parametrize("script, args, rc, says", [
    ("bench_speculative", ["--skip-replies", "--formats", "int3"], 2, "--formats: int8, int4 or .gguf files"),
    ("bench_speculative", ["--skip-replies", "--formats", "int8,missing.gguf"], 2, "no such file: missing.gguf"),
    ("bench_speculative", ["--skip-replies", "--formats", "junk.gguf"], 1, "not a GGUF file"),
    ("bench_speculative", ["--skip-replies", "--layers", "fused"], 2, "--layers: compiled, pytorch"),
    ("bench_kv_cache", ["--format", "q3"], 2, "invalid choice: 'q3'"),
    ("bench_kv_cache", ["--threads", "0"], 2, "must be at least 1"),
    ("bench_threads", ["--shapes", "1b,9b"], 2, "not 9b"),
    ("bench_server", ["--streams", "0"], 2, "at least 1"),
    ("bench_constraints", ["--libraries", "nope"], 2, "not nope"),
    ("eval_demo", ["--sets", "nothing"], 2, "--sets"),
    ("eval_demo", ["--model", "junk.gguf", "--sets", "code", "--edits", "1"], 1, "not a GGUF file"),
    ("profile_decode", ["--model", "junk.gguf"], 1, "not a GGUF file"),
    ("bench_prefill_route", ["junk.gguf"], 1, "not a GGUF file"),
    ("ab_kernels", ["junk.gguf", "--lib", "missing.so"], 2, "no such kernels build: missing.so"),
])
def test_bad_input_gets_one_line(tmp_path, script, args, rc, says):
    (tmp_path / "junk.gguf").write_bytes(b"not a model" * 100)
    done = subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == rc, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()[-1]) < 300
    assert "verify cost" not in done.stdout and "tok/s" not in done.stdout


def test_verify_cost_over_a_long_context_on_both_layers(tmp_path):
    """The tiny shape's verify cost over 300 tokens of random keys and values, each pass on the
    compiled layers and on the PyTorch layers in turns: a column for each."""
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_speculative.py"), "--skip-replies", "--shape", "tiny",
                           "--formats", "int8", "--max-rows", "3", "--repeats", "1", "--context", "300",
                           "--layers", "compiled,pytorch"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "300 tokens of context" in done.stdout
    header, *rows = done.stdout.split("rows (k+1)")[1].splitlines()[1:5]
    assert header.split() == ["compiled", "pytorch"]
    assert [row.split()[0] for row in rows] == ["1", "2", "3"] and all(len(row.split()) == 3 for row in rows)
