"""A base model (no chat template, no ChatML tokens: Mistral 7B v0.1's own tokenizer) served:
completions work, chat requests get a 400 that says what the server answers."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from checkpoints import make_checkpoint  # noqa: E402
from helpers import LoopbackServer, mistral_v1_tokenizer_model  # noqa: E402
from mistol.engine import Engine  # noqa: E402


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from mistol.server import ServerOptions, create_app

    path = make_checkpoint(tmp_path_factory.mktemp("base"), tokenizer=False, vocab=32000)
    shutil.copyfile(mistral_v1_tokenizer_model(), path / "tokenizer.model")  # (no chat template, no ChatML)
    engine = Engine.load(path, dtype="f32")
    assert engine.tokenizer.token_id("<|im_start|>") is None
    with LoopbackServer(create_app(engine, ServerOptions(model_name="base", max_context=256))) as url:
        yield url


def test_completions_are_served(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.completions.create(model="base", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert out.usage.completion_tokens >= 1 and isinstance(out.choices[0].text, str)
    r = httpx.post(url + "/api/generate", json={"model": "base", "prompt": "Once upon a time", "stream": False,
                                                "options": {"num_predict": 4}}, timeout=60)
    assert r.status_code == 200 and r.json()["done"] and r.json()["eval_count"] >= 1


def test_chat_is_refused_in_one_line_that_names_what_is_served(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert refused.value.code == "no_chat_template" and "/v1/completions" in refused.value.message
    for path, body in (("/api/chat", {"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                      "stream": False}),
                       ("/apply-template", {"messages": [{"role": "user", "content": "hi"}]})):
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 400 and "completions only" in r.text and "\n" not in r.json().get("error", r.text)
