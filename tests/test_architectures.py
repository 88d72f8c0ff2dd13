"""The model families beyond Mistral: Qwen2's attention biases, tied embeddings, Llama 3.1's RoPE
scaling, an explicit head_dim — each against transformers, from a checkpoint directory and from a
GGUF file; and a one-line refusal, naming what is missing, for the families mistol does not run."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints import make_checkpoint, reference
from mistol import kernels
from mistol.engine import Engine
from mistol.errors import MistolError
from mistol.model import ModelConfig
from mistol.model.backend import Backend
from mistol.weights import load_model
from mistol.weights.gguf_export import export_checkpoint
from mistol.weights.gguf_file import GGUFFile

TOL = 1e-4  # float32 logits (up to ~7 here)
VOCAB = 1000
TOKENS = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(1)).tolist()
# original context 16: positions past it reach the band that llama3 scaling changes
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

VARIANTS = {
    "qwen2": dict(arch="qwen2", kv_heads=2),
    "qwen2-tied": dict(arch="qwen2", tie=True),
    "llama-tied": dict(arch="llama", tie=True),
    "llama3.1-rope": dict(arch="llama", rope_parameters={**LLAMA3, "rope_theta": 500000.0}),
    "head_dim-32": dict(arch="llama", head_dim=32),  # heads 4 x 32 = 128 != hidden 64
    "llama-attention_bias": dict(arch="llama", attention_bias=True),
    "rope_theta-1e6": dict(arch="mistral", window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), tokenizer=False, vocab=VOCAB,
                           **VARIANTS[request.param])
    with torch.no_grad():
        ref = reference(path)(torch.tensor([TOKENS])).logits[0]
    return request.param, path, ref


def logits_of(engine: Engine, session=None) -> torch.Tensor:
    """Logits of TOKENS: the first half as one prefill, the rest one decode step at a time."""
    session = session or engine.new_session()
    half = len(TOKENS) // 2
    out = [session.feed(TOKENS[:half], all_logits=True)]
    out += [session.feed(TOKENS[:n])[None] for n in range(half + 1, len(TOKENS) + 1)]
    return torch.cat(out)


def test_checkpoint_logits_match_transformers(variant):
    name, path, ref = variant
    diff = (logits_of(Engine(load_model(path))) - ref).abs().max().item()
    print(f"{name}: checkpoint vs transformers {diff:.1e}")
    assert diff <= TOL


def test_f32_gguf_logits_match_transformers(variant, tmp_path):
    name, path, ref = variant
    gguf_path = export_checkpoint(path, tmp_path / "model.gguf", "F32")
    diff = (logits_of(Engine.load(gguf_path, dtype="f32")) - ref).abs().max().item()
    print(f"{name}: mistol's GGUF vs transformers {diff:.1e}")
    assert diff <= TOL
    gf = GGUFFile(gguf_path)
    config = ModelConfig.from_file(path / "config.json")
    assert gf.architecture == ("qwen2" if name.startswith("qwen2") else "llama")
    assert ("output.weight" in gf.tensors) != config.tie_word_embeddings
    assert ("rope_freqs.weight" in gf.tensors) == (config.rope_llama3 is not None)


@pytest.mark.skipif(not kernels.available(), reason="mistol's C kernels are not built")
def test_int8_decode_runs_on_the_compiled_layer_and_tracks_transformers(variant):
    """int8 weights: decode steps take the fused C layer (biases included), and the logits stay
    within int8's rounding of the reference (a relative error measured at 2-4%, for weights of
    std 0.2 that saturate attention; measured without the q bias: 42-58%, without llama3 scaling: 100%)."""
    name, path, ref = variant
    model = load_model(path, quant="int8")
    engine = Engine(model)
    assert Backend.choose(model).cpu_decoder is not None
    ours = logits_of(engine)
    error = ((ours - ref).norm() / ref.norm()).item()
    print(f"{name}: int8 vs transformers, relative {error:.1e}")
    assert error < 0.1
    if ModelConfig.from_file(path / "config.json").tie_word_embeddings:
        # the head is the embedding matrix itself: one [vocab, hidden] matrix in the model
        assert model.lm_head is None
        assert sum(p.numel() for p in model.parameters() if p.shape[0] == VOCAB) == VOCAB * 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_steps_match_transformers(variant):
    """Decode steps replayed from CUDA graphs add the biases and scaled RoPE too (no TF32:
    float32 products; 1e-3 for the GPU's other summation order)."""
    name, path, ref = variant
    engine = Engine.load(path, dtype="f32", device="cuda")
    engine.cuda_graphs = True
    session = engine.new_session()
    ours = logits_of(engine, session).cpu()
    assert session._graphed is not None
    diff = (ours - ref).abs().max().item()
    print(f"{name}: CUDA graphs vs transformers {diff:.1e}")
    assert diff <= 1e-3


def test_old_and_new_rope_config_forms_agree():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4}
    old = ModelConfig.from_hf_dict({**base, "rope_theta": 5e5, "rope_scaling": {**LLAMA3}})
    old_type_key = ModelConfig.from_hf_dict({**base, "rope_theta": 5e5,
                                             "rope_scaling": {**LLAMA3, "type": LLAMA3["rope_type"]}})
    new = ModelConfig.from_hf_dict({**base, "rope_parameters": {**LLAMA3, "rope_theta": 5e5}})
    assert old == new == old_type_key
    assert new.rope_theta == 5e5 and new.rope_llama3.factor == 8.0
    assert new.rope_llama3.original_max_position_embeddings == 16


