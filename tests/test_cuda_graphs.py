"""Decode steps as CUDA graphs. The device-side attention plan they record is checked on the
CPU against the ordinary one (same logits, past the sliding window and around the rolling
cache); the graphs themselves only where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from mistol.engine import Engine
from mistol.model.cuda_graphs import key_bucket
from mistol.sampling import SamplingParams


def test_key_buckets_cover_every_filled_slot():
    assert key_bucket(0, 4096) == 256
    assert key_bucket(255, 4096) == 256
    assert key_bucket(256, 4096) == 512
    assert key_bucket(3000, 4096) == 4096
    assert key_bucket(10_000, 4608) == 4608  # a rolling cache, full: all its slots
    assert key_bucket(5, 8, min_keys=4) == 8
    for position in range(0, 600, 7):
        assert key_bucket(position, 520, min_keys=4) >= min(position + 1, 520)


def test_device_plan_gives_the_same_logits_as_the_host_plan(mistral_dir):
    engine = Engine.load(mistral_dir, dtype="f32")
    ids = torch.randint(3, 1000, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = engine.new_session(max_context=80, chunk_size=4)  # window 8: capacity 12, wraps often
    device_side = engine.new_session(max_context=80, chunk_size=4)
    reference.feed(ids[:5])
    device_side.feed(ids[:5])
    model, cache = engine.model, device_side.cache
    with torch.inference_mode():
        for position in range(5, len(ids)):
            expected = reference.feed(ids[: position + 1])
            pos = torch.tensor([position])
            plan = cache.plan_on_device(pos, key_bucket(position, cache.capacity, min_keys=4))
            got = model(torch.tensor([[ids[position]]]), pos, [cache], plans=[plan])[0]
            cache.length = position + 1
            assert (got - expected).abs().max().item() < 1e-5, position


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_decoding_equals_eager_on_cuda(mistral_dir, monkeypatch):
    engine = Engine.load(mistral_dir, dtype="f32", device="cuda")
    prompt = list(range(5, 30))
    params = SamplingParams(temperature=0, max_tokens=300)
    engine.cuda_graphs = False
    eager = list(engine.new_session(max_context=400).generate(prompt, params))
    engine.cuda_graphs = True
    session = engine.new_session(max_context=400)
    graphed = list(session.generate(prompt, params))
    assert session._graphed is not None and len(session._graphed._graphs) >= 2  # crossed a bucket
    assert graphed == eager
