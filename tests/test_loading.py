"""Checkpoint loading: clear errors for bad input, and no needless copies in memory."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from checkpoints import make_checkpoint, tensors_in_mapped_file
from mistol.errors import MistolError
from mistol.model import ModelConfig
from mistol.weights import load_model


@pytest.fixture()
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "m", tokenizer=False)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(MistolError, match="no such model directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(MistolError, match="config.json.*not found"):
        load_model(tmp_path)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(MistolError, match="no weights found"):
        load_model(ckpt)


def test_unsupported_architecture_is_named(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MistolError, match="unsupported architecture 'GPTNeoXForCausalLM'"):
        load_model(ckpt)


@pytest.mark.parametrize("field,value,message", [
    # (a model of a billion layers, built to load into, would take minutes and gigabytes)
    ("num_hidden_layers", 10**9, "num_layers is 1000000000; it must be positive and below 2^16"),
    ("num_hidden_layers", 1000, "num_hidden_layers is 1000, but the checkpoint holds the tensors of 2 layers"),
    ("num_key_value_heads", -2, "num_kv_heads is -2; it must be positive and below 2^24"),
    ("rms_norm_eps", -1.0, "rms_norm_eps is -1.0; it must be a number >= 0"),
    ("rope_parameters", {"rope_theta": 0, "rope_type": "default"}, "rope_theta is 0.0; it must be a positive number"),
    ("sliding_window", -8, "sliding_window is -8; it must be positive (or absent)"),
    # values of the wrong kind, each of which ended in a traceback (TypeError, OverflowError)
    ("hidden_size", "4096", "hidden_size is '4096'; expected a whole number"),
    ("intermediate_size", 2**63, "intermediate_size is 9223372036854775808; it must be positive and below 2^24"),
    ("rms_norm_eps", None, "rms_norm_eps is None; expected a number"),
    ("architectures", "MistralForCausalLM", "architectures is 'MistralForCausalLM'; expected a list of names"),
    ("rope_parameters", "yes", "rope_parameters is 'yes'; expected an object"),
    ("rope_parameters", {"rope_type": "linear", "factor": {}}, "rope_parameters holds a value that is not a number"),
])
def test_a_hostile_config_is_refused_in_one_line(ckpt, field, value, message):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MistolError, match=re.escape(message)):
        load_model(ckpt)


def test_unsupported_rope_scaling_is_named():
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 4}}
    with pytest.raises(MistolError, match="rope_scaling.rope_type 'yarn'"):
        ModelConfig.from_hf_dict(cfg)


def test_both_rope_theta_forms():
    base = {"architectures": ["MistralForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "sliding_window": 4096}
    old = ModelConfig.from_hf_dict({**base, "rope_theta": 1e6})
    new = ModelConfig.from_hf_dict({**base, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}})
    assert old.rope_theta == new.rope_theta == 1e6
    assert old.sliding_window == 4096 and old.head_dim == 4


def test_missing_tensor_is_named(ckpt):
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(MistolError, match="missing 1 tensor.*layers.1.mlp.up_proj.weight"):
        load_model(ckpt)


def test_misshaped_tensor_is_named(ckpt):
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(MistolError, match=r"'model.norm.weight' has shape \[3\].*\[64\]"):
        load_model(ckpt)


def test_truncated_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MistolError, match="truncated"):
        load_model(ckpt)
    path.write_bytes(b"\x05")
    with pytest.raises(MistolError, match="truncated or corrupt"):
        load_model(ckpt)


def test_corrupt_bin(tmp_path):
    path = make_checkpoint(tmp_path / "b", safe=False, tokenizer=False)
    (path / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(MistolError, match="pytorch_model.bin: truncated or corrupt"):
        load_model(path)


def test_index_naming_a_missing_shard(tmp_path):
    path = make_checkpoint(tmp_path / "s", max_shard_size="5MB", tokenizer=False)
    shard = sorted(path.glob("model-*-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(MistolError, match=shard.name):
        load_model(path)


def test_cli_prints_one_line_error_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mistol", "generate", "--model", str(tmp_path / "x"), "-p", "hi"],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"mistol: error: {tmp_path / 'x'}: no such model directory (or Hugging Face repo id)"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_quantized_checkpoints_layers_hold_no_view_of_its_file(tmp_path):
    """Quantized as they load, the linear layers are copies and the file's pages are given
    back; the norms are copied too (read in place, their first read would map in the pages
    around them again: see tests/test_gguf.py), so only the embedding's rows, looked up, are
    read from the mapped file."""
    path = make_checkpoint(tmp_path / "m", hidden=256, layers=2, heads=4, kv_heads=2, tokenizer=False)
    model = load_model(path, dtype=torch.float32, quant="int8")
    assert tensors_in_mapped_file(model, path / "model.safetensors") == {"embed_tokens.weight"}
    # a float model runs on the file's pages, as it was: only the small tensors are copies
    float_model = load_model(path, dtype=torch.float32)
    in_file = tensors_in_mapped_file(float_model, path / "model.safetensors")
    assert "lm_head.weight" in in_file and not any("norm" in name for name in in_file)


PEAK_RSS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from mistol.weights import load_model
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    import tqdm  # warm up: code pages of the libraries count in RSS too, but are not data
    torch.ones(4096, dtype=torch.bfloat16).float().to(torch.bfloat16)
    before = status("VmRSS")
    model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(weights, status("VmHWM") - before)
""")


@pytest.mark.parametrize("saved,loaded", [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")])
@pytest.mark.slow
def test_peak_memory_while_loading_stays_near_the_weights(tmp_path, saved, loaded):
    """Peak RSS growth while loading <= 1.25 x the loaded weights (mmap, no duplicate copies)."""
    path = make_checkpoint(tmp_path / "big", hidden=512, layers=6, heads=8, kv_heads=2, tokenizer=False)
    if saved != "float32":  # re-save in 16 bits, as real checkpoints are
        from safetensors.torch import load_file, save_file

        state = {k: v.to(getattr(torch, saved)) for k, v in load_file(path / "model.safetensors").items()}
        save_file(state, path / "model.safetensors")
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(path), loaded],
                         capture_output=True, text=True, check=True)
    weights, growth = map(int, out.stdout.split())
    assert weights > 80e6
    assert growth <= 1.25 * weights, f"peak RSS grew {growth / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"
