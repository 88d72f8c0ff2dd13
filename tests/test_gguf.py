"""GGUF files (llama.cpp's format): writing, reading, and running them like a checkpoint directory."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import llama_cpp_ref
from checkpoints import make_checkpoint, reference, tensors_in_mapped_file
from mistol import kernels
from mistol.block_quant import BlockEmbedding
from mistol.cli import main
from mistol.engine import Engine
from mistol.errors import MistolError
from mistol.model import ModelConfig
from mistol.quant import QuantizedLinear, dequantize_ggml, quantize_ggml, quantize_linear
from mistol.weights import find_weight_files
from mistol.weights.checkpoint import iter_tensor_sources
from mistol.weights.gguf_export import write_gguf
from mistol.weights.gguf_file import GGUFFile
from mistol.weights.gguf_layout import from_gguf_rows
from mistol.weights.gguf_load import load_gguf
from mistol.weights.gguf_vocab import tokenizer_from_gguf

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

TOKENS = torch.randint(3, 32000, (40,), generator=torch.Generator().manual_seed(1)).tolist()
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def checkpoint_tensors(model_dir):
    return [(s.name, s.read()) for s in iter_tensor_sources(find_weight_files(model_dir))]


def export(model_dir, path, tensor_type="F32", tokenizer=False, **kw):
    """A checkpoint directory as GGUF; without the tokenizer unless asked (reading a
    32k-token vocabulary costs gguf's reader about a second)."""
    config = ModelConfig.from_file(model_dir / "config.json")
    return write_gguf(path, config, checkpoint_tensors(model_dir), model_dir if tokenizer else None, tensor_type, **kw)


def logits(model, tokens=TOKENS, **load_kw) -> torch.Tensor:
    return Engine.load(model, dtype="f32", **load_kw).new_session().feed(tokens, all_logits=True)


def relative_error(out, ref) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """A 128-wide llama model whose projections have the scale of real checkpoints (std 0.02):
    the test checkpoints' 0.2 saturates attention, so that any rounding flips outputs at random."""
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path_factory.mktemp("gguf128"), arch="llama", hidden=128, heads=4, kv_heads=2)
    state = {k: v * 0.1 if k.endswith("proj.weight") else v for k, v in load_file(path / "model.safetensors").items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


# -- float files ------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["mistral_dir", "llama_dir"])
def test_f32_gguf_gives_the_checkpoints_logits(request, fixture, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    path = export(model_dir, tmp_path / "model.gguf")
    ours = logits(path)
    assert (ours - logits(model_dir)).abs().max() <= 1e-4
    with torch.no_grad():
        ref = reference(model_dir)(torch.tensor([TOKENS])).logits[0]
    assert (ours - ref).abs().max() <= 1e-4
    config, expected = GGUFFile(path).config(), ModelConfig.from_file(model_dir / "config.json")
    # written without a tokenizer: no BOS/EOS ids
    assert replace(config, bos_token_id=expected.bos_token_id, eos_token_id=expected.eos_token_id) == expected
    assert config.sliding_window == (8 if fixture == "mistral_dir" else None)


def test_long_rows_of_float_files_load_in_tiles(tmp_path):
    model_dir = make_checkpoint(tmp_path / "long", intermediate=8256, tokenizer=False)
    path = export(model_dir, tmp_path / "long.gguf")
    model = load_gguf(GGUFFile(path))
    assert type(model.layers[1].mlp.down_proj).__name__ == ("TiledLinear" if kernels.available() else "Linear")
    session = Engine(model).new_session()
    ours = [session.feed(TOKENS[:8], all_logits=True)] + [session.feed(TOKENS[:n])[None] for n in range(9, 17)]
    assert (torch.cat(ours) - logits(model_dir, TOKENS[:16])).abs().max() <= 1e-4


def test_tied_embeddings_have_no_output_tensor(tmp_path):
    model_dir = make_checkpoint(tmp_path / "tied", tie=True, tokenizer=False)
    path = export(model_dir, tmp_path / "tied.gguf")
    assert "output.weight" not in GGUFFile(path).tensors
    assert GGUFFile(path).config().tie_word_embeddings
    assert (logits(path) - logits(model_dir)).abs().max() <= 1e-4


def test_f16_and_bf16_files_track_f32(mistral_dir, tmp_path):
    ref = logits(mistral_dir)
    # measured: f16 0.14% relative error (max 0.023 on logits up to ~8), bf16 1.1%
    for tensor_type, worst in (("F16", 0.005), ("BF16", 0.03)):
        out = logits(export(mistral_dir, tmp_path / f"{tensor_type}.gguf", tensor_type))
        assert relative_error(out, ref) < worst
        assert (out.argmax(-1) == ref.argmax(-1)).all()
    model = load_gguf(GGUFFile(tmp_path / "BF16.gguf"), dtype=torch.bfloat16)
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


# -- q/k row order ------------------------------------------------------------------------------
def test_q_and_k_rows_are_stored_in_llama_cpp_order_and_read_back_exactly(mistral_dir, tmp_path):
    state = dict(checkpoint_tensors(mistral_dir))
    path = export(mistral_dir, tmp_path / "f32.gguf")
    stored = {t.name: t.data for t in gguf.GGUFReader(path).tensors}
    stored_q8 = {t.name: t.data for t in gguf.GGUFReader(export(mistral_dir, tmp_path / "q8.gguf", "Q8_0")).tensors}
    for short, heads in (("q", 4), ("k", 2)):
        w = state[f"model.layers.1.self_attn.{short}_proj.weight"]
        # convert_hf_to_gguf.py's LlamaModel.permute
        permuted = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        assert not torch.equal(permuted, w)
        assert np.array_equal(stored[f"blk.1.attn_{short}.weight"], permuted.numpy())
        q8_rows = quantize_ggml(permuted, "int8").reshape(w.shape[0], -1).numpy()
        assert np.array_equal(stored_q8[f"blk.1.attn_{short}.weight"], q8_rows)
    assert np.array_equal(stored["blk.1.attn_v.weight"], state["model.layers.1.self_attn.v_proj.weight"].numpy())

    model = load_gguf(GGUFFile(path))
    for key, value in model.state_dict().items():
        source = state.get(f"model.{key}", state.get(key))
        assert torch.equal(value, source), key


def test_writer_takes_tensors_in_any_order_and_checks_them(mistral_dir, tmp_path):
    in_order = export(mistral_dir, tmp_path / "a.gguf", "Q8_0")
    config = ModelConfig.from_file(mistral_dir / "config.json")
    tensors = checkpoint_tensors(mistral_dir)
    reversed_ = write_gguf(tmp_path / "b.gguf", config, reversed(tensors), tensor_type="Q8_0")
    assert in_order.read_bytes() == reversed_.read_bytes()
    with pytest.raises(MistolError, match="1 tensor\\(s\\) were not given: layers.1.mlp.down_proj.weight"):
        write_gguf(tmp_path / "c.gguf", config, (t for t in tensors if "1.mlp.down" not in t[0]))
    assert not (tmp_path / "c.gguf").exists()  # no half-written file left behind
    with pytest.raises(MistolError, match="unknown GGUF tensor type 'Q5_K'"):
        write_gguf(tmp_path / "d.gguf", config, tensors, tensor_type="Q5_K")


# -- Q8_0 / Q4_0 files ------------------------------------------------------------------------
@pytest.mark.parametrize("tensor_type,fmt", [("Q8_0", "int8"), ("Q4_0", "int4")])
def test_q8_0_and_q4_0_load_as_our_quantized_layers_unchanged(realistic, tmp_path, tensor_type, fmt):
    # With the embedding kept in f32, the file holds exactly what quantizing ourselves gives.
    path = export(realistic, tmp_path / "q.gguf", tensor_type, embedding_type="F32")
    from_file = Engine.load(path, dtype="f32")
    from_dir = Engine.load(realistic, dtype="f32", quant=fmt)
    for layer in range(2):
        for name in LINEARS:
            ours = from_file.model.get_submodule(f"layers.{layer}.{name}")
            assert isinstance(ours, QuantizedLinear) and ours.fmt == fmt
            assert torch.equal(ours.packed, from_dir.model.get_submodule(f"layers.{layer}.{name}").packed)
    assert torch.equal(from_file.model.lm_head.packed, from_dir.model.lm_head.packed)
    session = from_file.new_session()
    assert torch.equal(session.feed(TOKENS, all_logits=True), from_dir.new_session().feed(TOKENS, all_logits=True))

    # As llama.cpp writes them, the embedding is quantized too: kept as the file's blocks where
    # the kernels run (no float copy), a row read back as its dequantized values when looked up.
    default = export(realistic, tmp_path / "default.gguf", tensor_type)
    embedding = dict(checkpoint_tensors(realistic))["model.embed_tokens.weight"]
    for impl in ("auto", "torch"):
        with kernels.use(impl):
            model = Engine.load(default, dtype="f32").model
            if kernels.available():
                assert isinstance(model.embed_tokens, BlockEmbedding) and model.embed_tokens.fmt == tensor_type
                assert model.embed_tokens.head is None  # (untied: its head is the file's output matrix)
                looked_up = model.embed_tokens(torch.arange(embedding.shape[0]))
            else:
                looked_up = model.embed_tokens.weight
            assert torch.equal(looked_up, dequantize_ggml(quantize_ggml(embedding, fmt), fmt))


@pytest.mark.parametrize("tensor_type,fmt", [("Q8_0", "int8"), ("Q4_0", "int4")])
def test_a_tied_head_multiplies_the_files_own_values(tmp_path, tensor_type, fmt):
    """A tied embedding (Qwen2.5, Llama 3.2, SmolLM) stays blocks, and its head runs on the
    kernels' layout made from the file's bytes: nothing requantized, no float copy. (Tied
    k-quant embeddings, repacked for the head: tests/test_llama_cpp_families.py.)"""
    if not kernels.available():
        pytest.skip("the compiled kernels are not built")
    model_dir = make_checkpoint(tmp_path / "tied", tie=True, hidden=256, tokenizer=False)
    path = export(model_dir, tmp_path / "tied.gguf", "F32", embedding_type=tensor_type)
    stored = GGUFFile(path).tensors["token_embd.weight"]
    assert stored.tensor_type.name == tensor_type
    model = Engine.load(path, dtype="f32").model
    embedding = model.embed_tokens
    assert isinstance(embedding, BlockEmbedding) and model.lm_head is None
    assert not any(p.dtype.is_floating_point and p.shape[0] == embedding.num_embeddings for p in model.parameters())
    head = embedding.as_linear()
    assert head is embedding.head and head.fmt == fmt and head.out_features == embedding.num_embeddings
    values = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type)).reshape(embedding.num_embeddings, -1)
    assert torch.equal(head.dequantize(), values)  # the head: the file's values exactly
    assert torch.equal(embedding(torch.arange(embedding.num_embeddings)), values)  # and so are the lookups,
    embedding.packed = torch.zeros_like(embedding.packed)  # which read the head's copy, not the file's pages
    ids = torch.randint(0, embedding.num_embeddings, (2, 150), generator=torch.Generator().manual_seed(3))
    assert torch.equal(embedding(ids), values[ids])
    assert torch.equal(head.to_ggml().flatten(), torch.from_numpy(stored.data).flatten())  # the file's bytes
    # The logits are the head's product of the last hidden state, as a float head of the same values gives.
    session = Engine(model).new_session()
    out = session.feed(TOKENS[:8], all_logits=True)  # (hidden_states: within the sliding window of 8)
    hidden = model.hidden_states(torch.tensor([TOKENS[:8]]))[0]
    assert (out - hidden @ values.T).abs().max() <= 2e-2 * (hidden @ values.T).abs().max()


