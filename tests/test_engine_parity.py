"""The engine against the reference implementation (transformers), on random weights."""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_checkpoint, reference
from mistol import kernels
from mistol.engine import Engine
from mistol.model.linear import TiledLinear
from mistol.sampling import SamplingParams
from mistol.weights import load_model

TOL = 1e-4


def ref_logits(path, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(path)(torch.tensor([tokens])).logits[0].float()


def our_logits(path, tokens: list[int], **session_kw) -> torch.Tensor:
    engine = Engine(load_model(path))
    return engine.new_session(**session_kw).feed(tokens, all_logits=True)


def random_tokens(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32000, (n,), generator=g).tolist()


def test_mistral_sliding_window_logits_match_reference(mistral_dir):
    tokens = random_tokens(40)  # five times the window of 8
    diff = (our_logits(mistral_dir, tokens) - ref_logits(mistral_dir, tokens)).abs().max()
    assert diff <= TOL


def test_sliding_window_matches_reference_with_rolling_cache_wrapping(mistral_dir):
    tokens = random_tokens(40, seed=2)
    # chunk 4 -> a cache of 8 + 4 slots, overwritten many times over 40 tokens
    ours = our_logits(mistral_dir, tokens, chunk_size=4)
    engine = Engine(load_model(mistral_dir))
    assert engine.new_session(chunk_size=4).cache.capacity == 12
    assert (ours - ref_logits(mistral_dir, tokens)).abs().max() <= TOL


def test_llama_without_window_logits_match_reference(llama_dir):
    tokens = random_tokens(40, seed=3)
    assert (our_logits(llama_dir, tokens) - ref_logits(llama_dir, tokens)).abs().max() <= TOL


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["gqa1", "gqa2", "gqa4"])
def test_grouped_query_attention_ratios(tmp_path, kv_heads):
    path = make_checkpoint(tmp_path, heads=4, kv_heads=kv_heads, tokenizer=False, seed=kv_heads)
    tokens = random_tokens(24, seed=kv_heads)
    assert (our_logits(path, tokens) - ref_logits(path, tokens)).abs().max() <= TOL


def test_long_rows_load_in_tiles_and_decode_like_the_reference(tmp_path):
    """A down projection of 8256 inputs loads as a TiledLinear on a CPU; prefill (F.linear)
    and decode steps (the tiled kernel) both give the reference's logits."""
    path = make_checkpoint(tmp_path, intermediate=8256, tokenizer=False)
    model = load_model(path)
    assert isinstance(model.layers[0].mlp.down_proj, TiledLinear) == kernels.available()
    assert torch.equal(model.layers[0].mlp.down_proj.weight, reference(path).model.layers[0].mlp.down_proj.weight)
    tokens = random_tokens(16, seed=7)
    session = Engine(model).new_session()
    ours = [session.feed(tokens[:8], all_logits=True)] + [session.feed(tokens[:n])[None] for n in range(9, 17)]
    assert (torch.cat(ours) - ref_logits(path, tokens)).abs().max() <= TOL


@pytest.mark.parametrize(
    "layout", [dict(max_shard_size="5MB"), dict(safe=False), dict(safe=False, max_shard_size="5MB"), dict(tie=True)],
    ids=["sharded-safetensors", "bin", "sharded-bin", "tied-embeddings"],
)
def test_checkpoint_layouts(tmp_path, layout):
    path = make_checkpoint(tmp_path, tokenizer=False, **layout)
    if "max_shard_size" in layout:
        assert len([p for p in path.iterdir() if "-of-" in p.name]) > 1
    if layout.get("safe") is False:
        assert not list(path.glob("*.safetensors")) and list(path.glob("*.bin"))
    tokens = random_tokens(20, seed=5)
    assert (our_logits(path, tokens) - ref_logits(path, tokens)).abs().max() <= TOL


@pytest.mark.parametrize("fixture", ["mistral_dir", "llama_dir"])
def test_greedy_generation_matches_reference_past_the_window(request, fixture):
    path = request.getfixturevalue(fixture)
    prompt = random_tokens(10, seed=7)
    with torch.no_grad():
        out = reference(path).generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    expected = out[0, len(prompt):].tolist()
    session = Engine(load_model(path)).new_session()
    ours = list(session.generate(prompt, SamplingParams(temperature=0, max_tokens=32)))
    assert ours == expected
    assert len(prompt) + 32 > 8 * 4  # well past the sliding window


