"""The order of the sampling filters (`SamplingParams.order`, llama.cpp's `samplers`), checked
against llama.cpp's own samplers (its C API through llama-cpp-python) on the same logits, and
the server's reading of `samplers`."""

from __future__ import annotations

import ctypes

import pytest
import torch

from llama_cpp_ref import llama_cpp
from mistol.sampling import SamplingParams, sample_next, sampling_weights

ORDERS = [
    ("top_k", "top_p", "min_p", "temperature"),  # llama.cpp's default (its other samplers off)
    ("temperature", "top_k", "top_p", "min_p"),  # Hugging Face's, mistol's default
    ("min_p", "temperature", "top_p"),
    ("top_p", "top_k"),
    ("temperature",),
    (),
]


def llama_cpp_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution llama.cpp's chain of `params.order` leaves for its `dist` sampler to
    draw from: the softmax over the candidates left, of the logits they were left with."""
    lib = llama_cpp()
    make = {
        "temperature": lambda: lib.llama_sampler_init_temp(params.temperature),
        "top_k": lambda: lib.llama_sampler_init_top_k(params.top_k),
        "top_p": lambda: lib.llama_sampler_init_top_p(params.top_p, 0),
        "min_p": lambda: lib.llama_sampler_init_min_p(params.min_p, 0),
    }
    n = logits.numel()
    data = (lib.llama_token_data * n)(*[lib.llama_token_data(i, float(x), 0.0) for i, x in enumerate(logits)])
    candidates = lib.llama_token_data_array(data, n, -1, False)
    for name in params.order:
        sampler = make[name]()
        lib.llama_sampler_apply(sampler, ctypes.byref(candidates))
        lib.llama_sampler_free(sampler)
    left = torch.full((n,), float("-inf"), dtype=torch.float64)
    for i in range(candidates.size):
        left[candidates.data[i].id] = candidates.data[i].logit
    return torch.softmax(left, dim=-1)


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: ",".join(o) or "none")
@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.7, 40, 0.9, 0.05), (1.6, 0, 0.8, 0.1),
                                                           (0.4, 200, 1.0, 0.02), (1.2, 12, 0.95, 0.0)])
def test_the_distribution_is_llama_cpps_for_the_same_order(order, temperature, top_k, top_p, min_p):
    logits = torch.randn(500, generator=torch.Generator().manual_seed(len(order) + top_k)) * 2.5
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, order=order)
    ours = sampling_weights(logits, params).double()
    theirs = llama_cpp_distribution(logits, params)
    assert torch.equal(ours > 0, theirs > 0)  # the same tokens left
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-4)


def test_temperature_last_differs_from_temperature_first():
    # the reason the order matters: top-p judges a sharper or flatter distribution
    logits = torch.randn(500, generator=torch.Generator().manual_seed(3)) * 2.5
    first = SamplingParams(temperature=2.0, top_k=0, top_p=0.5, min_p=0.0)
    last = SamplingParams(temperature=2.0, top_k=0, top_p=0.5, min_p=0.0, order=("top_p", "temperature"))
    assert int((sampling_weights(logits, first) > 0).sum()) > int((sampling_weights(logits, last) > 0).sum())


def test_a_filter_left_out_of_the_order_is_off():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(temperature=0.9, top_k=1, top_p=0.5, min_p=0.5, order=("temperature",))
    assert not params.greedy  # top_k = 1 is not in the order
    torch.testing.assert_close(sampling_weights(logits, params), torch.softmax(logits / 0.9, dim=-1))
    # temperature left out: the logits as they are, even at temperature 0 (llama.cpp's too)
    cold = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, order=("top_k",))
    assert not cold.greedy
    torch.testing.assert_close(sampling_weights(logits, cold), torch.softmax(logits, dim=-1))


def test_temperature_zero_anywhere_in_the_order_is_llama_cpps_greedy_choice():
    lib = llama_cpp()
    logits = torch.randn(300, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(temperature=0.0, top_k=50, top_p=0.9, min_p=0.05, order=("top_k", "top_p", "temperature"))
    assert params.greedy
    n = logits.numel()
    data = (lib.llama_token_data * n)(*[lib.llama_token_data(i, float(x), 0.0) for i, x in enumerate(logits)])
    candidates = lib.llama_token_data_array(data, n, -1, False)
    for sampler in (lib.llama_sampler_init_top_k(50), lib.llama_sampler_init_top_p(0.9, 0),
                    lib.llama_sampler_init_temp(0.0)):
        lib.llama_sampler_apply(sampler, ctypes.byref(candidates))
        lib.llama_sampler_free(sampler)
    left = [candidates.data[i].id for i in range(candidates.size) if candidates.data[i].logit > float("-inf")]
    assert left == [sample_next(logits, params)]


def test_an_unknown_filter_name_is_refused():
    from mistol.errors import MistolError

    with pytest.raises(MistolError, match="order"):
        SamplingParams(order=("top_k", "typical"))


# -- the server's `samplers` ------------------------------------------------------------------
LLAMA_CPP_DEFAULT = ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"]


@pytest.fixture(scope="module")
def server(mistral_dir):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from helpers import LoopbackServer
    from mistol.engine import Engine
    from mistol.server import ServerOptions, create_app

    engine = Engine.load(mistral_dir, dtype="f32")
    with LoopbackServer(create_app(engine, ServerOptions(max_context=256))) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            yield http


def complete(server, **fields) -> str:
    body = {"prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True, **fields}
    r = server.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_llama_cpps_default_samplers_as_names_and_as_letters_give_the_same_text(server):
    sampled = dict(temperature=1.0, top_k=40, top_p=0.95, min_p=0.05, seed=11, repeat_penalty=1.1)
    named = complete(server, samplers=LLAMA_CPP_DEFAULT, **sampled)
    assert complete(server, samplers="edskypmxt", **sampled) == named
    unpenalized = {**sampled, "repeat_penalty": 1.0}
    assert complete(server, samplers=["Top-K", "typ", "nucleus", "minp", "temp"], **unpenalized) \
        == complete(server, samplers="kypmt", **unpenalized)


@pytest.mark.parametrize("samplers,fragment", [(["top_k", "mirostat"], "'mirostat'"), ("kypQ", "'Q'"),
                                               ("top_k", "letter 'o'"), ([1, 2], "list of sampler names"),
                                               ("k" * 100_000, "at most 32")])  # each would run at every token
def test_an_unknown_sampler_is_a_400_naming_the_field(server, samplers, fragment):
    r = server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "samplers": samplers})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "samplers" and fragment in r.json()["error"]["message"]


def test_a_sampler_mistol_lacks_is_accepted_only_while_it_does_nothing(server):
    complete(server, samplers=["dry", "top_k", "xtc", "temperature"], dry_multiplier=0, xtc_probability=0)
    r = server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "samplers": ["dry", "temperature"],
                                             "dry_multiplier": 0.8})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dry_multiplier", r.text
    # left out of `samplers`, llama.cpp does not run it, whatever its field holds
    complete(server, samplers=["top_k", "temperature"], dry_multiplier=0.8, seed=1)


def test_penalties_after_a_filter_are_refused_and_left_out_are_off(server):
    r = server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "repeat_penalty": 1.3,
                                             "samplers": ["top_k", "penalties", "temperature"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "samplers", r.text
    plain = complete(server, temperature=0)
    # penalties below 1 (and below 0) favour the tokens already there: they change the greedy text
    favour_seen = dict(repeat_penalty=0.2, presence_penalty=-2.0, frequency_penalty=-1.0)
    assert complete(server, temperature=0, **favour_seen) != plain
    assert complete(server, temperature=0, samplers=["penalties", "top_k", "temperature"], **favour_seen) \
        == complete(server, temperature=0, **favour_seen)
    assert complete(server, temperature=0, samplers=["top_k", "temperature"], **favour_seen) == plain
    assert complete(server, temperature=0, samplers=[], seed=0, **favour_seen) != plain  # nothing: temperature 1 too


def test_top_k_left_out_is_off(server):
    greedy = complete(server, temperature=0)
    assert complete(server, top_k=1, temperature=1.0, seed=3, samplers=["top_k", "temperature"]) == greedy
    texts = []
    for seed in range(4):
        wide = dict(temperature=1.0, top_p=1.0, min_p=0.0, seed=seed)
        without = complete(server, top_k=1, samplers=["top_p", "min_p", "temperature"], **wide)
        assert without == complete(server, top_k=0, **wide)  # top_k = 1 left out samples as top_k = 0
        texts.append(without)
    assert any(t != greedy for t in texts)


@pytest.mark.parametrize("samplers,order", [
    (LLAMA_CPP_DEFAULT, ("top_k", "top_p", "min_p", "temperature")),
    ("kypmt", ("top_k", "top_p", "min_p", "temperature")),
    (["TEMP", "min-p", "topp"], ("temperature", "min_p", "top_p")),
    ("", ()),
])
def test_samplers_name_the_order(samplers, order):
    from mistol.server.protocol import parse_completion_request

    assert parse_completion_request({"prompt": "hi", "samplers": samplers}).params.order == order
    assert parse_completion_request({"prompt": "hi"}).params.order == ("temperature", "top_k", "top_p", "min_p")
