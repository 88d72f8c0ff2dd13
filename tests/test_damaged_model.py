"""A model whose weights hold NaN (a damaged file) gives a one-line error naming the cause, in
the engine, the command line and the server, which goes on serving; never a junk token."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from checkpoints import make_checkpoint
from mistol.errors import MistolError
from mistol.sampling import SamplingParams, sample_next

GREEDY = SamplingParams(temperature=0, max_tokens=6)
SAMPLED = SamplingParams(temperature=0.8, seed=1, max_tokens=6)
MESSAGE = "the model's output is NaN at this token"


def damage(path: Path, name: str, rows: slice | int = slice(None)) -> Path:
    """Set `rows` of the checkpoint's tensor `name` to NaN, in place."""
    from safetensors.torch import load_file, save_file

    (file,) = path.glob("*.safetensors")
    state = load_file(file)
    state[name][rows] = float("nan")
    save_file(state, file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def nan_dir(tmp_path_factory) -> Path:
    """Every logit NaN: the final norm's weights are."""
    return damage(make_checkpoint(tmp_path_factory.mktemp("nan"), window=8), "model.norm.weight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_non_finite_logits_raise_a_mistol_error(bad, params):
    logits = torch.randn(100)
    logits[17] = bad
    what = "NaN" if bad != bad else "infinite"
    with pytest.raises(MistolError, match=f"the model's output is {what} at this token"):
        sample_next(logits, params, params.make_generator())


def test_tokens_masked_to_minus_infinity_are_no_fault():
    logits = torch.full((100,), float("-inf"))  # a grammar's mask leaves a few tokens
    logits[[3, 50, 70]] = torch.tensor([1.0, 2.0, 0.5])
    assert sample_next(logits, GREEDY) == 50
    assert sample_next(logits, SAMPLED, SAMPLED.make_generator()) in (3, 50, 70)


@pytest.mark.parametrize("speculation", [True, False], ids=["speculating", "plain"])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_session_on_nan_weights_raises_instead_of_a_junk_token(nan_dir, params, speculation):
    from mistol.engine import Engine

    engine = Engine.load(nan_dir, dtype="f32")
    if not speculation:
        engine.speculation = None
    with pytest.raises(MistolError, match=MESSAGE):
        list(engine.new_session().generate([1, 10, 20, 30, 10, 20], params))


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_generate_command_prints_one_line_and_exits_1(nan_dir, temperature):
    result = subprocess.run(
        [sys.executable, "-m", "mistol", "generate", "--model", str(nan_dir), "--prompt", "Hello there",
         "--max-tokens", "4", "--temperature", temperature],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"mistol: error: {MESSAGE}") and "weights" in lines[-1]
    assert result.stdout.strip() == ""


# -- the server ------------------------------------------------------------------------------
POISON = 500  # the token whose embedding is NaN: a prompt holding it fails, the others do not
HEALTHY_PROMPT = [1, 700, 800, 900]
BAD_PROMPT = [1, 700, POISON, 900]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from helpers import LoopbackServer
    from mistol.engine import Engine
    from mistol.server import ServerOptions, create_app

    path = damage(make_checkpoint(tmp_path_factory.mktemp("poisoned"), window=8), "model.embed_tokens.weight", POISON)
    engine = Engine.load(path, dtype="f32")
    expected = list(engine.new_session().generate(HEALTHY_PROMPT, SamplingParams(temperature=0, max_tokens=8)))
    assert POISON not in expected  # else the healthy request would meet the damaged row too
    with LoopbackServer(create_app(engine, ServerOptions(max_context=256, max_batch=4))) as url:
        with httpx.Client(base_url=url, timeout=120) as http:
            yield http, engine.tokenizer.decode(expected)


def request(http, prompt, stream=False):
    return http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                              "ignore_eos": True, "stream": stream})


def test_a_request_meeting_nan_ends_with_a_json_error_and_others_are_served(server):
    http, expected = server
    r = request(http, BAD_PROMPT)
    assert r.status_code == 500
    assert r.json()["error"]["message"].startswith(MESSAGE)
    r = request(http, HEALTHY_PROMPT)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    assert http.get("/health").status_code == 200


def test_a_stream_meeting_nan_gets_an_error_event(server):
    http, _ = server
    r = request(http, BAD_PROMPT, stream=True)
    errors = [json.loads(e[len("data: "):])["error"] for e in r.text.split("\n\n")
              if e.startswith("data: {") and '"error"' in e]
    assert len(errors) == 1 and errors[0]["message"].startswith(MESSAGE), r.text


def test_damaged_and_healthy_requests_batched_together(server):
    http, expected = server
    with ThreadPoolExecutor(6) as pool:
        bad = [pool.submit(request, http, BAD_PROMPT) for _ in range(2)]
        good = [pool.submit(request, http, HEALTHY_PROMPT) for _ in range(3)]
        bad, good = [f.result() for f in bad], [f.result() for f in good]
    assert all(r.status_code == 500 and r.json()["error"]["message"].startswith(MESSAGE) for r in bad)
    assert all(r.status_code == 200 and r.json()["choices"][0]["text"] == expected for r in good)