# -- what mistol does not run --------------------------------------------------------------------
def hf_config(model_type: str, architecture: str, **fields) -> dict:
    """A config.json as transformers writes it for `model_type`."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, **fields).to_dict()
    cfg["architectures"] = [architecture]
    return cfg


@pytest.mark.parametrize("model_type,architecture,fields,expected", [
    ("mixtral", "MixtralForCausalLM", {}, "mixture-of-experts"),
    ("qwen2_moe", "Qwen2MoeForCausalLM", {}, "mixture-of-experts"),
    ("gemma", "GemmaForCausalLM", {}, "Gemma's (1 + weight) norms"),
    ("gemma2", "Gemma2ForCausalLM", {}, "Gemma's (1 + weight) norms"),
    ("phi3", "Phi3ForCausalLM", {}, "fused qkv_proj"),
    ("qwen3", "Qwen3ForCausalLM", {}, "q/k norms"),
    ("qwen2", "Qwen2ForCausalLM", dict(use_sliding_window=True, max_window_layers=2, num_hidden_layers=4),
     "a sliding window on some layers only (2 of 4"),
    ("llama", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                        "original_max_position_embeddings": 1024}),
     "rope_type 'yarn' is not supported (supported: default, linear, llama3)"),
    ("llama", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     "rope_type 'dynamic' is not supported"),
    ("llama", "LlamaForCausalLM", dict(mlp_bias=True), "mlp_bias=true"),
], ids=lambda v: v if isinstance(v, str) and v[0].islower() and " " not in v else None)
def test_families_mistol_does_not_run_are_refused_in_one_line(model_type, architecture, fields, expected, tmp_path):
    cfg = hf_config(model_type, architecture, **fields)
    with pytest.raises(MistolError) as e:
        ModelConfig.from_hf_dict(cfg)
    message = str(e.value)
    assert expected in message and "\n" not in message
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MistolError, match="config.json"):
        load_model(tmp_path)


def test_qwen2_configs_as_published_load(tmp_path):
    """Qwen2.5's own config.json: sliding_window set but use_sliding_window false (no window)."""
    cfg = hf_config("qwen2", "Qwen2ForCausalLM", use_sliding_window=False, sliding_window=131072, max_window_layers=21,
                    tie_word_embeddings=True, num_hidden_layers=24)
    config = ModelConfig.from_hf_dict(cfg)
    assert config.sliding_window is None and config.qkv_bias and not config.o_bias and config.tie_word_embeddings
    every_layer = hf_config("qwen2", "Qwen2ForCausalLM", use_sliding_window=True, sliding_window=64,
                            max_window_layers=0, num_hidden_layers=4)
    assert ModelConfig.from_hf_dict(every_layer).sliding_window == 64


def test_gguf_files_mistol_does_not_run_are_refused_in_one_line(tmp_path):
    import gguf
    import numpy as np

    def write(name, arch="llama", extra=None, rope_freqs=None):
        w = gguf.GGUFWriter(tmp_path / name, arch)
        for key, value in {"block_count": 1, "embedding_length": 32, "feed_forward_length": 64,
                           "attention.head_count": 2, **(extra or {})}.items():
            w.add_uint32(f"{arch}.{key}", value)
        w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
        if rope_freqs is not None:
            w.add_tensor("rope_freqs.weight", rope_freqs)
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        return tmp_path / name

    cases = {
        write("gemma.gguf", "gemma"): "unsupported architecture 'gemma'; mistol runs llama-architecture",
        write("moe.gguf", "qwen2moe"): "unsupported architecture 'qwen2moe'",
        write("mixtral.gguf", extra={"expert_count": 8}): "mixture-of-experts",
        write("freqs.gguf", rope_freqs=np.ones(3, np.float32)): "rope_freqs.weight should be F32 of shape [8]",
    }
    for path, expected in cases.items():
        with pytest.raises(MistolError) as e:
            GGUFFile(path).config()
        assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


