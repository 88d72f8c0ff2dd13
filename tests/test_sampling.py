"""Drawing a token: on the CPU exactly torch.multinomial's draw with the same seed, and on a
GPU (where a CPU generator cannot draw from device tensors) the same token as on the CPU."""

from __future__ import annotations

import pytest
import torch

from mistol.sampling import SamplingParams, draw_device, sample_next

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
UNFILTERED = dict(top_k=0, top_p=1.0, min_p=0.0)


def test_an_unfiltered_draw_is_torch_multinomials_draw_with_the_same_seed():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    for seed in range(50):
        params = SamplingParams(temperature=0.7, seed=seed, **UNFILTERED)
        expected = torch.multinomial(torch.softmax(logits / 0.7, dim=-1), 1,
                                     generator=torch.Generator().manual_seed(seed))
        assert sample_next(logits, params, params.make_generator()) == int(expected)


def test_the_draw_runs_on_the_generators_device():
    logits = torch.empty(32000, device="meta")  # a device tensor's stand-in: no data, only a device
    assert draw_device(logits, torch.Generator()) == torch.device("cpu")
    assert draw_device(logits, None) == torch.device("meta")  # no generator: the device's own
    assert draw_device(torch.zeros(3), torch.Generator()) == torch.device("cpu")


@needs_cuda
def test_sampling_with_temperature_on_a_gpu_draws_what_the_cpu_draws():
    logits = torch.randn(32000, generator=torch.Generator().manual_seed(1)) * 4
    context = torch.tensor([5, 17, 17, 900])
    for seed in range(20):
        params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.3, seed=seed)
        on_cpu = sample_next(logits, params, params.make_generator(), context)
        on_gpu = sample_next(logits.cuda(), params, params.make_generator(), context)
        assert on_gpu == on_cpu


@needs_cuda
def test_a_session_on_a_gpu_samples_with_temperature(mistral_dir):
    from mistol.engine import Engine

    engine = Engine.load(mistral_dir, dtype="f32", device="cuda")
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, max_tokens=12)
    first = list(engine.new_session().generate([1, 10, 20, 30], params))
    again = list(engine.new_session().generate([1, 10, 20, 30], params))
    assert len(first) == 12 and first == again