def test_chunked_prefill_equals_one_shot(mistral_dir):
    tokens = random_tokens(30, seed=8)
    one_shot = our_logits(mistral_dir, tokens)
    for chunk in (1, 3, 7):
        assert (our_logits(mistral_dir, tokens, chunk_size=chunk) - one_shot).abs().max() <= TOL


def test_a_context_shorter_than_window_plus_chunk_still_prefills_long_prompts(mistral_dir):
    """The rolling cache then holds fewer slots than the window plus a prefill chunk: the
    prompt must run in chunks that fit (a 254-token prompt at --ctx 256 crashed the step)."""
    engine = Engine(load_model(mistral_dir))
    tokens = random_tokens(254, seed=12)
    small = engine.new_session(max_context=256)
    assert small.cache.window is not None and small.cache.capacity < small.cache.window + small.chunk_size
    assert (small.feed(tokens) - engine.new_session(max_context=1024).feed(tokens)).abs().max() <= TOL


def test_turn_by_turn_equals_all_at_once(mistral_dir):
    engine = Engine(load_model(mistral_dir))
    tokens = random_tokens(36, seed=9)
    whole = engine.new_session().feed(tokens)
    session = engine.new_session()
    for end in (5, 17, 18, 30, 36):
        last = session.feed(tokens[:end])
    assert session.tokens == tokens
    assert (last - whole).abs().max() <= TOL
    assert session.tokens_processed == len(tokens)  # nothing ran twice


def test_rollback_and_refeed_gives_same_logits(mistral_dir):
    engine = Engine(load_model(mistral_dir))
    a, b = random_tokens(20, seed=10), random_tokens(15, seed=11)
    session = engine.new_session(chunk_size=4)
    first = session.feed(a + b[:5])
    session.feed(a + b)  # 35 tokens through a 12-slot rolling cache
    again = session.feed(a + b[:5])  # rolled back beyond what the cache kept: rebuilt
    assert (again - first).abs().max() <= TOL
    small = engine.new_session()  # a cache large enough to roll back in place
    small.feed(a + b)
    processed = small.tokens_processed
    assert (small.feed(a + b[:5]) - first).abs().max() <= TOL
    assert small.tokens_processed == processed + 1  # only the last token re-ran


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(mistral_dir):
    engine = Engine(load_model(mistral_dir))
    prompt = random_tokens(6, seed=12)

    def run(**kw):
        return list(engine.new_session().generate(prompt, SamplingParams(max_tokens=16, **kw)))

    sampled = run(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=123)
    assert sampled == run(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=123)
    assert sampled != run(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=124)
    assert run(temperature=1.5, top_k=1, seed=5) == run(temperature=0)


def test_context_overflow_is_refused_before_any_work(mistral_dir):
    from mistol.errors import MistolError

    engine = Engine(load_model(mistral_dir))
    session = engine.new_session(max_context=64)
    with pytest.raises(MistolError, match="context of 64"):
        next(session.generate(random_tokens(40), SamplingParams(max_tokens=30)))
    assert session.tokens_processed == 0


def test_batched_decode_step_equals_one_session_at_a_time(mistral_dir):
    from mistol.engine import decode_step

    engine = Engine(load_model(mistral_dir))
    prompts = [random_tokens(n, seed=20 + n) for n in (3, 11, 25)]  # different lengths and windows
    batch = [engine.new_session(chunk_size=4) for _ in prompts]
    alone = [engine.new_session(chunk_size=4) for _ in prompts]
    for s, p in zip(batch + alone, prompts + prompts):
        s.feed(p)
    for step in range(12):
        tokens = [1000 + 37 * step + i for i in range(len(prompts))]
        together = decode_step(batch, tokens)
        for i, s in enumerate(alone):
            single = s.feed(s.tokens + [tokens[i]])
            assert (together[i] - single).abs().max() <= 1e-5


def test_window_longer_than_the_context_is_plain_causal(mistral_dir):
    # OpenHermes' window is 4096; a session with --ctx 2048 (or a model whose max positions
    # are below its window) must still work: the window can never slide.
    engine = Engine(load_model(mistral_dir))
    tokens = random_tokens(7, seed=30)
    session = engine.new_session(max_context=6 + 1, chunk_size=4)  # capacity 7 < window + chunk
    assert session.cache.window is None
    assert (session.feed(tokens, all_logits=True) - ref_logits(mistral_dir, tokens)).abs().max() <= TOL