# The config.json fields (as published on the Hugging Face hub) that decide what mistol runs.
PUBLISHED = {
    "Llama-3.2-1B-Instruct": dict(
        architectures=["LlamaForCausalLM"], hidden_size=2048, head_dim=64, intermediate_size=8192,
        num_attention_heads=32, num_hidden_layers=16, num_key_value_heads=8, vocab_size=128256,
        attention_bias=False, mlp_bias=False, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    "Qwen2.5-0.5B-Instruct": dict(
        architectures=["Qwen2ForCausalLM"], hidden_size=896, intermediate_size=4864, num_attention_heads=14,
        num_hidden_layers=24, num_key_value_heads=2, vocab_size=151936, max_window_layers=21, rope_theta=1000000.0,
        sliding_window=32768, use_sliding_window=False, tie_word_embeddings=True, rms_norm_eps=1e-06),
    "SmolLM2-135M-Instruct": dict(
        architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536, num_attention_heads=9,
        num_hidden_layers=30, num_key_value_heads=3, vocab_size=49152, rope_scaling=None, rope_theta=100000,
        tie_word_embeddings=True, attention_bias=False),
    "DeepSeek-R1-Distill-Qwen-1.5B": dict(
        architectures=["Qwen2ForCausalLM"], hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
        num_hidden_layers=28, num_key_value_heads=2, vocab_size=151936, max_window_layers=21, rope_theta=10000,
        sliding_window=4096, use_sliding_window=False, tie_word_embeddings=False),
    "DeepSeek-R1-Distill-Llama-8B": dict(
        architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_hidden_layers=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_of_the_families_are_read_as_transformers_reads_them(name):
    """What transformers builds from each config (its attention layers' biases, head size,
    RoPE frequencies, sliding windows, tied head) is what mistol's `ModelConfig` describes."""
    from transformers import AutoConfig

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mistol.model.transformer import rope_frequencies

    cfg = {"hidden_act": "silu", "max_position_embeddings": 131072, **PUBLISHED[name]}
    config = ModelConfig.from_hf_dict(cfg)
    hf = AutoConfig.for_model({"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[cfg["architectures"][0]],
                              **{k: v for k, v in cfg.items() if k != "architectures"})
    qwen2 = cfg["architectures"][0] == "Qwen2ForCausalLM"
    assert config.qkv_bias == (qwen2 or bool(cfg.get("attention_bias")))
    assert config.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert config.sliding_window is None and set(getattr(hf, "layer_types", None) or ["full_attention"]) == {
        "full_attention"}
    assert config.tie_word_embeddings == hf.tie_word_embeddings
    rope_type = hf.rope_parameters["rope_type"]
    expected, _ = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu") if rope_type != "default" else (None, None)
    if expected is None:
        expected = 1.0 / hf.rope_parameters["rope_theta"] ** (
            torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim)
    assert torch.equal(rope_frequencies(config), expected)


@pytest.mark.parametrize("family,shape", [("llama3", dict(arch="llama", tie=True, rope_parameters=LLAMA3)),
                                          ("qwen2", dict(arch="qwen2", tie=True))])
def test_directories_with_byte_level_bpe_generate_what_transformers_generates(family, shape, tmp_path):
    """A Llama 3.2- or Qwen 2.5-shaped directory with its tokenizer.json: mistol's greedy
    continuation of a text is transformers', stopping at the same end token (if reached)."""
    from bpe_models import FAMILIES, train_bpe_dir
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from mistol.sampling import SamplingParams

    fam = FAMILIES[family]
    path = train_bpe_dir(tmp_path / family, fam)
    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size() + fam.extra_vocab
    make_checkpoint(path, tokenizer=False, vocab=vocab, **shape)
    text = "The quick brown fox: 12345 + 678 = ?"
    hf_ids = AutoTokenizer.from_pretrained(path)(text, return_tensors="pt").input_ids
    engine = Engine.load(path, dtype="f32")
    prompt = engine.tokenizer.encode(text, add_bos=engine.tokenizer.add_bos)
    assert prompt == hf_ids[0].tolist()
    eos = engine.tokenizer.eos_id
    with torch.no_grad():
        out = reference(path).generate(hf_ids, max_new_tokens=24, do_sample=False, eos_token_id=eos,
                                       pad_token_id=eos)
    ours = list(engine.new_session().generate(prompt, SamplingParams(temperature=0, max_tokens=24,
                                                                     stop_token_ids=[eos])))
    assert ours == out[0, hf_ids.shape[1]:].tolist()