def test_quantized_files_stay_within_quantization_noise_of_f32(realistic, tmp_path):
    tokens = torch.randint(3, 32000, (128,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = logits(realistic, tokens)
    stats = {}
    for tensor_type in ("Q8_0", "Q4_0"):
        out = logits(export(realistic, tmp_path / f"{tensor_type}.gguf", tensor_type), tokens)
        stats[tensor_type] = relative_error(out, ref), (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print("relative logit error, top-1 agreement with f32:", stats)
    assert stats["Q8_0"][0] < 0.02 and stats["Q8_0"][1] >= 0.95
    assert stats["Q4_0"][0] < 0.2 and stats["Q4_0"][1] >= 0.6


def test_quant_option_on_gguf_files(realistic, tmp_path):
    q8 = export(realistic, tmp_path / "q8.gguf", "Q8_0", embedding_type="F32")
    q4 = export(realistic, tmp_path / "q4.gguf", "Q4_0", embedding_type="F32")
    f32 = export(realistic, tmp_path / "f32.gguf", "F32")
    # --quant int8 keeps Q4_0 as it is: upconverting would cost memory for nothing.
    assert torch.equal(logits(q4, quant="int8"), logits(q4))
    assert Engine.load(q4, quant="int8").model.layers[0].mlp.up_proj.fmt == "int4"
    # --quant int4 requantizes Q8_0 from its dequantized values.
    model = Engine.load(q8, quant="int4").model
    q8_layer = Engine.load(q8).model.layers[1].mlp.down_proj
    assert torch.equal(model.layers[1].mlp.down_proj.packed, quantize_linear(q8_layer.dequantize(), "int4").packed)
    # A float file with --quant is quantized as it loads, like a checkpoint directory.
    for fmt in ("int8", "int4"):
        assert torch.equal(logits(f32, quant=fmt), logits(realistic, quant=fmt))


PEAK_RSS_SCRIPT = """
import sys, torch
from mistol.engine import Engine
from mistol.quant import quantize_linear
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import gguf.quants, tqdm  # warm up: library code pages count in RSS too, but are not data
quantize_linear(torch.randn(64, 64), "int8")(torch.randn(2, 64))
before = status("VmRSS")
model = Engine.load(sys.argv[1], dtype="f32", quant=sys.argv[2]).model
size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(size, status("VmHWM") - before)
"""


@pytest.mark.parametrize("tensor_type,quant", [("F16", "int8"), ("Q8_0", "int4")])
@pytest.mark.slow
def test_peak_memory_while_loading_stays_near_the_loaded_size(tmp_path, tensor_type, quant):
    """Tensor by tensor, slab by slab, each source's mapped pages given back once converted:
    floats quantized as they load, and blocks dequantized and requantized (as k-quants are)."""
    model_dir = make_checkpoint(tmp_path / "big", hidden=512, layers=4, heads=8, kv_heads=2, tokenizer=False)
    path = export(model_dir, tmp_path / "model.gguf", tensor_type)
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(path), quant],
                         capture_output=True, text=True, check=True)
    size, growth = map(int, out.stdout.split())
    print(f"{tensor_type} as {quant}: loaded {size / 1e6:.0f} MB, peak RSS grew {growth / 1e6:.0f} MB")
    # measured 1.1 (F16) and 1.5 (Q8_0: the file's pages of the tensor being requantized and the dequantizer's
    # f32 slabs, next to a 32 MB model whose embedding stays the file's blocks); a whole second copy would be 2
    assert growth <= 1.75 * size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_quantized_files_layers_hold_no_view_of_the_file(tmp_path):
    """Only the embedding reads the mapped file at run time (the rows looked up); every
    layer holds a copy (converted or repacked, the file's pages given back) -- the norms'
    weights too: read in place, their first read maps in the file's pages around them
    (fault-around, or a whole page-cache folio of up to 2 MB), ~90 MB of a 7B Q4_0 file
    counted in RSS on top of the layers' copies."""
    model_dir = make_checkpoint(tmp_path / "m", hidden=256, layers=2, heads=4, kv_heads=2, tokenizer=False)
    path = export(model_dir, tmp_path / "model.gguf", "Q8_0").resolve()
    engine = Engine.load(path, dtype="f32")
    assert tensors_in_mapped_file(engine.model, path) == {"embed_tokens.packed"}


# -- other block types ------------------------------------------------------------------------
F16_AT = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Raw k-quant rows from random bytes, with sane fp16 scales (gguf can only dequantize these)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = (rng.uniform(0.5, 1.5, (rows, cols // block)) * 2e-3).astype(np.float16)
    for at in F16_AT[qtype]:
        raw[..., at : at + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def write_llama_gguf(path, config: ModelConfig, tensors: dict, arch: str = "llama", tokenizer: str | None = None):
    """A GGUF file written with gguf's own writer, tensors given as llama.cpp names them:
    name -> float32 array, or (raw block bytes [rows, bytes], type)."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    if tokenizer:
        w.add_tokenizer_model(tokenizer)
        w.add_token_list(["<unk>", "<s>", "</s>"])
    for name, value in tensors.items():
        if isinstance(value, tuple):
            w.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SMALL = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4,
                    num_kv_heads=2, head_dim=64, max_position_embeddings=64)
# Each linear layer in another type: as in a Q4_K_M file (Q4_K with some Q6_K), and beyond.
MIXED = {"attn_q": T.Q4_K, "attn_k": T.Q6_K, "attn_v": T.Q5_K, "attn_output": T.Q4_1,
         "ffn_gate": T.Q5_0, "ffn_up": T.Q2_K, "ffn_down": T.Q3_K, "output": T.Q6_K}
SHAPES = {"attn_q": (256, 256), "attn_k": (128, 256), "attn_v": (128, 256), "attn_output": (256, 256),
          "ffn_gate": (512, 256), "ffn_up": (512, 256), "ffn_down": (256, 512), "output": (256, 256)}


def test_k_quants_and_legacy_blocks_load_as_the_files_blocks_and_q2_q3_as_requantized(tmp_path):
    """On a CPU with the kernels, Q4_K/Q5_K/Q6_K/Q4_1/Q5_0 stay the file's blocks (q/k rows
    put back in our order, whole rows moved); Q2_K/Q3_K, and everything without the kernels,
    is requantized from its dequantized values."""
    from mistol import kernels
    from mistol.block_quant import ROW_FORMATS

    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": (random_blocks(T.Q4_K, 256, 256, rng), T.Q4_K)}
    for short, qtype in MIXED.items():
        rows, cols = SHAPES[short]
        if qtype in F16_AT:
            raw = random_blocks(qtype, rows, cols, rng)
        else:  # gguf quantizes these in numpy
            raw = gguf.quants.quantize(rng.normal(0, 0.02, (rows, cols)).astype(np.float32), qtype)
        tensors["output.weight" if short == "output" else f"blk.0.{short}.weight"] = (raw, qtype)
    for norm in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        tensors[norm] = rng.uniform(0.5, 1.5, 256).astype(np.float32)
    path = write_llama_gguf(tmp_path / "mixed.gguf", SMALL, tensors)

    def in_our_order(name, w):
        heads = {"blk.0.attn_q.weight": 4, "blk.0.attn_k.weight": 2}.get(name)
        return w[from_gguf_rows(w.shape[0], heads)] if heads else w

    def dequantized(name):
        raw, qtype = tensors[name]
        return in_our_order(name, torch.from_numpy(gguf.quants.dequantize(raw, qtype)))

    def check(layer, name, fmt, native):
        raw, qtype = tensors[name]
        if native and qtype.name in ROW_FORMATS:
            assert layer.file_type == qtype.name, name
            if layer.fmt == qtype.name:  # (Q4_K is repacked: Q4_Kx8)
                assert torch.equal(layer.packed, in_our_order(name, torch.from_numpy(raw.reshape(raw.shape[0], -1))))
            assert torch.equal(layer.dequantize(), dequantized(name))
        else:
            assert layer.fmt == fmt, name
            assert torch.equal(layer.packed, quantize_linear(dequantized(name), fmt).packed), name

    for impl, native in (("auto", kernels.available()), ("torch", False)):
        with kernels.use(impl):
            for quant, fmt in ((None, "int8"), ("int4", "int4")):
                model = load_gguf(GGUFFile(path), quant=quant)
                for ours, name in zip(LINEARS, [f"blk.0.{n}.weight" for n in MIXED if n != "output"]):
                    check(model.get_submodule(f"layers.0.{ours}"), name, fmt, native)
                check(model.lm_head, "output.weight", fmt, native)
                embedding = dequantized("token_embd.weight")
                if native:  # kept as blocks, rows decoded as looked up
                    assert model.embed_tokens.fmt == "Q4_K"
                    assert torch.equal(model.embed_tokens(torch.arange(256)), embedding)
                else:
                    assert torch.equal(model.embed_tokens.weight, embedding)
                out = Engine(model).new_session().feed(list(range(10)), all_logits=True)
                assert out.isfinite().all()


# -- tokenizer ---------------------------------------------------------------------------------
TEXTS = [
    "Hello, world!",
    "<|im_start|>system\nYou are Hermes.<|im_end|>\n<|im_start|>user\nHi  there,   how are you?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "  two leading spaces and a trailing one ",
    "tabs\tand\nnew\n\nlines",
    "unicode: wörld café 😃 日本語 ﷽ \u200b",
    "<s>markers</s> inside text <unk>",
    "a  b   c    d     e",
    "\u2581 already a SentencePiece space",
    "control \x00 and \x7f bytes",
    "x<|im_start|>y<|im_end|>z",
    "",
]


@pytest.fixture(scope="module")
def hermes_gguf(mistral_dir, tmp_path_factory):
    """The mistral checkpoint with OpenHermes' tokenizer (ChatML tokens 32000/32001) as GGUF."""
    return export(mistral_dir, tmp_path_factory.mktemp("hermes") / "hermes.gguf", "F32", tokenizer=True)


def test_tokenizer_from_metadata_gives_hugging_faces_ids(mistral_dir, hermes_gguf):
    from transformers import AutoTokenizer

    from mistol.chat_template import ChatTemplate
    from mistol.engine import load_tokenizer

    hf = AutoTokenizer.from_pretrained(mistral_dir)
    tok = load_tokenizer(hermes_gguf)
    for text in TEXTS:
        assert tok.encode(text, add_bos=True, parse_special=True) == hf.encode(text), text
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False, split_special_tokens=True), text
        assert tok.decode(hf.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True), text
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 32000, True, 32002)
    assert tok.token_id("<|im_start|>") == 32001 and tok.token_id("<|im_end|>") == 32000
    assert tok.chat_template == hf.chat_template

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    ids = ChatTemplate.for_tokenizer(tok).render(messages)
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids == [1] + hf.encode(expected, add_special_tokens=False)


def test_vocabulary_is_written_as_convert_hf_to_gguf_writes_it(hermes_gguf):
    gf = GGUFFile(hermes_gguf)
    types = gf.get("tokenizer.ggml.token_type")
    tokens = gf.get("tokenizer.ggml.tokens")
    assert gf.get("tokenizer.ggml.model") == "llama" and len(tokens) == 32002
    assert tokens[32000:] == ["<|im_end|>", "<|im_start|>"] and types[32000:] == [3, 3]  # CONTROL
    assert types[:3] == [3, 3, 3] and types[3] == 6 and tokens[3] == "<0x00>"  # BYTE
    assert gf.get("tokenizer.ggml.eos_token_id") == 32000 and gf.get("tokenizer.ggml.add_bos_token") is True


def test_chatml_tokens_typed_user_defined_by_older_converters_are_special(tmp_path):
    from mistol.engine import load_tokenizer
    from mistol.model import Transformer
    from mistol.tokenizer import AddedToken, Tokenizer

    pieces = ["<unk>", "<s>", "</s>", "\u2581", "a", "\u2581a", "<|im_end|>", "<|im_start|>"]
    chatml = [AddedToken("<|im_end|>", 6, special=False), AddedToken("<|im_start|>", 7, special=False)]
    tok = Tokenizer(pieces, [2, 3, 3, 1, 1, 1, 4, 4], chatml, scores=[0, 0, 0, -1, -2, -0.5, 0, 0],
                    bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=2, head_dim=16)
    torch.manual_seed(0)
    random_model = Transformer(config)  # a writer's input can be any model's state dict
    for p in random_model.parameters():
        p.data.normal_(0, 0.02)
    path = write_gguf(tmp_path / "old.gguf", config, random_model.state_dict().items(), tok, "F32")
    assert GGUFFile(path).get("tokenizer.ggml.token_type")[6:] == [4, 4]  # USER_DEFINED
    read = load_tokenizer(path)
    assert read.encode("<|im_start|>a<|im_end|>", parse_special=True) == [7, 5, 6]
    assert read.decode([7, 5, 6]) == "a"  # skipped as special tokens, as Hugging Face would
    loaded = load_gguf(GGUFFile(path))
    for key, value in random_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# -- the command line --------------------------------------------------------------------------
@pytest.mark.slow
def test_generate_with_a_gguf_model_prints_the_reference_text(mistral_dir, hermes_gguf):
    from transformers import AutoTokenizer

    prompt = "The quick brown fox"
    tok = AutoTokenizer.from_pretrained(mistral_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = reference(mistral_dir).generate(ids, max_new_tokens=24, do_sample=False,
                                              eos_token_id=[2, 32000], pad_token_id=0)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    result = subprocess.run(
        [sys.executable, "-m", "mistol", "generate", "--model", str(hermes_gguf), "--prompt", prompt,
         "--max-tokens", "24", "--temperature", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n" and len(expected) > 20


def test_tokenize_command_reads_a_gguf(hermes_gguf, mistral_dir, capsys):
    from transformers import AutoTokenizer

    text = "<|im_start|>user\nHello,  wörld! 😃<|im_end|>"
    assert main(["tokenize", "--model", str(hermes_gguf), "--special", text]) == 0
    assert json.loads(capsys.readouterr().out) == AutoTokenizer.from_pretrained(mistral_dir).encode(text)


def one_line_error(args, capsys) -> str:
    assert main(args) == 1
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("mistol: error: ") and "Traceback" not in captured.err
    return line


def test_the_header_reads_as_the_gguf_packages_own_reader_does(hermes_gguf, tmp_path):
    """Every metadata value and every tensor (type, dimensions, bytes) as `gguf.GGUFReader`
    gives them, on a file with a 32k-token vocabulary: our parser keeps string arrays as
    bytes, not two numpy arrays a string."""
    from mistol.weights.gguf_header import read_header

    reference = gguf.GGUFReader(hermes_gguf)
    ours = GGUFFile(hermes_gguf)
    keys = [key for key in reference.fields if not key.startswith("GGUF.")]
    assert keys == list(read_header(hermes_gguf).metadata) and "tokenizer.ggml.tokens" in keys
    for key in keys:
        assert ours.get(key) == reference.fields[key].contents(), key
    assert list(ours.tensors) == [t.name for t in reference.tensors]
    for theirs in reference.tensors:
        mine = ours.tensors[theirs.name]
        assert (mine.tensor_type, list(mine.shape), mine.n_elements, mine.n_bytes, mine.data_offset) == (
            theirs.tensor_type, list(theirs.shape), theirs.n_elements, theirs.n_bytes, theirs.data_offset)
        assert mine.data.dtype == theirs.data.dtype and np.array_equal(mine.data, theirs.data)


def test_a_damaged_header_is_refused_before_any_allocation(mistral_dir, tmp_path):
    """Counts and lengths are checked against the bytes left: a huge count fails at once."""
    import struct

    good_path = export(mistral_dir, tmp_path / "good.gguf", "Q8_0")
    good = bytearray(good_path.read_bytes())
    # a tensor's outer dimension made 2^64 / (its inner one) larger: the product of the two
    # wraps round to the true size in 64-bit arithmetic (a reshape then failed with a traceback)
    info = gguf.GGUFReader(good_path).tensors[0]
    inner, outer = (int(d) for d in info.shape)
    assert inner & (inner - 1) == 0, info.shape  # (a power of two: 2^64 / inner is whole)
    outer_at = info.field.offset + 8 + len(info.name.encode()) + 4 + 8  # (name's length and bytes, n_dims, inner)
    cases = {
        "dimensions": (outer_at, struct.pack("<Q", outer + 2**64 // inner)),
        "metadata count": (16, struct.pack("<Q", 2**62)),  # after magic, version, tensor count
        "key length": (24, struct.pack("<Q", 2**40)),
        "version": (4, struct.pack("<I", 7)),
        "big-endian": (4, struct.pack(">I", 3)),
    }
    for what, (offset, raw) in cases.items():
        bad = good.copy()
        bad[offset : offset + len(raw)] = raw
        path = tmp_path / f"{what}.gguf"
        path.write_bytes(bad)
        with pytest.raises(MistolError, match="truncated or corrupt GGUF file") as caught:
            GGUFFile(path)
        print(what, "->", caught.value)
        if what in ("version", "big-endian"):
            assert ("version 7" if what == "version" else "big-endian") in str(caught.value)


def test_hostile_model_numbers_are_refused_in_one_line(mistral_dir, tmp_path, capsys):
    """The model's numbers in a file's metadata, set as a damaged or hostile file might: each
    refused with a line that names it (a zero count of key-value heads divided by zero; an
    infinite epsilon or RoPE base ran, and wrote junk; a huge block count ate memory)."""
    import struct

    good_path = export(mistral_dir, tmp_path / "good.gguf", "Q8_0")
    fields = gguf.GGUFReader(good_path).fields
    cases = {
        "llama.attention.head_count_kv": ("<I", 0, "num_kv_heads is 0; it must be positive and below 2^24"),
        "llama.attention.head_count": ("<I", 3, "embedding_length 64 is not a multiple of head_count 3"),
        "llama.attention.layer_norm_rms_epsilon": ("<f", float("inf"), "rms_norm_eps is inf; it must be a number >= 0"),
        "llama.rope.freq_base": ("<f", -float("inf"), "rope_theta is -inf; it must be a positive number"),
        # (a model of 4 billion blocks, built to load into, took minutes and gigabytes)
        "llama.block_count": ("<I", 2**32 - 1, "block_count is 4294967295, but the file holds the tensors of 2 blocks"),
    }
    for key, (fmt, value, message) in cases.items():
        field = fields[key]
        bad = bytearray(good_path.read_bytes())
        struct.pack_into(fmt, bad, field.offset + 8 + len(key) + 4, value)  # (key's length and bytes, value type)
        path = tmp_path / f"{key}.gguf"
        path.write_bytes(bad)
        line = one_line_error(["generate", "--model", str(path), "-p", "x"], capsys)
        assert message in line, (key, line)


def test_bad_gguf_files_give_one_line_errors(mistral_dir, tmp_path, capsys):
    text = tmp_path / "notes.gguf"
    text.write_text("just some text, not a model\n")
    result = subprocess.run([sys.executable, "-m", "mistol", "generate", "--model", str(text), "-p", "hi"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"mistol: error: {text}: not a GGUF file (it does not start with the bytes 'GGUF')"

    good = export(mistral_dir, tmp_path / "good.gguf", "Q8_0").read_bytes()
    cuts = {"data": len(good) // 2, "header": 200}
    for what, size in cuts.items():
        cut = tmp_path / f"cut-{what}.gguf"
        cut.write_bytes(good[:size])
        assert f"{cut}: truncated or corrupt GGUF file" in one_line_error(["generate", "--model", str(cut), "-p", "x"], capsys)

    config = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=2, head_dim=16)
    embd = {"token_embd.weight": np.zeros((32, 32), np.float32)}
    gpt2 = write_llama_gguf(tmp_path / "gpt2.gguf", config, embd, arch="gpt2")
    assert "unsupported architecture 'gpt2'" in one_line_error(["generate", "--model", str(gpt2), "-p", "x"], capsys)

    wordpiece = write_llama_gguf(tmp_path / "bert.gguf", config, embd, tokenizer="bert")
    line = one_line_error(["tokenize", "--model", str(wordpiece), "x"], capsys)
    assert "tokenizer 'bert' is not supported" in line
    bpe = write_llama_gguf(tmp_path / "bpe.gguf", config, embd, tokenizer="gpt2")
    line = one_line_error(["tokenize", "--model", str(bpe), "x"], capsys)
    assert "a 'gpt2' tokenizer without tokenizer.ggml.merges" in line

    iq = {**embd, "blk.0.attn_q.weight": (np.zeros((32, 18), np.uint8), T.IQ4_NL)}
    iq_path = write_llama_gguf(tmp_path / "iq.gguf", config, iq)
    line = one_line_error(["generate", "--model", str(iq_path), "-p", "x"], capsys)
    assert "tensor 'blk.0.attn_q.weight' has type IQ4_NL, which mistol does not read" in line

    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 8)
    assert ".gguf file" in one_line_error(["generate", "--model", str(other), "-p", "x"], capsys)
    # a relative path would pass for a Hugging Face repo id ("owner/name")
    assert one_line_error(["chat", "--model", "models/missing.gguf"], capsys).endswith("models/missing.gguf: no such file")


# -- llama.cpp itself --------------------------------------------------------------------------
@pytest.mark.slow
def test_llama_cpp_reads_our_files_and_computes_the_same_logits(realistic, tmp_path, monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp")
    from mistol.model import backend

    # Compare like with like: int8 activations, as llama.cpp uses (not the bf16 prefill path).
    monkeypatch.setattr(backend, "native_bf16", lambda: False)
    tokens = [1] + TOKENS  # a llama checkpoint: llama.cpp has no sliding window for llama files
    ref = logits(realistic, tokens)
    text = "<|im_start|>user\nHello,  wörld 😃<|im_end|>"
    for tensor_type in ("F32", "Q8_0", "Q4_0"):
        path = export(realistic, tmp_path / f"{tensor_type}.gguf", tensor_type, tokenizer=True)
        # an f32 KV cache (llama.cpp's default is f16) so that F32 files compare exactly
        llm = llama_cpp_ref.model(path, logits_all=True, n_ctx=64, n_threads=2, verbose=False,
                                  type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        llm.eval(tokens)
        theirs = torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))
        engine = Engine.load(path, dtype="f32")
        ours = engine.new_session().feed(tokens, all_logits=True)
        error = relative_error(ours, theirs)
        print(f"{tensor_type}: mistol vs llama.cpp {error:.1e}, vs f32 {relative_error(ours, ref):.1e}")
        if tensor_type == "F32":  # measured 2e-7
            assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
            ids = engine.tokenizer.encode(text, add_bos=True, parse_special=True)
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        else:  # both quantize activations to int8 per block of 32, and sum in other orders:
            # measured 2.7e-3 (Q8_0) and 3e-3 (Q4_0), where quantizing costs 9e-3 and 1.2e-1
            assert error <= 0.5 * relative_error(ours, ref)
            assert (ours.argmax(-1) == theirs.argmax(-1)).all()


OPEN_SCRIPT = """
import sys
from mistol.engine import Engine
Engine.load(sys.argv[1], dtype="f32", progress=False).new_session().feed([1, 2, 3])
print("mistral_common" in sys.modules)
import mistral_common.tokens.tokenizers.mistral  # still importable by whoever needs it
"""


def test_loading_a_gguf_file_does_not_import_mistral_common(mistral_dir, tmp_path):
    """gguf imports mistral_common where it is installed (~30 MB and 0.3 s a start); reading
    and running a file needs none of it."""
    pytest.importorskip("mistral_common")
    path = export(mistral_dir, tmp_path / "model.gguf")
    result = subprocess.run([sys.executable, "-c", OPEN_SCRIPT, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]


def vocabulary_file(path, model: str, **arrays):
    """A GGUF file of metadata only: a tokenizer of `model` with the given arrays."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    for key, (values, element) in arrays.items():
        writer.add_key_value(f"tokenizer.ggml.{key}", values, gguf.GGUFValueType.ARRAY, sub_type=element)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return GGUFFile(path)


S, I32, U64, F32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.INT32, gguf.GGUFValueType.UINT64, gguf.GGUFValueType.FLOAT32


@pytest.mark.parametrize("model, arrays, message", [
    ("llama", {"tokens": ([1, 2, 3], I32)}, "'tokenizer.ggml.tokens' is not an array of str"),
    ("llama", {"tokens": (["<unk>", "a"], S), "token_type": ([2, 2**40], U64)}, "outside 32 bits"),
    ("llama", {"tokens": (["<unk>", "a"], S), "scores": (["x", "y"], S)}, "'tokenizer.ggml.scores' is not an array"),
    ("gpt2", {"tokens": (["a", "b", "ab"], S), "merges": ([1, 2], I32)}, "'tokenizer.ggml.merges' is not an array"),
    ("gpt2", {"tokens": (["a", "b", "ab"], S), "merges": (["a b"], S), "token_type": ([1, 1, 2**33], U64)},
     "outside 32 bits"),
])
def test_vocabulary_arrays_of_the_wrong_kind_get_a_one_line_error(tmp_path, model, arrays, message):
    gf = vocabulary_file(tmp_path / "vocab.gguf", model, **arrays)
    with pytest.raises(MistolError, match=message):
        tokenizer_from_gguf(gf)


def test_vocabulary_arrays_of_the_right_kind_still_load(tmp_path):
    gf = vocabulary_file(tmp_path / "vocab.gguf", "llama", tokens=(["<unk>", "▁", "a", "▁a"], S),
                         token_type=([2, 1, 1, 1], I32), scores=([0.0, -1.0, -2.0, -3.0], F32))
    tokenizer = tokenizer_from_gguf(gf)
    assert list(tokenizer.pieces) == ["<unk>", "▁", "a", "▁a"] and tokenizer.encode("a") == [3]
