"""`mistol bench` at the tiny shape: the real command in a subprocess, its JSON checked for
sense (speeds are printed figures, never asserted: these machines are noisy)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoints import tensors_in_mapped_file
from mistol.bench.models import gguf_tensors, mistol_model, write_bench_checkpoint
from mistol.bench.shapes import all_weights, bytes_per_token, linear_weights, model_config
from mistol.model.backend import bf16_prefill_rows
from mistol.quant import QuantizedLinear
from mistol.weights.checkpoint import load_model


def bench(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mistol", "bench", "--shape", "tiny", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_json_report_for_mistol_formats(tmp_path):
    r = bench("--engines", "mistol", "--quant", "int8,int4,f32", "--prompts", "16,40", "--steps", "4", "--json",
              "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["shape"] == "tiny" and len(report["bandwidth_gb_s"]) == 2
    assert all(b > 0 for b in report["bandwidth_gb_s"])
    rows = {row["fmt"]: row for row in report["rows"]}
    assert set(rows) == {"int8", "int4", "f32"}
    config = model_config("tiny")
    for fmt, row in rows.items():
        assert row["engine"] == "mistol" and row["decode_steps"] == 4
        assert set(row["prefill_tok_s"]) == {"16", "40"} and all(v > 0 for v in row["prefill_tok_s"].values())
        assert row["decode_tok_s"] > 0 and row["ttft_s"] > 0 and 0 < row["roofline_share"]
        # the ceiling's bandwidth was read in turns with the decoding
        assert row["ceiling_bandwidth_gb_s"] == row["decode_bandwidth_gb_s"] > 0
        assert row["peak_rss"] >= row["base_rss"] > 0
        # (the cache in f16 for the quantized formats, as mistol keeps it on a CPU)
        assert row["kv_element_bytes"] == (2 if fmt in ("int8", "int4") else 4)
        assert row["bytes_per_token"] == pytest.approx(bytes_per_token(config, fmt, 16 + 2, row["kv_element_bytes"]),
                                                       rel=1e-9)
    assert rows["int4"]["bytes_per_token"] < rows["int8"]["bytes_per_token"] < rows["f32"]["bytes_per_token"]
    assert report["ratios"] == []  # nothing to compare with
    assert all(row["decoded_with"] == [] for row in rows.values())
    # where prefill switches to bf16 matmuls: on a CPU with bf16 instructions, per quantized format
    from_rows = bf16_prefill_rows("int4")
    assert rows["int4"]["bf16_prefill_rows"] == ({} if from_rows is None else {"int4": from_rows})
    assert rows["f32"]["bf16_prefill_rows"] == {}


@pytest.mark.slow
def test_no_bf16_measures_the_int8_kernels_at_every_length(tmp_path):
    r = bench("--engines", "mistol", "--quant", "int4", "--prompts", "16", "--steps", "2", "--no-bf16",
              "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "mistol prefill: its int8-activation kernels at every prompt length" in r.stdout


@pytest.mark.slow
def test_busy_core_decodes_each_mistol_model_at_default_1_and_2_threads(tmp_path):
    """--busy-core: with a `yes` running, each mistol model decodes at the default threads
    (which see the busy core, as a command starting then would), 1 and 2, in turns; the
    report gives each speed and the default's share of the best; no `yes` outlives it."""
    r = bench("--engines", "mistol", "--quant", "int8,int4", "--prompts", "16", "--steps", "4", "--busy-core",
              "--json", "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    busy = {b["model"]: b for b in json.loads(r.stdout)["busy_core"]}
    assert set(busy) == {"mistol int8", "mistol int4"}
    for b in busy.values():
        assert set(b["tok_s"]) == {"default", "1 thread", "2 threads"} and all(v > 0 for v in b["tok_s"].values())
        best = max(b["tok_s"]["1 thread"], b["tok_s"]["2 threads"])
        assert b["of_best"] == pytest.approx(b["tok_s"]["default"] / best)
        assert 1 <= b["default_threads"] <= os.cpu_count()
    assert subprocess.run(["pgrep", "-x", "yes"], capture_output=True).returncode == 1
    table = bench("--engines", "mistol", "--quant", "int4", "--prompts", "16", "--steps", "4", "--busy-core",
                  "--cache-dir", str(tmp_path))
    assert table.returncode == 0, table.stderr
    assert "decode with one core busy" in table.stdout and "of the best of 1 and 2 threads" in table.stdout


@pytest.mark.slow
def test_a_killed_bench_leaves_no_busy_core_hog(tmp_path):
    """SIGKILL in the middle of --busy-core (no `finally` runs): the `yes` it started ends too."""
    bench_process = subprocess.Popen([sys.executable, "-m", "mistol", "bench", "--shape", "tiny", "--engines", "mistol",
                                      "--quant", "int4", "--prompts", "16", "--steps", "64", "--busy-core",
                                      "--cache-dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hog = None
    try:
        deadline = time.monotonic() + 120
        while hog is None and time.monotonic() < deadline and bench_process.poll() is None:
            found = subprocess.run(["pgrep", "-P", str(bench_process.pid), "-x", "yes"], capture_output=True, text=True)
            hog = int(found.stdout.split()[0]) if found.stdout.strip() else None
            time.sleep(0.05)
        assert hog is not None, "the bench never started its busy-core hog"
    finally:
        bench_process.kill()
        bench_process.wait()
    for _ in range(50):
        if not os.path.exists(f"/proc/{hog}") or open(f"/proc/{hog}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(hog, signal.SIGKILL)
        pytest.fail("the hog outlived the bench")


@pytest.mark.slow
def test_table_and_skips(tmp_path):
    r = bench("--engines", "mistol,transformers", "--quant", "int8,bf16", "--prompts", "16", "--steps", "2",
              "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "mistol        int8" in out and "mistol        bf16" in out
    assert "transformers  bf16" in out
    assert "transformers  int8" not in out  # transformers runs float formats only
    assert "mistol bf16 / transformers bf16" in out
    assert "decoding in turns of 4 steps, under the same load: mistol bf16 with transformers bf16" in out
    assert (tmp_path / "random-tiny-bf16" / "model.safetensors").is_file()  # the two engines' shared weights


@pytest.mark.slow
def test_float_checkpoint_is_computed_on_in_place_by_both_engines(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = write_bench_checkpoint(tmp_path / "random-tiny-f32", "tiny", "f32", progress=False)
    ours = load_model(path, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 300, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(ours.head(ours.hidden_states(ids)), theirs(ids).logits, rtol=1e-4, atol=1e-4)
    # the values of the GGUF files' draws, and both models' weights are the mapped file's pages
    drawn = dict(gguf_tensors(model_config("tiny")))["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(ours.layers[1].mlp.down_proj.weight, drawn.float())
    assert "layers.1.mlp.down_proj.weight" in tensors_in_mapped_file(ours, path / "model.safetensors")
    assert "model.layers.1.mlp.down_proj.weight" in tensors_in_mapped_file(theirs, path / "model.safetensors")


@pytest.mark.slow
def test_bad_arguments_are_one_line_errors():
    for args in (["--quant", "int3"], ["--engines", "vllm"], ["--prompts", "4"], ["--prompts", "x"]):
        r = bench(*args, timeout=60)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_random_models_are_built_in_their_format():
    config = model_config("tiny")
    model = mistol_model(config, "int4")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 7 * config.num_layers + 1  # every linear, the head included
    assert sum(m.in_features * m.out_features for m in layers) == linear_weights(config)
    assert not any(p.is_meta for p in model.parameters())
    assert model.embed_tokens.weight.dtype == torch.float32
    logits = model.head(model.hidden_states(torch.tensor([[1, 2, 3]])))
    assert torch.isfinite(logits).all()
    # Layers have memory of their own (decoding must read each), even where values repeat.
    assert layers[0].packed.data_ptr() != model.layers[1].self_attn.q_proj.packed.data_ptr()

    tensors = dict(gguf_tensors(config))
    assert sum(t.numel() for t in tensors.values()) == all_weights(config)
    assert "lm_head.weight" in tensors and "model.embed_tokens.weight" in tensors


@pytest.mark.slow
def test_llama_cpp_row(tmp_path):
    pytest.importorskip("llama_cpp")
    r = bench("--engines", "llama.cpp,mistol", "--quant", "int8", "--prompts", "16", "--steps", "2", "--json",
              "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert sorted(row["format"] for row in report["rows"]) == ["Q8_0", "int8"]
    assert (tmp_path / "random-tiny-Q8_0.gguf").is_file()
    assert report["ratios"][0]["versus"] == "llama.cpp Q8_0"
    rows = {row["engine"]: row for row in report["rows"]}
    assert report["ratios"][0]["decode_same_bandwidth"] == pytest.approx(
        rows["mistol"]["roofline_share"] / rows["llama.cpp"]["roofline_share"])
    # loaded together, they took turns decoding (under the same load from the rest of the machine)
    assert {row["format"]: row["decoded_with"] for row in report["rows"]} == {"Q8_0": ["mistol int8"],
                                                                              "int8": ["llama.cpp Q8_0"]}
    # one thread count, resolved once, used by both; llama.cpp's build line; the pages each got
    assert rows["mistol"]["threads_used"] == rows["llama.cpp"]["threads_used"] == report["threads"] >= 1
    assert "AVX" in report["llama_cpp_system_info"] or "NEON" in report["llama_cpp_system_info"]
    assert all(row["pages"] == "huge" and row["huge_page_bytes"] >= 0 for row in report["rows"])


@pytest.mark.parametrize("build_has_amx", [True, False])
def test_llama_cpps_extra_buffers_are_off_only_where_its_build_has_amx(build_has_amx, monkeypatch):
    """On an AMX CPU the bench keeps llama.cpp's AMX kernels (they crash in VMs) from running by
    turning its extra buffer types off; a llama.cpp built without them keeps its repacked layouts."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from mistol.bench import engines

    info = b"CPU : AVX2 = 1 | AVX512 = 1 | " + (b"AMX_INT8 = 1 | " if build_has_amx else b"") + b"REPACK = 1 | "
    monkeypatch.setattr(engines, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: info)
    with engines.llama_cpp_models_without_amx():
        inside = llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts
    assert inside is not build_has_amx
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts  # the defaults again after the block
    assert engines.llama_cpp_build_has_amx(info.decode()) is build_has_amx


@pytest.mark.slow
def test_a_users_gguf_and_llama_cpp_made_kquants(tmp_path):
    """--kquants: llama.cpp's own quantizer makes the files; --gguf: both engines run a given file."""
    pytest.importorskip("llama_cpp")
    r = bench("--kquants", "Q4_K_M", "--prompts", "16", "--steps", "2", "--json", "--threads", "1",
              "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    made = tmp_path / "random-tiny-Q4_K_M.gguf"
    assert made.is_file() and (tmp_path / "random-tiny-F16.gguf").is_file()
    rows = {row["engine"]: row for row in report["rows"]}
    assert set(rows) == {"mistol", "llama.cpp"} and {row["format"] for row in rows.values()} == {"Q4_K_M"}
    assert rows["mistol"]["threads_used"] == rows["llama.cpp"]["threads_used"] == 1
    # both against the same ceiling: what a step reads of the file (every tensor but the embedding)
    assert rows["mistol"]["weight_bytes"] == rows["llama.cpp"]["weight_bytes"] < made.stat().st_size
    # and their memory against the same size: the file's
    assert rows["mistol"]["model_bytes"] == rows["llama.cpp"]["model_bytes"] == made.stat().st_size
    assert report["ratios"][0]["versus"] == "llama.cpp Q4_K_M"

    r = bench("--gguf", str(made), "--engines", "mistol", "--prompts", "16", "--steps", "2", "--json",
              "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert [row["format"] for row in json.loads(r.stdout)["rows"]] == ["Q4_K_M"]
    # two files of one type in one run: each row names its file, each ratio compares a file's own rows
    twin = tmp_path / "twin-Q4_K_M.gguf"
    twin.write_bytes(made.read_bytes())
    r = bench("--gguf", str(made), "--gguf", str(twin), "--prompts", "16", "--steps", "2", "--json", "--threads", "1",
              "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert sorted(row["format"] for row in report["rows"]) == sorted(
        [f"Q4_K_M ({made.name})", f"Q4_K_M ({twin.name})"] * 2)
    assert sorted((ratio["mistol"], ratio["versus"]) for ratio in report["ratios"]) == sorted(
        (f"Q4_K_M ({name})", f"llama.cpp Q4_K_M ({name})") for name in (made.name, twin.name))
    r = bench("--gguf", str(tmp_path / "missing.gguf"), timeout=60)
    assert r.returncode != 0 and "no such file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_every_file_type_kquants_accepts_is_one_llama_cpp_makes():
    """--kquants TYPES: each type it accepts has llama.cpp's quantizer type and a size for the
    room check (a type without one once ended in a KeyError traceback)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from mistol.bench.shapes import LLAMA_CPP_BYTES_PER_WEIGHT

    for ftype, per_weight in LLAMA_CPP_BYTES_PER_WEIGHT.items():
        assert isinstance(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"), int), ftype
        assert 0.5 < per_weight < 1.2
    r = bench("--kquants", "Q5_0,Q7_X", timeout=60)
    assert r.returncode != 0 and "--kquants: Q7_X" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # an empty list is an error, not a run of the shape's own models (it once wrote a 7.7 GB file)
    r = bench("--kquants=", timeout=60)
    assert r.returncode != 0 and "nothing given" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_kquants_makes_a_legacy_type_file_and_measures_it(tmp_path):
    """A type beyond the default k-quants, end to end: llama.cpp quantizes, mistol runs the file."""
    pytest.importorskip("llama_cpp")
    r = bench("--kquants", "Q5_0", "--engines", "mistol", "--prompts", "16", "--steps", "2", "--json",
              "--threads", "1", "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    made = tmp_path / "random-tiny-Q5_0.gguf"
    assert made.is_file()
    assert [row["format"] for row in json.loads(r.stdout)["rows"]] == ["Q5_0"]


@pytest.mark.parametrize("shape", ["0.5b", "135m"])
def test_small_shapes_match_the_models_they_name(shape):
    """The small shapes are transformers' own classes at the published sizes, tied heads."""
    transformers = pytest.importorskip("transformers")
    from mistol.bench.shapes import hf_config

    config, hf = model_config(shape), hf_config(shape)
    arch = hf["architectures"][0]
    theirs_config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(
        **{k: v for k, v in hf.items() if k != "architectures"})
    with torch.device("meta"):
        theirs = getattr(transformers, arch)(theirs_config)
    weights = sum(p.numel() for name, p in theirs.named_parameters() if not name.endswith(".bias"))
    assert config.tie_word_embeddings and weights == all_weights(config)
    expected = {"0.5b": 494_032_768, "135m": 134_515_008}[shape]  # the models' published parameter counts
    assert sum(p.numel() for p in theirs.parameters()) == expected


def test_a_tied_head_is_read_quantized():
    """A quantized model with tied embeddings gets an int8 head (what a decode step reads),
    whose logits stay close to the float embedding's."""
    from mistol.bench.shapes import hf_config
    from mistol.model import ModelConfig

    config = ModelConfig.from_hf_dict({**hf_config("tiny"), "tie_word_embeddings": True}, source="tied tiny")
    model = mistol_model(config, "int4")
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.fmt == "int8"
    x = model.hidden_states(torch.tensor([[1, 2, 3, 400]]))
    exact = x @ model.embed_tokens.weight.T
    got = model.head(x)
    assert (got - exact).abs().max() <= 0.02 * exact.abs().max()
    assert bytes_per_token(config, "int4", 0) > bytes_per_token(model_config("tiny"), "int4", 0) - 1


@pytest.mark.slow
def test_ctrl_c_while_measuring_ends_quietly(tmp_path):
    """Ctrl-C reaches the whole process group, the engines' worker processes too: one exit
    status, no traceback from any of them."""
    proc = subprocess.Popen([sys.executable, "-m", "mistol", "bench", "--shape", "tiny", "--engines", "mistol",
                             "--quant", "int4", "--steps", "20000", "--cache-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = []
    for line in proc.stderr:  # until a worker is loading or measuring
        seen.append(line)
        if line.startswith("measuring"):
            break
    time.sleep(3)  # (a tiny model: its worker is loaded and waiting for requests, or measuring)
    os.killpg(proc.pid, signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    err = "".join(seen) + rest
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_a_model_file_that_cannot_fit_is_refused_before_anything_is_written(tmp_path):
    """A 7B bench file is 4-15 GB: where the disk cannot hold it, nothing is written (no
    half-written file holding a full disk), and the error names --cache-dir."""
    import dataclasses

    from mistol.bench.models import write_bench_gguf

    huge = dataclasses.replace(model_config("7b"), num_layers=60_000)  # ~12 TB of weights
    with pytest.raises(OSError, match="GiB free in .*--cache-dir"):
        write_bench_gguf(tmp_path / "huge.gguf", huge, "Q8_0")
    with pytest.raises(OSError, match="--cache-dir"):
        write_bench_gguf(tmp_path / "sub" / "huge-f16.gguf", huge, "F16")
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_leaves_no_partial_file(tmp_path):
    from mistol.bench.models import removed_on_failure

    partial = tmp_path / "model.gguf.partial"
    with pytest.raises(KeyboardInterrupt), removed_on_failure(partial):
        partial.write_bytes(b"GGUF" + bytes(1 << 20))  # a first megabyte, then Ctrl-C
        raise KeyboardInterrupt
    directory = tmp_path / "checkpoint.partial"
    with pytest.raises(OSError), removed_on_failure(directory):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(bytes(1 << 20))
        raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_a_random_context_fills_a_rolling_cache_as_a_prefill_would(kv):
    """fill_random_context (the long-context benchmarks') on a sliding window shorter than the
    context: the cache holds the last positions, each at its slot, and decoding and rolling
    back go on from there."""
    from mistol.bench.models import fill_random_context
    from mistol.engine import KV_CACHE_DTYPES, Engine

    config = dataclasses.replace(model_config("tiny"), sliding_window=64)
    engine = Engine(mistol_model(config, "int8"))
    engine.kv_dtype = KV_CACHE_DTYPES[kv]
    session = engine.new_session(max_context=400, chunk_size=16)  # a cache of the window and a chunk
    fill_random_context(session, 300, torch.Generator().manual_seed(0))
    cache = session.cache
    assert cache.capacity < 300 and len(session.tokens) == cache.length == 300
    held = torch.arange(300 - cache.capacity, 300)
    assert torch.equal(cache.slot_pos[held % cache.capacity], held)
    logits = session.verify([5, 6, 7])
    assert logits.shape[0] == 3 and bool(torch.isfinite(logits).all())
    session.truncate(300)
    assert torch.equal(session.step(5), logits[0])


def test_the_report_says_where_the_int8_route_ran_in_amx_tiles():
    from mistol.bench.run import prefill_path_lines

    row = {"engine": "mistol", "kernels": "avx512vnni", "int8_prefill_rows": {"Q6_Kx8": 24}, "bf16_prefill_rows": {}}
    assert "AMX int8 tiles" in " ".join(prefill_path_lines([{**row, "int8_tiles": True}]))
    assert "AMX" not in " ".join(prefill_path_lines([{**row, "int8_tiles": False}]))
    assert "AMX" not in " ".join(prefill_path_lines([row]))  # (a report from before the field)
