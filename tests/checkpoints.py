"""Building tiny random-weight Mistral/Llama/Qwen2 checkpoints with transformers' own classes."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 32002  # the Mistral tokenizer plus OpenHermes' two ChatML tokens


def make_checkpoint(
    path: Path,
    arch: str = "mistral",
    window: int | None = 8,
    heads: int = 4,
    kv_heads: int = 2,
    layers: int = 2,
    hidden: int = 64,
    tie: bool = False,
    max_shard_size: str | None = None,
    safe: bool = True,
    seed: int = 0,
    tokenizer: bool = True,
    max_positions: int = 256,
    intermediate: int | None = None,
    vocab: int = VOCAB,
    **config: object,
) -> Path:
    """`arch`: "mistral", "llama" or "qwen2"; `config`: more fields of the transformers config
    (rope_parameters, head_dim, attention_bias...). Biases get random values (transformers
    starts them at zero, which would hide a bias left out)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=tie, initializer_range=0.2, rms_norm_eps=1e-5, **config,
    )
    torch.manual_seed(seed)
    if arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=window, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if not safe:
        convert_to_bin(Path(path), shards=2 if max_shard_size else 1)
    if tokenizer:
        from helpers import make_openhermes_tokenizer_dir

        make_openhermes_tokenizer_dir(path)
    return Path(path)


def convert_to_bin(path: Path, shards: int = 1) -> None:
    """Rewrite a checkpoint as `pytorch_model*.bin` (transformers 5 only writes safetensors),
    the layout of the original OpenHermes 2.5 upload."""
    import json

    from safetensors.torch import load_file

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
        f.unlink()
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({n: state[n] for n in part}, path / shard)
        weight_map.update({n: shard for n in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tensors_in_mapped_file(model: torch.nn.Module, path: Path) -> set[str]:
    """Names of `model`'s parameters and buffers that are views of `path` as this process
    maps it (from /proc/self/maps; Linux)."""
    mapped = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(Path(path).resolve()):
            mapped.append(tuple(int(x, 16) for x in fields[0].split("-")))
    assert mapped, f"{path} is not mapped"
    return {name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if any(a <= t.data_ptr() < b for a, b in mapped)}
